"""The papers' tables without Ray: the grid search file of a table (variants x seeds, validated like
any search), and the table computed from hand-made trials (report half at the best selection epoch,
mean ± t-interval, the post-processing row from its row's trials)."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError
from pipeline.tuning import ablation
from pipeline.tuning.search import VARIANT, load_search

RECIPE = {"method": "supervised", "model": {"backbone": "test_resnet"}, "data": {"image_size": 32},
          "evaluation": {"windows": [30]}, "run": {"epochs": 2, "steps_per_epoch": 2}}
DTM = {**RECIPE, "method": "dtm"}


def recipes():
    return {"seed002_vgg_baseline": RECIPE, "abaw5_dtm": DTM}


def test_the_grid_is_rows_by_seeds_and_validates():
    mapping = ablation.search_mapping(ablation.PAPERS["abaw5"], recipes(), split="/data/split", seeds=3,
                                      name="abaw5", storage_path="/runs", epochs=1)
    search = load_search(mapping=mapping)
    assert search.config.trials == 9 and search.config.searcher == "grid"
    assert sorted(search.variant_bases) == ["baseline", "ssl_dtm_fer", "ssl_dtm_ms1mv2"]
    fer = search.trial_config({VARIANT: "ssl_dtm_fer", "run.seed": 2})
    assert fer.method == "dtm" and "ms1mv2" not in fer.data.unlabeled_sources and fer.run.seed == 2
    pooled = search.trial_config({VARIANT: "ssl_dtm_ms1mv2", "run.seed": 0})
    assert "ms1mv2" in pooled.data.unlabeled_sources
    assert 10 in pooled.evaluation.windows  # the post-processing row's window is scored
    assert search.trial_config({VARIANT: "baseline", "run.seed": 0}).method == "supervised"
    bad = dict(mapping, space=[{"key": VARIANT, "distribution": "grid", "values": ["nope"]},
                               mapping["space"][1]], trials=1)
    with pytest.raises(ConfigError, match="unknown variants"):
        load_search(mapping=bad)


def record(epoch, selection, report, smoothed):
    return {"epoch": epoch, "validation": {"halves": {
        "selection": {"frames": 10, "macro_f1": selection},
        "report": {"frames": 10, "macro_f1": report, "smoothed": {"10": smoothed}}}}}


def trial(trial_id, variant, seed, history):
    return {"trial_id": trial_id, "params": {VARIANT: variant, "run.seed": seed}, "history": history}


def test_the_table_reads_the_report_half_at_the_chosen_epoch():
    trials = [trial("b0", "baseline", 0, [record(1, 0.1, 0.20, 0.2)]),
              trial("b1", "baseline", 1, [record(1, 0.1, 0.22, 0.2)]),
              trial("f0", "ssl_dtm_fer", 0, [record(1, 0.3, 0.30, 0.3)]),
              # best selection at epoch 1: the report half there (0.34), not epoch 2's
              trial("m0", "ssl_dtm_ms1mv2", 0, [record(1, 0.5, 0.34, 0.40), record(2, 0.4, 0.50, 0.6)]),
              trial("m1", "ssl_dtm_ms1mv2", 1, [record(1, 0.2, 0.30, 0.36), record(2, 0.3, 0.36, 0.42)])]
    rows = {row["row"]: row for row in ablation.table_rows(ablation.PAPERS["abaw5"], trials)}
    assert rows["baseline"]["mean_macro_f1"] == pytest.approx(21.0)
    # t(0.975, 1) = 12.706; sd of (20, 22) = sqrt(2); half-width = 12.706 * sqrt(2) / sqrt(2)
    assert rows["baseline"]["ci95_half_width"] == pytest.approx(12.7062, rel=1e-4)
    assert rows["ssl_dtm_fer"]["n_seeds"] == 1 and rows["ssl_dtm_fer"]["ci95_half_width"] is None
    assert rows["ssl_dtm_ms1mv2"]["scores"] == pytest.approx([34.0, 36.0])
    assert rows["postprocess"]["scores"] == pytest.approx([40.0, 42.0])
    assert rows["postprocess"]["trials"] == ["m0", "m1"] and not rows["postprocess"]["trained"]
    text = ablation.render_markdown(ablation.PAPERS["abaw5"], list(rows.values()), "/x")
    assert "| 40.05 | 41.00 ± 12.71 | 2 |" in text


def temporal_record(epoch, selection, report, report_smoothed):
    return {"epoch": epoch, "halves": {
        "selection": {"scored_frames": 10, "frame": 0.0, "temporal": selection},
        "report": {"scored_frames": 10, "frame": 0.0, "temporal": report, "temporal+smoothing": report_smoothed}}}


def test_the_temporal_rows_read_their_runs_at_the_encoder_epoch_chosen_on_selection():
    trials = [trial("f0", "feedback", 0, [record(1, 0.3, 0.30, 0.3)]),
              trial("f1", "feedback", 1, [record(1, 0.3, 0.32, 0.3)]),
              trial("f2", "feedback", 2, [record(1, 0.3, 0.32, 0.3)])]
    refined = {("temporal", "f0"): [temporal_record(1, 0.2, 0.40, 0.45), temporal_record(2, 0.5, 0.42, 0.48)],
               # equal selection scores: the first epoch
               ("temporal", "f1"): [temporal_record(1, 0.5, 0.44, 0.50), temporal_record(2, 0.5, 0.60, 0.70)]}
    rows = {row["row"]: row for row in ablation.table_rows(ablation.PAPERS["abaw6"], trials, refined)}
    assert rows["feedback"]["trials"] == ["f0", "f1", "f2"]
    # f2 has no temporal run: its seed is missing from both rows built on the encoder
    assert rows["temporal"]["trials"] == ["f0", "f1"] and rows["temporal"]["epochs"] == [2, 1]
    assert rows["temporal"]["scores"] == pytest.approx([42.0, 44.0])
    assert rows["postprocess"]["scores"] == pytest.approx([48.0, 50.0])
    assert rows["temporal"]["trained"] and not rows["postprocess"]["trained"]


def test_a_table_restricted_to_some_rows_keeps_what_they_build_on():
    table = ablation.PAPERS["abaw6"].only(["feedback", "temporal", "postprocess"])
    assert [row.name for row in table.rows] == ["feedback", "temporal", "postprocess"]
    assert [row.name for row in table.trained()] == ["feedback"]
    assert [row.name for row in table.refined()] == ["temporal"]
    with pytest.raises(ValueError, match="temporal builds on feedback"):
        ablation.PAPERS["abaw6"].only(["baseline", "temporal"])
    with pytest.raises(ValueError, match="nope not in the abaw6 table"):
        ablation.PAPERS["abaw6"].only(["nope"])
