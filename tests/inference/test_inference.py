"""Batch inference and pseudo-label export: loading checkpoints, `predict_rows` against the
trainer's own prediction, the per-file collector, per-video outputs, and the jobs on a local Ray
(single-process equivalence, a killed run re-run, resume by shard, the loop back into training)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import smoothing
from pipeline.data import schema, shards, split, storage
from pipeline.data.pseudo_labels import read_accepted
from pipeline.data.schema import ACCEPTED, CONFIDENCE, DECODED, FEATURES, PREDICTED, THRESHOLD
from pipeline.inference import submission
from pipeline.inference.predict import load_frame_model, predict_rows, probabilities_of, resolve_checkpoint
from pipeline.inference.prediction_files import PATH_COLUMN, FileCollector, InputFile, RowFilter, is_done
from pipeline.inference.pseudo_labels import mark_accepted, summarise
from pipeline.inference.videos import SMOOTHED, add_smoothed, video_file, write_videos
from pipeline.training import checkpoint
from pipeline.training.config import load_config
from pipeline.training.data import read_validation
from pipeline.training.evaluate import predict_table
from pipeline.training.loop import Trainer

from conftest import build_tiny_split, make_jpeg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config_mapping(split_dir: str, storage_folder: str) -> dict:
    return {
        "method": "dtm", "method_options": {"ema_decay": 0.5},
        "model": {"backbone": "test_resnet", "channels_last": False},
        "data": {"split": split_dir, "image_size": 32, "labeled_batch": 8, "unlabeled_ratio": 1,
                 "shuffle_buffer": 64},
        "evaluation": {"windows": [5], "batch_size": 64},
        "run": {"name": "frame", "storage": storage_folder, "epochs": 2, "steps_per_epoch": 3},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny split and a 2-epoch DTM run on it (its thresholds have moved)."""
    root = tmp_path_factory.mktemp("inference")
    split_dir = build_tiny_split(root)
    mapping = config_mapping(split_dir, str(root / "runs"))
    Trainer(load_config(base=mapping)).fit()
    return {"root": root, "split": split_dir, "shards": str(root / "shards"), "mapping": mapping,
            "run": str(root / "runs" / "frame")}


# ------------------------------------------------------------------ checkpoints and predict_rows

@pytest.mark.slow
def test_resolve_checkpoint_finds_every_layout(trained, tmp_path):
    run = trained["run"]
    newest = resolve_checkpoint(run)
    assert newest.endswith("epoch-0002.pt")
    assert resolve_checkpoint(newest) == newest
    # A Ray Train run folder: checkpoint_* folders, each with checkpoints/epoch-NNNN.pt.
    for name, epoch in (("checkpoint_2026-01-01_a", 1), ("checkpoint_2026-01-01_b", 3)):
        os.makedirs(tmp_path / name / "checkpoints")
        shutil.copy(newest, tmp_path / name / "checkpoints" / checkpoint.checkpoint_name(epoch))
    assert resolve_checkpoint(str(tmp_path)).endswith("checkpoint_2026-01-01_b/checkpoints/epoch-0003.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint here"):
        resolve_checkpoint(str(tmp_path / "checkpoint_2026-01-01_a" / "checkpoints"))
    with pytest.raises(FileNotFoundError, match="no such"):
        resolve_checkpoint(str(tmp_path / "missing.pt"))


@pytest.mark.slow
def test_predict_rows_equals_the_trainers_own_prediction(trained):
    model = load_frame_model(trained["run"])
    assert model.run_id == "frame@epoch-0002" and model.epoch == 2
    trainer = Trainer(load_config(base=trained["mapping"]))
    assert trainer.resume_if_possible()
    validation = read_validation(trained["split"])
    expected = predict_table(validation, trainer.method.predict, trainer.inputs.evaluation_images, 64)
    table = pa.concat_tables([storage.read_parquet(uri) for uri in shards.Manifest.load(
        storage.join(trained["split"], split.VALIDATION)).file_uris(storage.join(trained["split"], split.VALIDATION))])
    rows = predict_rows(model, table)
    assert rows[schema.SAMPLE_ID].to_pylist() == validation.sample_ids
    np.testing.assert_allclose(probabilities_of(rows), expected, rtol=1e-5, atol=1e-6)
    assert rows[PREDICTED].to_numpy().tolist() == expected.argmax(axis=1).tolist()
    np.testing.assert_allclose(rows[CONFIDENCE].to_numpy(), expected.max(axis=1), rtol=1e-6)
    # The thresholds are the trained method's, not the initial constant.
    thresholds = model.thresholds()
    assert thresholds.shape == (8,)
    assert np.allclose(thresholds, trainer.method.thresholds().double().numpy())


@pytest.mark.slow
def test_features_come_with_the_same_probabilities_and_undecodable_rows_are_kept(trained):
    model = load_frame_model(trained["run"])
    images = [make_jpeg(index, (40, 40)) for index in range(5)]
    images[2] = b"broken"
    table = pa.table({schema.SAMPLE_ID: [f"id{index}" for index in range(5)],
                      schema.IMAGE: pa.array(images, pa.binary())})
    plain = predict_rows(model, table)
    with_features = predict_rows(model, table, with_features=True)
    np.testing.assert_allclose(probabilities_of(with_features), probabilities_of(plain), rtol=1e-5, atol=1e-6)
    features = np.asarray(with_features[FEATURES].to_pylist(), np.float32)
    assert features.shape[0] == 5 and features.shape[1] > 0
    assert plain[DECODED].to_pylist() == [True, True, False, True, True]
    assert plain[PREDICTED][2].as_py() == -1 and not probabilities_of(plain)[2].any()
    assert not features[2].any() and features[0].any()
    # A batch whose rows all fail to decode keeps the column's type (fixed-size lists of the
    # network's width), so it concatenates with the others into one file.
    broken = predict_rows(model, table.slice(2, 1), with_features=True)
    assert broken[FEATURES].type == with_features[FEATURES].type
    assert pa.concat_tables([with_features, broken]).num_rows == 6
    assert not np.asarray(broken[FEATURES].to_pylist()).any()


# ------------------------------------------------------------------ pure outputs

def test_mark_accepted_uses_the_predicted_class_threshold():
    table = pa.table({schema.SOURCE: [schema.EXPW, schema.EXPW, schema.MS1MV2, schema.AFFECTNET],
                      schema.LABEL: pa.array([0, 4, -1, 2], pa.int8()),
                      PREDICTED: pa.array([0, 1, 1, -1], pa.int64()),
                      CONFIDENCE: pa.array([0.5, 0.9, 0.6, 0.0], pa.float32()),
                      DECODED: [True, True, True, False]})
    thresholds = np.array([0.4, 0.7, 0, 0, 0, 0, 0, 0.99])
    marked = mark_accepted(table, thresholds, "run@epoch-0001", inclusive=False)
    assert marked[ACCEPTED].to_pylist() == [True, True, False, False]
    assert marked[THRESHOLD].to_pylist()[:3] == pytest.approx([0.4, 0.7, 0.7])
    assert marked[THRESHOLD][3].as_py() != marked[THRESHOLD][3].as_py()  # NaN: no class
    summary = summarise([marked, marked])
    assert summary["rows"] == 8 and summary["accepted"] == 4 and summary["undecodable"] == 2
    assert summary["accepted_per_class"]["Neutral"] == 2 and summary["accepted_per_class"]["Anger"] == 2
    assert summary["acceptance_rate"] == 0.5
    # Against the hidden labels: of 3 labeled rows (twice), the Neutral one is accepted and right,
    # the Happiness one accepted as Anger, the undecodable AffectNet one rejected.
    quality = summary["quality"]
    assert quality["rows_with_hidden_label"] == 6 and quality["accepted"] == 4
    assert quality["accuracy"] == 0.5
    assert quality["per_class"]["Neutral"]["precision"] == 1.0
    assert quality["per_class"]["Anger"]["precision"] == 0.0
    assert quality["per_class"]["Happiness"]["coverage"] == 1.0
    assert quality["per_class"]["Happiness"]["recall"] == 0.0
    assert quality["per_class"]["Disgust"]["coverage"] == 0.0
    assert quality["unknown"] == {"rows": 2, "accepted": 0, "accepted_per_class": dict.fromkeys(schema.CLASS_NAMES, 0)}
    assert set(quality["per_source"]) == {schema.EXPW, schema.MS1MV2, schema.AFFECTNET}


def dtm_training_rule(probabilities, thresholds):
    """DTM's acceptance in training (`DTM.train_step`'s call)."""
    from pipeline.core.thresholds import select_pseudo_labels
    from pipeline.methods import find_method

    return select_pseudo_labels(probabilities, thresholds, inclusive=find_method("dtm").acceptance_inclusive)


def mutexmatch_training_rule(probabilities, thresholds):
    from pipeline.methods.mutexmatch import split_by_confidence

    return split_by_confidence(probabilities, thresholds)


@pytest.mark.parametrize("method, training_rule, expected", [
    ("dtm", dtm_training_rule, [False, False, False, False, True]),
    ("mutexmatch", mutexmatch_training_rule, [True, True, True, False, True]),
])
def test_the_export_accepts_exactly_what_the_method_accepts_in_training(method, training_rule, expected):
    """At a confidence exactly equal to its class threshold, DTM (strict, its paper) rejects and
    MutexMatch (eq. 2, "≥") accepts; the export must decide as the method's own training code
    does, on both sides of every threshold."""
    import torch

    from pipeline.methods import find_method

    thresholds = np.array([0.5, 0.625, 0.75, 0.5, 0.5, 0.5, 0.5, 0.5])
    confidences = [0.5, 0.625, 0.75, 0.4, 0.875]  # three exactly at their threshold
    predicted = [0, 1, 2, 3, 4]
    probabilities = np.full((5, 8), 0.0)
    for row, (label, confidence) in enumerate(zip(predicted, confidences)):
        probabilities[row] = (1 - confidence) / 7
        probabilities[row, label] = confidence
    trained = training_rule(torch.tensor(probabilities, dtype=torch.float64), torch.tensor(thresholds))
    assert trained.mask.tolist() == expected
    table = pa.table({PREDICTED: pa.array(predicted, pa.int64()),
                      CONFIDENCE: pa.array(confidences, pa.float64()), DECODED: [True] * 5})
    exported = mark_accepted(table, thresholds, "run", find_method(method).acceptance_inclusive)
    assert exported[ACCEPTED].to_pylist() == expected


def test_file_collector_writes_complete_files_only_and_refuses_duplicates(tmp_path):
    out = str(tmp_path / "out")
    inputs = [InputFile(uri="/data/a.parquet", relative="src/a.parquet", rows=3),
              InputFile(uri="/data/b.parquet", relative="src/b.parquet", rows=2)]
    identity = {"checkpoint": "x"}
    collector = FileCollector(out, inputs, identity)

    def rows(path, ids):
        return pa.table({schema.SAMPLE_ID: ids, PATH_COLUMN: [path] * len(ids)})

    collector.add(rows("/data/a.parquet", ["a3", "a1"]))
    assert not os.path.exists(tmp_path / "out" / "src" / "a.parquet")
    collector.add(pa.concat_tables([rows("/data/b.parquet", ["b1"]), rows("/data/a.parquet", ["a2"])]))
    written = pq.read_table(tmp_path / "out" / "src" / "a.parquet")
    assert written[schema.SAMPLE_ID].to_pylist() == ["a1", "a2", "a3"]
    assert PATH_COLUMN not in written.column_names
    assert is_done(out, inputs[0], identity) and not is_done(out, inputs[0], {"checkpoint": "y"})
    assert not is_done(out, inputs[1], identity)
    with pytest.raises(RuntimeError, match=r"/data/b.parquet \(1/2 rows\)"):
        collector.check_complete(inputs)
    collector.add(rows("/data/b.parquet", ["b2"]))
    collector.check_complete(inputs)
    with pytest.raises(ValueError, match="duplicates"):
        FileCollector(out, inputs, identity).add(rows("/data/b.parquet", ["b1", "b2", "b3"]))
    with pytest.raises(ValueError, match="not one of this run's inputs"):
        collector.add(rows("/data/c.parquet", ["c1"]))


def test_video_outputs_smooth_within_videos_and_replace_stale_files(tmp_path):
    videos = ["v1"] * 6 + ["v/2"] * 4
    frames = list(range(1, 7)) + [1, 2, 3, 4]
    predicted = [0, 1, 0, 0, 2, 0, 1, 1, 0, 1]
    table = pa.table({schema.VIDEO: videos, schema.FRAME: frames, PREDICTED: pa.array(predicted, pa.int64())})
    smoothed = add_smoothed(table, 3, smoothing.CENTRED)[SMOOTHED].to_pylist()
    expected = np.concatenate([smoothing.smooth_labels(np.array(predicted[:6]), 3),
                               smoothing.smooth_labels(np.array(predicted[6:]), 3)])
    assert smoothed == expected.tolist()
    out = str(tmp_path)
    os.makedirs(tmp_path / "videos")
    (tmp_path / "videos" / "old.parquet").write_bytes(b"stale")
    sorted_table = add_smoothed(table, 3, smoothing.CENTRED).sort_by([(schema.VIDEO, "ascending"),
                                                                      (schema.FRAME, "ascending")])
    files = write_videos(out, sorted_table, "run@epoch-0001")
    assert sorted(files) == ["videos/v1.parquet", "videos/v_2.parquet"]
    assert sorted(os.listdir(tmp_path / "videos")) == ["v1.parquet", "v_2.parquet"]
    assert pq.read_table(tmp_path / "videos" / "v_2.parquet")[schema.FRAME].to_pylist() == [1, 2, 3, 4]
    assert video_file("..") == "video___.parquet" and "/" not in video_file("a/../b")


# ------------------------------------------------------------------ the jobs on a local Ray

def run_infer(trained, out: str, *extra: str) -> dict:
    from jobs import infer

    annotations = os.path.join(str(trained["root"]), "corpus", schema.AFFWILD2)
    frame_list = [os.path.join(root, name) for root, _, names in os.walk(annotations)
                  for name in names if "Validation_Set" in root]
    assert frame_list
    code = infer.main(["--checkpoint", trained["run"], "--shards", f"{trained['shards']}/{schema.AFFWILD2}",
                       "--out", out, "--window", "5",
                       "--submission", os.path.dirname(frame_list[0]), *extra])
    assert code == 0
    with open(os.path.join(out, "_manifest.json")) as handle:
        return json.load(handle)


def output_tables(out: str) -> dict[str, pa.Table]:
    found = {}
    for root, _, names in os.walk(out):
        for name in names:
            if name.endswith(".parquet"):
                path = os.path.join(root, name)
                found[os.path.relpath(path, out)] = pq.read_table(path)
    return found


@pytest.fixture(scope="module")
def uninterrupted(local_ray, trained):
    out = str(trained["root"] / "infer-uninterrupted")
    return out, run_infer(trained, out)


@pytest.mark.ray
def test_infer_equals_single_process_prediction_and_writes_the_submission(uninterrupted, trained):
    out, manifest = uninterrupted
    model = load_frame_model(trained["run"])
    shard_folder = f"{trained['shards']}/{schema.AFFWILD2}"
    frames = pa.concat_tables([storage.read_parquet(uri) for uri in shards.Manifest.load(shard_folder).file_uris(shard_folder)])
    expected = predict_rows(model, frames)
    expected_by_id = dict(zip(expected[schema.SAMPLE_ID].to_pylist(), probabilities_of(expected)))

    videos = [table for name, table in output_tables(out).items() if name.startswith("videos/")]
    assert len(videos) == manifest["videos"] > 1
    combined = pa.concat_tables(videos)
    assert combined.num_rows == frames.num_rows == manifest["frames"]
    assert len(set(combined[schema.SAMPLE_ID].to_pylist())) == combined.num_rows
    got = probabilities_of(combined)
    want = np.stack([expected_by_id[sample_id] for sample_id in combined[schema.SAMPLE_ID].to_pylist()])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for table in videos:
        assert table[schema.FRAME].to_pylist() == sorted(table[schema.FRAME].to_pylist())
        assert set(table["run_id"].to_pylist()) == {"frame@epoch-0002"}
        assert table[SMOOTHED].to_pylist() == smoothing.smooth_labels(table[PREDICTED].to_numpy(), 5).tolist()

    # Labeled input: macro-F1 raw and smoothed, as the metrics module computes them.
    from pipeline.core import metrics

    targets = combined[schema.LABEL].to_numpy()
    assert manifest["scores"]["raw"]["macro_f1"] == pytest.approx(
        metrics.macro_f1(targets, combined[PREDICTED].to_numpy()))
    assert manifest["scores"]["smoothed"]["macro_f1"] == pytest.approx(
        metrics.macro_f1(targets, combined[SMOOTHED].to_numpy()))

    # The submission: every annotated validation frame, exact header, labels from the smoothed ones.
    wanted, labels = submission.read_submission(os.path.join(out, "submission.txt"))
    with open(os.path.join(out, "submission.txt")) as handle:
        assert handle.readline().rstrip("\n") == \
            "image_location,Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
    assert len(wanted) == manifest["submission"]["frames"]
    smoothed_of = {(video, frame): label for video, frame, label in zip(
        combined[schema.VIDEO].to_pylist(), combined[schema.FRAME].to_pylist(), combined[SMOOTHED].to_pylist())}
    exact = [(frame, label) for frame, label in zip(wanted, labels.tolist()) if frame in smoothed_of]
    validation_frames = int(np.sum(combined[schema.SPLIT].to_numpy(zero_copy_only=False) == schema.VALIDATION))
    assert len(exact) == manifest["submission"]["exact"] == validation_frames > 0
    assert all(smoothed_of[frame] == label for frame, label in exact)


CRASHING_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from pipeline.inference import prediction_files
    original = prediction_files.FileCollector._write
    def write_then_die(self, item):
        original(self, item)
        if len(self.written) == 1:  # a real kill, of the whole local job, after one file
            os.killpg(os.getpgrp(), signal.SIGKILL)
    prediction_files.FileCollector._write = write_then_die
    from jobs import infer
    sys.exit(infer.main(sys.argv[1:]))
""")


@pytest.mark.ray
def test_a_killed_infer_rerun_gives_the_uninterrupted_result(uninterrupted, trained, tmp_path):
    reference, _ = uninterrupted
    out = str(tmp_path / "infer-killed")
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_RUN.format(root=ROOT))
    command = [sys.executable, str(script), "--checkpoint", trained["run"],
               "--shards", f"{trained['shards']}/{schema.AFFWILD2}", "--out", out, "--window", "5"]
    environment = dict(os.environ, RAY_ADDRESS="")  # its own local Ray, killed with it
    environment.pop("RAY_ADDRESS")
    process = subprocess.run(command, start_new_session=True, env=environment, capture_output=True,
                             timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
    assert not os.path.exists(os.path.join(out, "_manifest.json"))  # nothing claims completeness
    partial = output_tables(out)
    assert len(partial) == 1 and all(name.startswith("frames/") for name in partial)

    manifest = run_infer(trained, out)
    assert manifest["skipped_done_files"] == 1
    done, expected = output_tables(out), output_tables(reference)
    assert sorted(done) == sorted(expected)
    for name, table in expected.items():
        again = done[name]
        assert again[schema.SAMPLE_ID].to_pylist() == table[schema.SAMPLE_ID].to_pylist(), name
        assert again[PREDICTED].to_pylist() == table[PREDICTED].to_pylist(), name
        np.testing.assert_allclose(probabilities_of(again), probabilities_of(table), rtol=1e-5, atol=1e-6)
    with open(os.path.join(out, "submission.txt")) as mine, \
            open(os.path.join(reference, "submission.txt")) as theirs:
        assert mine.read() == theirs.read()


@pytest.mark.ray
def test_pseudolabel_export_resumes_by_shard_and_feeds_training(local_ray, trained, tmp_path):
    from jobs import pseudolabel

    out = str(tmp_path / "pseudo")
    arguments = ["--checkpoint", trained["run"], "--split", trained["split"], "--out", out,
                 "--confidence", "0.15"]
    assert pseudolabel.main(arguments) == 0
    manifest = storage.read_json(os.path.join(out, "_manifest.json"))
    pool = split.load_unlabeled_pool(trained["split"])
    tables = [storage.read_parquet(os.path.join(out, entry["path"])) for entry in manifest["files"]]
    combined = pa.concat_tables(tables)
    assert combined.num_rows == manifest["rows"] == pool.rows
    assert not set(combined[schema.SAMPLE_ID].to_pylist()) & set(pool.excluded_ids.to_pylist())
    accepted = combined[ACCEPTED].to_numpy(zero_copy_only=False)
    confidence = combined[CONFIDENCE].to_numpy()
    assert accepted.tolist() == ((confidence >= np.float32(0.15)) & combined[DECODED].to_numpy(zero_copy_only=False)).tolist()
    assert 0 < manifest["accepted"] == int(accepted.sum())
    assert sum(manifest["accepted_per_class"].values()) == manifest["accepted"]
    assert manifest["threshold_source"] == "fixed" and manifest["run_id"] == "frame@epoch-0002"
    # Pseudo-label quality against the labels the split hid, recomputed from the files.
    hidden = combined[schema.LABEL].to_numpy().astype(np.int64)
    predicted = combined[PREDICTED].to_numpy()
    scored = accepted & (hidden >= 0)
    quality = manifest["quality"]
    assert quality["rows_with_hidden_label"] == int((hidden >= 0).sum()) > 0
    assert quality["unknown"]["rows"] == int((hidden < 0).sum()) > 0  # MS1MV2 and -1 frames
    assert quality["accepted"] == int(scored.sum()) > 0
    assert quality["accuracy"] == pytest.approx(float((predicted[scored] == hidden[scored]).mean()))
    before = {entry["path"]: open(os.path.join(out, entry["path"]), "rb").read() for entry in manifest["files"]}

    # A re-run skips every file (same checkpoint and thresholds) and leaves them as they were.
    assert pseudolabel.main(arguments) == 0
    again = storage.read_json(os.path.join(out, "_manifest.json"))
    assert again["skipped_done_files"] == len(manifest["files"]) and again["predicted_files"] == 0
    assert {path: open(os.path.join(out, path), "rb").read() for path in before} == before
    # The checkpoint's own (DTM) thresholds are a different export: every file is predicted again.
    assert pseudolabel.main(arguments[:-2]) == 0
    own = storage.read_json(os.path.join(out, "_manifest.json"))
    assert own["threshold_source"] == "checkpoint" and own["predicted_files"] == len(manifest["files"])
    assert own["thresholds"] == pytest.approx(load_frame_model(trained["run"]).thresholds().tolist())
    assert pseudolabel.main(arguments) == 0  # back to the fixed threshold for the loop below

    # Closing the loop: accepted rows join the labeled training set with their pseudo labels.
    rows = read_accepted(out)
    assert rows.num_rows == manifest["accepted"]
    assert rows[schema.IMAGE].null_count == 0
    by_id = dict(zip(combined[schema.SAMPLE_ID].to_pylist(), combined[PREDICTED].to_pylist()))
    assert all(by_id[sample_id] == label for sample_id, label in
               zip(rows[schema.SAMPLE_ID].to_pylist(), rows[schema.LABEL].to_pylist()))
    assert read_accepted(out, per_class=1).num_rows <= 8
    mapping = dict(trained["mapping"], data=dict(trained["mapping"]["data"], labeled_pseudo_labels=out),
                   run=dict(trained["mapping"]["run"], name="looped", epochs=1, storage=str(tmp_path / "runs")))
    trainer = Trainer(load_config(base=mapping))
    assert len(trainer.training_set) == len(trainer.labeled) + manifest["accepted"]
    # The sampler draws from the joined set: some epoch indices point past the labeled rows.
    drawn = trainer.sampler.indices(0)
    assert drawn.max() < len(trainer.training_set)
    assert (drawn >= len(trainer.labeled)).any()
    trainer.fit()


def test_row_filter_selects_pool_and_subsets():
    table = pa.table({schema.SAMPLE_ID: ["a", "b", "c"], schema.SOURCE: [schema.AFFWILD2] * 3,
                      schema.SPLIT: ["train", "validation", "train"]})
    assert RowFilter(splits=["validation"])(table)[schema.SAMPLE_ID].to_pylist() == ["b"]
    assert RowFilter(excluded_ids=pa.array(["a"]))(table)[schema.SAMPLE_ID].to_pylist() == ["c"]
    assert RowFilter()(table).num_rows == 3 and not RowFilter().active



@pytest.mark.slow
def test_checkpoints_with_retired_config_keys_still_load_but_recipes_refuse_them(trained, tmp_path):
    from pipeline.config import ConfigError

    state = checkpoint.load(resolve_checkpoint(trained["run"]))
    config = json.loads(state["config"])
    config["data"]["decode_threads"] = 2  # what checkpoints written before 2026-11-23 carry
    state["config"] = json.dumps(config)
    old = tmp_path / "old.pt"
    torch_save(state, old)
    assert load_frame_model(str(old)).epoch == 2
    with pytest.raises(ConfigError, match="decode_threads"):
        load_config(base=config)


def torch_save(state: dict, path) -> None:
    import torch

    torch.save(state, path)


def test_an_actor_pool_that_would_hold_every_cpu_or_lacks_gpus_is_refused():
    from pipeline.config import ConfigError
    from pipeline.inference.config import InferenceConfig
    from pipeline.inference.ray_inference import check_pool_fits

    check_pool_fits(InferenceConfig(actors=2, cpus_per_actor=0.5), {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"= 2 CPUs plus one for the read tasks, the cluster has 2"):
        check_pool_fits(InferenceConfig(actors=2, cpus_per_actor=1.0), {"CPU": 2.0})
    gpu_pool = InferenceConfig(actors=4, cpus_per_actor=1.0, gpus_per_actor=0.5, device="cuda")
    check_pool_fits(gpu_pool, {"CPU": 8.0, "GPU": 2.0})
    with pytest.raises(ConfigError, match=r"= 2 GPUs, the cluster has 1"):
        check_pool_fits(gpu_pool, {"CPU": 8.0, "GPU": 1.0})


def test_the_device_decides_whether_actors_get_gpus():
    from pipeline.config import ConfigError
    from pipeline.inference.config import InferenceConfig, with_accelerators

    def decided(cluster_gpus: float, **settings) -> tuple[str, float]:
        resolved = with_accelerators(InferenceConfig(**settings), cluster_gpus)
        return resolved.device, resolved.gpus_per_actor

    assert decided(0.0) == ("cpu", 0.0)  # auto, no GPU anywhere
    assert decided(8.0) == ("cuda", 1.0)  # auto on a GPU cluster: GPU actors, not hidden GPUs
    assert decided(0.0, device="cuda") == ("cuda", 1.0)  # GPU nodes still scaled to zero
    assert decided(0.0, gpus_per_actor=0.25) == ("cuda", 0.25)
    assert decided(8.0, device="cpu") == ("cpu", 0.0)
    with pytest.raises(ConfigError, match="inference.gpus_per_actor"):
        InferenceConfig(device="cpu", gpus_per_actor=1.0)


class ScriptedCluster:
    """A cluster's resources over time: `nodes_after` polls, a node with 4 CPUs and 1 GPU joins."""

    def __init__(self, nodes_after: int | None) -> None:
        self.nodes_after, self.polls, self.now = nodes_after, 0, 0.0
        self.requests: list[list[dict]] = []

    def resources(self) -> dict[str, float]:
        self.polls += 1
        grown = self.nodes_after is not None and self.polls > self.nodes_after
        return {"CPU": 4.0, "GPU": 1.0} if grown else {}

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_pool_on_a_cluster_scaled_to_zero_asks_the_autoscaler_and_waits():
    from pipeline.config import ConfigError
    from pipeline.inference.config import InferenceConfig
    from pipeline.inference.ray_inference import wait_for_pool

    def wait(cluster: ScriptedCluster, can_grow: bool, **settings):
        return wait_for_pool(InferenceConfig(**settings), can_grow, resources=cluster.resources,
                             request=cluster.requests.append, poll_seconds=5.0,
                             clock=lambda: cluster.now, sleep=cluster.sleep)

    cluster = ScriptedCluster(nodes_after=3)
    resolved = wait(cluster, True, actors=2, cpus_per_actor=1.0, device="cuda", gpus_per_actor=0.5)
    assert (resolved.device, resolved.gpus_per_actor) == ("cuda", 0.5)
    assert cluster.polls == 4 and cluster.now == 15.0
    # The pool's bundles (plus a CPU for the reads) are requested, renewed at every poll (another
    # job may have cleared the cluster's one request), then cleared.
    assert cluster.requests == [[{"CPU": 1.0, "GPU": 0.5}] * 2 + [{"CPU": 1.0}]] * 4 + [[]]

    never = ScriptedCluster(nodes_after=None)
    with pytest.raises(ConfigError, match=r"waited 60 s for the autoscaler .* 2 GPUs, the cluster has 0"):
        wait(never, True, actors=2, device="cuda", resource_wait_seconds=60)
    assert never.now == 60.0 and never.requests[-1] == []

    local = ScriptedCluster(nodes_after=3)  # a local Ray cannot grow: refused at once
    with pytest.raises(ConfigError, match="does not fit"):
        wait(local, False, actors=2)
    assert local.polls == 1 and local.requests == []
