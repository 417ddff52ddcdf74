"""The thin entry points: `jobs.ingest`, `jobs.split` and the embedded default `jobs.demo`."""

from __future__ import annotations

import json
import os

import pytest

from jobs import demo as demo_job
from jobs import ingest as ingest_job
from jobs import split as split_job
from pipeline.data import schema, shards
from pipeline.data.split import load_split
from pipeline.demo.corpus import PRESETS, write_demo_corpus


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    corpus = write_demo_corpus(str(folder), PRESETS["tiny"])
    return str(folder), corpus.counts


@pytest.mark.slow
def test_ingest_and_split_commands(tiny_corpus, tmp_path, capsys):
    root, counts = tiny_corpus
    out = tmp_path / "shards"
    for source in schema.SOURCES:
        code = ingest_job.main([source, "--root", os.path.join(root, source), "--out", str(out),
                                "--executor", "local"])
        assert code == 0
        assert f"{source}:" in capsys.readouterr().out
    ms1mv2 = shards.Manifest.load(str(out / "ms1mv2"))
    assert ms1mv2.rows == counts["ms1mv2"]
    affectnet = shards.Manifest.load(str(out / "affectnet"))
    assert affectnet.rows + sum(affectnet.excluded.values()) == counts["affectnet"]

    assert split_job.main(["--shards", str(out), "--per-class", "4", "--seed", "1",
                           "--out", str(tmp_path / "split")]) == 0
    summary = load_split(str(tmp_path / "split"))
    assert summary.per_class == 4 and summary.seed == 1
    assert "per class" in capsys.readouterr().out


@pytest.mark.slow
def test_ms1mv2_fraction_and_seed(tiny_corpus, tmp_path):
    root, counts = tiny_corpus
    arguments = ["ms1mv2", "--root", os.path.join(root, "ms1mv2"), "--executor", "local",
                 "--fraction", "0.3333"]
    assert ingest_job.main(arguments + ["--out", str(tmp_path / "a"), "--seed", "0"]) == 0
    assert ingest_job.main(arguments + ["--out", str(tmp_path / "b"), "--seed", "0"]) == 0
    first = shards.Manifest.load(str(tmp_path / "a" / "ms1mv2"))
    second = shards.Manifest.load(str(tmp_path / "b" / "ms1mv2"))
    assert first.rows == round(counts["ms1mv2"] * 0.3333)
    assert [entry.checksum for entry in first.files] == [entry.checksum for entry in second.files]
    assert first.inputs["fraction"] == 0.3333 and first.inputs["seed"] == 0


def test_unusable_root_exits_2_naming_it(tmp_path, capsys):
    code = ingest_job.main(["affwild2", "--root", str(tmp_path / "absent"), "--out",
                            str(tmp_path / "out"), "--executor", "local"])
    assert code == 2
    assert "absent" in capsys.readouterr().err


def test_fraction_is_only_for_ms1mv2(tmp_path):
    with pytest.raises(ValueError, match="ms1mv2 only"):
        ingest_job.main(["expw", "--root", str(tmp_path), "--out", str(tmp_path / "o"),
                         "--fraction", "0.5", "--executor", "local"])


def test_split_refuses_incomplete_shards(tmp_path, capsys):
    (tmp_path / "shards" / "affwild2").mkdir(parents=True)
    code = split_job.main(["--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "split")])
    assert code == 2
    assert "_manifest.json" in capsys.readouterr().err


@pytest.mark.ray
def test_demo_runs_end_to_end_and_reuses_its_corpus(tmp_path, capsys, local_ray):
    out = tmp_path / "demo"
    small_training = ["--train-set", "model.backbone=test_resnet", "--train-set", "data.image_size=32",
                      "--train-set", "run.epochs=1", "--train-set", "run.steps_per_epoch=2",
                      "--train-set", "data.labeled_batch=8"]
    small_temporal = [item for setting in ("temporal.model_dim=16", "temporal.heads=2", "temporal.steps=3",
                                           "temporal.epochs=1", "temporal.feedforward_dim=16")
                      for item in ("--temporal-set", setting)]
    assert demo_job.main(["--out", str(out), "--corpus-size", "tiny", "--per-class", "3",
                          *small_training, *small_temporal]) == 0
    printed = capsys.readouterr()
    # Downstream of training: inference with smoothing and a submission, the pseudo-label export,
    # the temporal refine and its ablation rows.
    assert "[infer]" in printed.out and (out / "inference" / "_manifest.json").exists()
    assert (out / "inference" / "submission.txt").read_text().startswith("image_location,Neutral,")
    assert (out / "pseudolabels" / "_manifest.json").exists()
    assert "== ablation" in printed.out and "temporal+smoothing" in printed.out
    assert (out / "runs" / "demo_temporal" / "metrics.json").exists()
    assert "== split ==" in printed.out and "ms1mv2:" in printed.out
    assert "[ingest affwild2]" in printed.err  # progress output
    assert "== train demo_abaw5_dtm (dtm) ==" in printed.out and "validation macro-F1" in printed.out
    assert "chosen on the selection half" in printed.out and "pseudo labels (last epoch):" in printed.out
    assert (out / "runs" / "demo_abaw5_dtm" / "metrics.json").exists()
    # The supervised warm-up, then the recipe and its control from it, compared side by side.
    assert "== warm-up: train demo_seed002_supervised" in printed.out
    assert "== control: train demo_abaw5_dtm with data.use_unlabeled=false" in printed.out
    assert "== comparison" in printed.out and "control: dtm, use_unlabeled=false" in printed.out
    assert (out / "runs" / "demo_warmup_supervised" / "metrics.json").exists()
    assert len(list((out / "runs" / "demo_warmup_supervised").glob("warm_start-*.pt"))) == 1
    control = json.loads((out / "runs" / "demo_abaw5_dtm_control" / "metrics.json").read_text())
    assert control["config"]["data"]["use_unlabeled"] is False
    ssl = json.loads((out / "runs" / "demo_abaw5_dtm" / "metrics.json").read_text())
    assert ssl["config"]["model"]["pretrained_path"] == control["config"]["model"]["pretrained_path"]
    assert ssl["config"]["model"]["pretrained_head"] is True
    assert json.loads((out / demo_job.DOWNSTREAM_STAMP).read_text())["run"].endswith("demo_abaw5_dtm")
    for source in schema.SOURCES:
        assert shards.Manifest.load(str(out / "shards" / source)).rows > 0
    stamp = json.loads((out / "corpus" / demo_job.CORPUS_STAMP).read_text())
    assert stamp["ms1mv2_images"] == PRESETS["tiny"].ms1mv2_images
    first = shards.Manifest.load(str(out / "split" / "labeled"))

    assert demo_job.main(["--out", str(out), "--corpus-size", "tiny", "--per-class", "3",
                          "--train-recipe", "none"]) == 0
    assert "reusing corpus" in capsys.readouterr().out
    second = shards.Manifest.load(str(out / "split" / "labeled"))
    assert [entry.checksum for entry in second.files] == [entry.checksum for entry in first.files]


def test_demo_prints_pseudo_label_quality_per_class():
    import torch

    from pipeline.core.pseudo_label_quality import add_counts, empty_counts, quality_report

    counts = empty_counts()
    add_counts(counts, torch.tensor([0, 0, 4, -1]), torch.tensor([0, 4, 4, 1]),
               torch.tensor([True, True, False, True]), torch.tensor([1, 1, 2, 3]))
    text = demo_job.pseudo_label_lines(quality_report(counts))
    assert text.splitlines()[0] == ("pseudo labels (last epoch): 2 of 3 rows with a hidden label accepted "
                                    "(66.7%), accuracy 50.0%; 1 of 1 rows without a label accepted")
    assert "  Neutral           1      1.00     1.00" in text.splitlines()
    assert "  Happiness         1      0.00     0.00" in text.splitlines()
    assert demo_job.pseudo_label_lines(None).endswith("none accepted among rows with a hidden label")
