"""The search report from a hand-made experiment folder (as Tune and the Trainer write it): one
trials.parquet row per trial equal to its inputs, a best_config.yaml that loads as a recipe with the
best values, and a report.html that carries its plots and the plotly bundle inline."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from jobs import tune as tune_job
from pipeline.data import schema
from pipeline.training.config import load_config
from pipeline.tuning import report
from pipeline.tuning.search import MANIFEST, dump_yaml, load_search, trial_dirname

from test_search import search_mapping

SEARCH = search_mapping(
    base={"method": "dtm", "model": {"backbone": "test_resnet"},
          "data": {"split": "/data/split", "image_size": 32},
          "evaluation": {"windows": [5]}, "run": {"steps_per_epoch": 3, "storage": "/runs"}},
    name="handmade", storage="unused")
# trial id -> (sampled params, selection macro-F1 per epoch, report-half macro-F1 per epoch)
TRIALS = {
    "aaaa0001": ({"1-method_options.threshold_momentum": 0.1, "optimizer.lr": 1e-3,
                  "method_options.initial_threshold": 0.6}, [0.20, 0.30, 0.25], [0.21, 0.33, 0.27]),
    "aaaa0002": ({"1-method_options.threshold_momentum": 0.02, "optimizer.lr": 5e-3,
                  "method_options.initial_threshold": 0.9}, [0.40, 0.55, 0.50], [0.41, 0.52, 0.45]),
    "aaaa0003": ({"1-method_options.threshold_momentum": 0.3, "optimizer.lr": 2e-4,
                  "method_options.initial_threshold": 0.7}, [0.10], [0.12]),  # stopped by ASHA
    "aaaa0004": ({"1-method_options.threshold_momentum": 0.05, "optimizer.lr": 8e-3,
                  "method_options.initial_threshold": 0.8}, [0.35, 0.38, 0.45], [0.30, 0.31, 0.36]),
}


def epoch_record(epoch: int, selection: float, report_half: float) -> dict:
    confusion = [[5 if i == j else 1 for j in range(schema.NUM_CLASSES)] for i in range(schema.NUM_CLASSES)]
    return {"epoch": epoch, "step": 3 * epoch, "losses": {"loss": 2.0 - selection},
            "learning_rates": [1e-3], "thresholds": [0.8] * schema.NUM_CLASSES,
            "pseudo_label_acceptance_rate": 0.5, "pseudo_label_quality": None,
            "validation": {"macro_f1": (selection + report_half) / 2,
                           "per_class_f1": [selection] * schema.NUM_CLASSES, "confusion": confusion,
                           "smoothed": {"5": {"macro_f1": selection}},
                           "halves": {"selection": {"macro_f1": selection, "smoothed": {"5": selection + 0.01}},
                                      "report": {"macro_f1": report_half, "smoothed": {"5": report_half}}}}}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tune") / "handmade"
    folder.mkdir()
    search = load_search(mapping=SEARCH)
    (folder / MANIFEST).write_text(dump_yaml(search.manifest()))
    for trial_id, (params, selection, report_half) in TRIALS.items():
        trial = folder / trial_dirname(trial_id)
        trial.mkdir()
        (trial / "params.json").write_text(json.dumps(params))
        history = [epoch_record(epoch, s, r) for epoch, (s, r) in enumerate(zip(selection, report_half), 1)]
        (trial / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in history))
        lines = []
        for epoch, value in enumerate(selection, 1):
            lines.append({"epoch": epoch, "loss": 2.0 - value, "selection_macro_f1": value,
                          "best_selection_macro_f1": max(selection[:epoch]),
                          "pseudo_label_acceptance_rate": 0.5, "trial_id": trial_id, "config": params})
        (trial / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
        (trial / f"checkpoint_{len(selection) - 1:06d}").mkdir()
    return folder


@pytest.fixture(scope="module")
def written(experiment):
    return report.write_report(str(experiment))


def test_trials_parquet_has_one_row_per_trial_equal_to_its_inputs(experiment, written):
    frame = pd.read_parquet(experiment / "report" / "trials.parquet")
    assert sorted(frame["trial_id"]) == sorted(TRIALS)
    assert list(frame["trial_id"])[0] == "aaaa0002"  # sorted by the objective
    for _, row in frame.iterrows():
        params, selection, _ = TRIALS[row["trial_id"]]
        for name, value in params.items():
            assert row[f"param.{name}"] == pytest.approx(value)
        assert row["config.method_options.threshold_momentum"] == pytest.approx(
            1 - params["1-method_options.threshold_momentum"])
        assert row["objective"] == pytest.approx(max(selection))
        assert row["epochs"] == len(selection)
        assert row["best_epoch"] == selection.index(max(selection)) + 1
        assert row["last.selection_macro_f1"] == pytest.approx(selection[-1])
        assert row["checkpoint"].endswith(f"checkpoint_{len(selection) - 1:06d}")
    assert written["trials"] == 4 and written["best_trial"] == "aaaa0002"
    # The report half is read for the best trial only, at its best selection epoch (epoch 2).
    assert written["best_report_macro_f1"] == pytest.approx(0.52)


def test_best_config_loads_as_a_recipe_with_the_best_values(experiment, written):
    path = experiment / "report" / "best_config.yaml"
    config = load_config(str(path))
    params = TRIALS["aaaa0002"][0]
    assert config.options().threshold_momentum == pytest.approx(0.98)
    assert config.optimizer.lr == pytest.approx(params["optimizer.lr"])
    assert config.options().initial_threshold == pytest.approx(0.9)
    assert config.run.epochs == 3 and config.run.name == "handmade_best" and config.run.storage == "/runs"
    assert config.data.split == "/data/split" and config.model.backbone == "test_resnet"
    # jobs.train takes it as it is.
    from jobs import train as train_job

    assert train_job.main(["--config", str(path), "--print-config"]) == 0


def test_report_html_is_self_contained_with_its_plots(experiment, written):
    text = (experiment / "report" / "report.html").read_text()
    for anchor in ("history", "parallel", "importances", "slice", "curves", "per_class", "confusion"):
        assert f"id='{anchor}'" in text
    for anchor in ("history", "parallel", "importances", "slice", "curves", "per_class", "confusion"):
        assert f'id="plot-{anchor}"' in text, anchor
    assert "fANOVA over 4 complete trials" in text
    # plotly.js inline (once), nothing fetched from the network.
    assert text.count("plotly.js v") >= 1 and len(text) > 3_000_000
    assert not re.search(r"<script[^>]+src=", text)
    for name in ("optimisation_history.png", "learning_curves.png", "confusion.png"):
        assert (experiment / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_job_rewrites_the_report(experiment, written, capsys):
    (experiment / "report" / "report.html").unlink()
    assert tune_job.main(["--report", str(experiment)]) == 0
    assert (experiment / "report" / "report.html").exists()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["best_trial"] == "aaaa0002"


def test_per_epoch_figures_come_from_the_trainer_records_when_tune_lines_are_missing():
    """A trial with Ray Train workers gives Tune no checkpoint, so after a restore Tune's result.json
    starts again at the resumed epoch; the report's per-epoch figures (curves, best epoch, the
    rebuilt study) must still have every epoch the Trainer recorded, with Tune's line laid over
    its own epoch."""
    history = [epoch_record(1, 0.40, 0.30), epoch_record(2, 0.20, 0.10)]
    reported = [{"epoch": 2, "time_total_s": 12.5, "checkpoint_path": "/x/train/checkpoint_000001"}]
    results = report.per_epoch_results(history, reported)
    assert [result["epoch"] for result in results] == [1, 2]
    assert [result["selection_macro_f1"] for result in results] == [0.40, 0.20]
    assert [result["best_selection_macro_f1"] for result in results] == [0.40, 0.40]
    assert "time_total_s" not in results[0] and results[1]["time_total_s"] == 12.5
    assert results[1]["checkpoint_path"] == "/x/train/checkpoint_000001"
    # Without the Trainer's records, Tune's lines are all there is.
    assert report.per_epoch_results([], reported) == reported
