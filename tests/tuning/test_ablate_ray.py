"""`jobs.ablate` end to end on the tiny split: the ABAW5 table's SSL rows (SSL+DTM on FER data;
+ MS1MV2; + post-processing; `--rows` leaves the baseline out for time, the table test without Ray
covers it) at demo scale as a grid of 2 trained rows x 2 seeds, 1 epoch of 2 steps: every row has
n=2 seeds and its interval, and the post-processing row reuses its row's trials (no trial of its
own)."""

from __future__ import annotations

import csv
import json

import pytest

from pipeline.tuning import ablation
from pipeline.tuning.search import VARIANT

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """The tiny split with two validation videos (the tiny preset's one would leave the report
    half empty)."""
    from conftest import build_tiny_split

    return build_tiny_split(tmp_path_factory.mktemp("ablate_split"), validation_videos=2)


def test_abaw5_table_rows_by_seeds(local_ray, split, tmp_path, capsys):
    from jobs import ablate

    code = ablate.main(["--paper", "abaw5", "--rows", "ssl_dtm_fer,ssl_dtm_ms1mv2,postprocess",
                        "--split", split, "--scale", "demo", "--seeds", "2", "--epochs", "1", "--concurrency", "2", "--storage", str(tmp_path),
                        "--set", "run.steps_per_epoch=2", "--set", "run.threads=1",
                        "--set", "data.shuffle_buffer=64", "--set", "data.labeled_batch=8",
                        "--set", "evaluation.batch_size=64"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    experiment = tmp_path / "abaw5"
    assert summary["trials"] == 4 and summary["errored"] == 0
    assert summary["table"] == str(experiment / "ablation.md")

    with open(experiment / "ablation.csv") as handle:
        rows = {row["row"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["ssl_dtm_fer", "ssl_dtm_ms1mv2", "postprocess"]
    for name, row in rows.items():
        assert int(row["n_seeds"]) == 2, name
        assert row["seeds"] == "0;1", name
        scores = [float(value) for value in row["scores"].split(";")]
        assert float(row["mean_macro_f1"]) == pytest.approx(sum(scores) / 2), name
        assert float(row["ci95_half_width"]) == pytest.approx(ablation.interval(scores)[1]), name
    assert rows["ssl_dtm_fer"]["paper_macro_f1"] == "35.81"
    assert rows["postprocess"]["paper_macro_f1"] == "40.05"

    # Four trials were trained, none for the post-processing row, whose figures come from the very
    # trials (models) of the row it post-processes.
    variants = [json.loads(path.read_text())[VARIANT] for path in experiment.glob("trial_*/params.json")]
    assert sorted(variants) == sorted(["ssl_dtm_fer", "ssl_dtm_ms1mv2"] * 2)
    assert rows["postprocess"]["trials"] == rows["ssl_dtm_ms1mv2"]["trials"]
    assert rows["postprocess"]["trained"] == "False" and rows["ssl_dtm_ms1mv2"]["trained"] == "True"
    # The FER-only row drew no MS1MV2 images; the other pooled them.
    manifest = (experiment / "search.yaml").read_text()
    assert "ms1mv2" in manifest

    text = (experiment / "ablation.md").read_text()
    assert "± " in text and "40.05" in text
    # The table is rewritten from the folder alone.
    (experiment / "ablation.md").unlink()
    assert ablate.main(["--paper", "abaw5", "--rows", "ssl_dtm_fer,ssl_dtm_ms1mv2,postprocess",
                        "--table", str(experiment)]) == 0
    assert (experiment / "ablation.md").read_text() == text

