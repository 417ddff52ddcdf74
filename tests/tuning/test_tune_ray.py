"""A real search on the tiny split: Optuna TPE + ASHA over three one-process DTM trials of two
epochs; the objective is reported every epoch, no placement group outlives its trial, and the
report's best_config.yaml loads as a recipe."""

from __future__ import annotations

import pytest

from pipeline.training.config import load_config
from pipeline.tuning.search import load_search

from conftest import build_tiny_split

pytestmark = pytest.mark.ray


def tiny_search(split: str, storage: str, name: str, **changes) -> dict:
    mapping = {
        "base": {"method": "dtm", "method_options": {"ema_decay": 0.9},
                 "model": {"backbone": "test_resnet", "channels_last": False},
                 "data": {"split": split, "image_size": 32, "labeled_batch": 8, "unlabeled_ratio": 1,
                          "shuffle_buffer": 64},
                 "evaluation": {"windows": [5], "batch_size": 64},
                 "run": {"steps_per_epoch": 2, "threads": 1}},
        "name": name, "storage": storage, "trials": 3, "epochs": 2, "concurrency": 2, "seed": 0,
        "resources_per_trial": {"cpu": 1},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "space": [
            {"key": "method_options.threshold_momentum", "distribution": "one_minus_loguniform",
             "low": 0.5, "high": 0.99},
            {"key": "optimizer.lr", "distribution": "loguniform", "low": 1e-4, "high": 1e-2},
            {"key": "method_options.initial_threshold", "distribution": "uniform", "low": 0.3, "high": 0.9},
        ],
    }
    mapping.update(changes)
    return mapping


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return build_tiny_split(tmp_path_factory.mktemp("tune_split"))


def test_a_search_runs_reports_every_epoch_and_writes_its_report(local_ray, split, tmp_path):
    from pipeline.tuning import ray_tune, report

    search = load_search(mapping=tiny_search(split, str(tmp_path / "tune"), "e2e"))
    results = ray_tune.run_search(search)
    assert len(results) == 3 and not results.errors
    for result in results:
        history = result.metrics_dataframe
        assert list(history["epoch"]) == list(range(1, len(history) + 1))
        assert history["best_selection_macro_f1"].notna().all()  # the objective, every epoch
        assert (history["best_selection_macro_f1"].diff().dropna() >= 0).all()  # best so far
        for column in ("selection_macro_f1", "selection_macro_f1_smoothed_5", "loss", "unlabeled_loss",
                       "threshold_neutral", "pseudo_label_acceptance_rate"):
            assert column in history.columns, column
        assert result.checkpoint is not None
        assert result.path.startswith(search.experiment + "/trial_")
    # Every trial's placement group is gone once the search is over (ASHA-stopped ones included).
    groups = local_ray.util.placement_group_table()
    assert [group for group in groups.values() if group["state"] != "REMOVED"] == []

    summary = report.write_report(search.experiment)
    assert summary["trials"] == 3
    config = load_config(summary["best_config"])
    # The report's best trial has Tune's best objective (ties may pick another trial of that value).
    assert summary["best_objective"] == pytest.approx(results.get_best_result().metrics["best_selection_macro_f1"])
    chosen = next(result for result in results if result.metrics["trial_id"] == summary["best_trial"])
    assert config.optimizer.lr == pytest.approx(chosen.config["optimizer.lr"])
    assert config.options().threshold_momentum == pytest.approx(
        1 - chosen.config["1-method_options.threshold_momentum"])


def test_trials_asha_stops_leak_nothing_and_the_next_trial_starts(local_ray, split, tmp_path):
    """A grid over seeds, one trial at a time: different starting weights give different epoch-1
    scores, so ASHA (rung at epoch 1, keep the better half) stops some trials there."""
    from pipeline.tuning import ray_tune

    seeds = [0, 1, 2, 3]
    search = load_search(mapping=tiny_search(
        split, str(tmp_path / "tune"), "asha", searcher="grid", trials=len(seeds), concurrency=1,
        space=[{"key": "run.seed", "distribution": "grid", "values": seeds}]))
    results = ray_tune.run_search(search)
    assert len(results) == len(seeds) and not results.errors
    epochs = {result.config["run.seed"]: int(result.metrics["epoch"]) for result in results}
    stopped = [seed for seed, epoch in epochs.items() if epoch < 2]
    assert stopped, f"ASHA stopped no trial: {epochs}"
    # Trials run in seed order; one after a stopped trial started and reported.
    assert any(seed + 1 in epochs for seed in stopped)
    groups = local_ray.util.placement_group_table()
    assert [group for group in groups.values() if group["state"] != "REMOVED"] == []
