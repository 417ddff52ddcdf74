"""The Ray Train adapter on a local Ray (2 CPU workers, gloo): the DTM threshold sync is global and
equals the single-process update, the replicas' parameter fingerprints agree before each
broadcast, the feedback coefficient is averaged, a SIGKILLed worker is restarted from the last
checkpoint, and re-running the job continues the run. The same Trainer without Ray, in gloo
groups, against one process: test_data_parallel.py."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os

import pytest
import torch
import yaml

from jobs import train as train_job
from pipeline.data import schema, split, storage
from pipeline.training import checkpoint
from pipeline.training.config import load_config
from pipeline.training.loop import METRICS_LINES, StepObserver, Trainer, worker_metrics_uri
from pipeline.training.ray_train import RESUME_PASS_METRIC, WorkerKill, build_trainer

from conftest import build_tiny_split

WORKERS = 2
STEPS = 3


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    return build_tiny_split(tmp_path_factory.mktemp("distributed"))


def settings(split_dir: str, storage: str, name: str, method: str = "dtm", epochs: int = 2,
             keep: int = 5, max_failures: int = 0) -> dict:
    method_options = {"ema_decay": 0.5} if method == "dtm" else {}
    return {
        "method": method,
        "method_options": method_options,
        "model": {"backbone": "test_resnet", "channels_last": False},
        "data": {"split": split_dir, "image_size": 32, "labeled_batch": 8, "unlabeled_ratio": 1,
                 "shuffle_buffer": 64},
        "evaluation": {"windows": [5], "batch_size": 64},
        "run": {"name": name, "storage": storage, "epochs": epochs, "steps_per_epoch": STEPS,
                "threads": 1, "checkpoints_to_keep": keep},
        "scaling": {"num_workers": WORKERS, "cpus_per_worker": 0.5, "max_failures": max_failures},
    }


def read_lines(path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle.read().splitlines()]


def worker_records(run: str) -> list[list[dict]]:
    return [read_lines(worker_metrics_uri(run, rank)) for rank in range(WORKERS)]


def ray_checkpoints(run: str) -> dict[int, str]:
    """Epoch -> Ray checkpoint folder (each holds rank 0's checkpoints/epoch-NNNN.pt)."""
    found = {}
    for path in glob.glob(os.path.join(run, "checkpoint_*", checkpoint.CHECKPOINT_FOLDER, "epoch-*.pt")):
        folder = os.path.dirname(os.path.dirname(path))
        epoch = checkpoint.list_checkpoints(folder)[-1]
        assert epoch not in found, f"epoch {epoch} checkpointed twice: {found[epoch]}, {folder}"
        found[epoch] = folder
    return found


def load_epoch(run: str, epoch: int) -> dict:
    return checkpoint.load(checkpoint.latest(ray_checkpoints(run)[epoch]))


def single_process_update(mapping: dict, after: dict, before_threshold: dict | None,
                          folder: str) -> torch.Tensor:
    """One process, whole labeled set: load the networks of `after`, put the threshold back to its
    state before that epoch's update (None: the initial one), apply the update, return it."""
    mapping = {**mapping, "scaling": {"num_workers": 0}}
    trainer = Trainer(load_config(base=mapping), run_folder=folder, save_checkpoints=False)
    initial = trainer.method.state_dict()["threshold"]
    trainer.load_state(after)
    method_state = dict(after["method"], threshold=before_threshold or initial)
    trainer.method.load_state_dict(method_state)
    trainer.update_thresholds()
    return trainer.method.state_dict()["threshold"]["thresholds"]


# ------------------------------------------------------------------ Ray Train (local Ray, 2 workers)

@pytest.fixture(scope="module")
def dtm_job(local_ray, tiny_split, tmp_path_factory):
    """`jobs.train` twice with the same run name: 1 epoch, then asked for 2."""
    storage = str(tmp_path_factory.mktemp("runs"))
    recipe = os.path.join(storage, "recipe.yaml")
    mapping = settings(tiny_split, storage, "dtm")
    with open(recipe, "w") as handle:
        yaml.safe_dump(mapping, handle)
    run = os.path.join(storage, "dtm")
    outputs = []
    for epochs in (1, 2):
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            code = train_job.main(["--config", recipe, "--set", f"run.epochs={epochs}"])
        assert code == 0, captured.getvalue()
        outputs.append({"summary": json.loads(captured.getvalue().strip().splitlines()[-1]),
                        "metrics": read_lines(os.path.join(run, METRICS_LINES)),
                        "checkpoints": ray_checkpoints(run)})
    return {"mapping": mapping, "run": run, "first": outputs[0], "second": outputs[1]}


@pytest.mark.ray
def test_rerunning_the_job_continues_the_run(dtm_job):
    first, second = dtm_job["first"], dtm_job["second"]
    assert [record["epoch"] for record in first["metrics"]] == [1]
    assert [record["epoch"] for record in second["metrics"]] == [1, 2]
    assert [record["step"] for record in second["metrics"]] == [STEPS, 2 * STEPS]
    # Epoch 1 was not trained again: its record (timings included) and Ray checkpoint are the first run's.
    assert second["metrics"][0] == first["metrics"][0]
    assert sorted(second["checkpoints"]) == [1, 2]
    assert second["checkpoints"][1] == first["checkpoints"][1]
    assert second["summary"]["epochs"] == 2 and second["summary"]["run"] == "dtm"
    # The pool came through Ray Data (its stream state is (pass, batches)), one long-lived
    # iterator: the resumed run started a fresh pass, and counted every batch of it.
    state = load_epoch(dtm_job["run"], 2)["unlabeled"]
    pool_rows = split.load_unlabeled_pool(dtm_job["mapping"]["data"]["split"]).rows
    assert set(state) == {"pass_number", "batches"}
    assert pool_rows // WORKERS >= 2 * STEPS * 8  # each rank's share outlasts both runs' steps
    assert state == {"pass_number": 1, "batches": STEPS}
    assert second["summary"]["checkpoint"].endswith(os.path.basename(second["checkpoints"][2]))


@pytest.mark.ray
def test_thresholds_are_global_and_equal_the_single_process_update(dtm_job, tmp_path):
    run = dtm_job["run"]
    ranks = worker_records(run)
    for records in ranks:
        assert [record["epoch"] for record in records] == [1, 2]
    for epoch in range(2):
        assert ranks[0][epoch]["thresholds"] == ranks[1][epoch]["thresholds"]
    # The ranks trained on different data (their own losses differ), and the thresholds moved.
    assert any(ranks[0][epoch]["losses"]["loss"] != ranks[1][epoch]["losses"]["loss"] for epoch in range(2))
    # Yet the replicas took identical steps (averaged gradients): their parameters, read before
    # the epoch's rank-0 broadcast, agree to the last bit, and they moved between epochs.
    fingerprints = [[record["replica_fingerprint"] for record in records] for records in ranks]
    assert fingerprints[0] == fingerprints[1]
    assert fingerprints[0][0] != fingerprints[0][1]
    assert any(value != pytest.approx(0.8) for value in ranks[0][-1]["thresholds"])

    states = {epoch: load_epoch(run, epoch) for epoch in (1, 2)}
    for epoch, before in ((1, None), (2, states[1]["method"]["threshold"])):
        distributed = states[epoch]["method"]["threshold"]["thresholds"]
        assert distributed.float().tolist() == ranks[0][epoch - 1]["thresholds"]
        single = single_process_update(dtm_job["mapping"], states[epoch], before, str(tmp_path / str(epoch)))
        torch.testing.assert_close(single, distributed, rtol=1e-6, atol=1e-7)


@pytest.mark.ray
def test_feedback_coefficient_is_averaged_over_workers(local_ray, tiny_split, tmp_path):
    config = load_config(base=settings(tiny_split, str(tmp_path), "feedback", method="feedback"))
    result = build_trainer(config).fit()
    ranks = worker_records(str(tmp_path / "feedback"))
    assert [record["epoch"] for record in ranks[0]] == [record["epoch"] for record in ranks[1]] == [1, 2]
    for first, second in zip(*ranks):
        for name in ("feedback_coefficient", "feedback_raw"):
            assert first["losses"][name] == second["losses"][name], name
        assert first["losses"]["feedback_coefficient"] != 0.0
    assert any(first["losses"]["student_labeled_before"] != second["losses"]["student_labeled_before"]
               for first, second in zip(*ranks)), "both ranks saw the same labeled data"
    assert result.metrics["feedback_coefficient"] == ranks[0][-1]["losses"]["feedback_coefficient"]


class PoolRowsSeen(StepObserver):
    """Appends, per step and rank, the pass and the sample ids of the unlabeled rows the step
    trained on to `<folder>/rank-N.jsonl` (every attempt of the worker group appends)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def before_step(self, trainer, batch) -> None:
        drawn = trainer.inputs.current_unlabeled
        with open(os.path.join(self.folder, f"rank-{trainer.rank}.jsonl"), "a") as handle:
            handle.write(json.dumps({"step": trainer.global_step, "pass": drawn.pass_number,
                                     "ids": drawn.sample_ids}) + "\n")


@pytest.mark.ray
def test_a_killed_worker_restarts_from_the_last_checkpoint(local_ray, tiny_split, tmp_path):
    mapping = settings(tiny_split, str(tmp_path), "fault", epochs=3, max_failures=1)
    marker = tmp_path / "killed"
    seen_folder = tmp_path / "seen"
    seen_folder.mkdir()
    result = build_trainer(load_config(base=mapping),
                           kill_worker=WorkerKill(rank=1, epoch=2, marker=str(marker)),
                           step_observer=PoolRowsSeen(str(seen_folder))).fit()
    assert marker.exists(), "the worker was not killed"
    run = str(tmp_path / "fault")

    # The kill fell inside a pass over the pool (a pass spans more than an epoch's steps here),
    # and the pass-boundary rule held: the restored workers started the next pass, so no pool row
    # was drawn twice within one pass, though the steps after epoch 1 were trained twice.
    records = [read_lines(seen_folder / f"rank-{rank}.jsonl") for rank in range(WORKERS)]
    pool = split.load_unlabeled_pool(tiny_split)
    per_rank_pass = pool.rows // WORKERS // (8 * 1)  # whole batches of 8 a rank can take per pass
    assert per_rank_pass > STEPS, "a pass must span more than one epoch for this test"
    restart = [next(index for index in range(1, len(rank_records))
                    if rank_records[index]["step"] <= rank_records[index - 1]["step"])
               for rank_records in records]
    killed_pass = records[0][restart[0] - 1]["pass"]
    resumed_pass = records[0][restart[0]]["pass"]
    assert records[0][restart[0]]["step"] == STEPS  # restarted after epoch 1's checkpoint
    assert killed_pass == 0 and resumed_pass == 1  # mid pass 0, resumed at the next boundary
    assert load_epoch(run, 1)["unlabeled"]["pass_number"] == 0
    snapshot = json.loads(open(os.path.join(run, "checkpoint_manager_snapshot.json")).read())
    epoch_one = next(entry for entry in snapshot["checkpoint_results"] if entry["metrics"]["epoch"] == 1)
    assert epoch_one["metrics"][RESUME_PASS_METRIC] == resumed_pass
    by_pass: dict[int, list[str]] = {}
    for rank_records in records:
        for record in rank_records:
            by_pass.setdefault(record["pass"], []).extend(record["ids"])
    pool_ids = set()
    for uri in pool.file_uris:
        table = storage.read_parquet(uri, [schema.SAMPLE_ID, schema.SOURCE, schema.SPLIT])
        pool_ids.update(table.filter(split.unlabeled_mask(table, pool.excluded_ids))[schema.SAMPLE_ID].to_pylist())
    assert sorted(by_pass) == [0, 1]
    for number, ids in by_pass.items():
        assert len(ids) == len(set(ids)), f"pass {number}: {len(ids) - len(set(ids))} rows drawn twice"
        assert set(ids) <= pool_ids

    # Ray registered each epoch once: 1 before the kill, 2 and 3 after the restart from 1.
    assert list(result.metrics_dataframe["epoch"]) == [1, 2, 3]
    assert sorted(ray_checkpoints(run)) == [1, 2, 3]
    assert [record["epoch"] for record in read_lines(os.path.join(run, METRICS_LINES))] == [1, 2, 3]
    for records in worker_records(run):
        assert [record["step"] for record in records] == [STEPS, 2 * STEPS, 3 * STEPS]
    for name in ("epoch", "loss", "macro_f1", "macro_f1_smoothed_5", "pseudo_label_acceptance_rate",
                 "images_per_second", "images_per_second_total", "threshold_neutral", "f1_neutral"):
        assert name in result.metrics, name
    assert result.metrics["epoch"] == 3

    # After the restart the threshold continued from epoch 1's, not from the initial one.
    states = {epoch: load_epoch(run, epoch) for epoch in (1, 2, 3)}
    restored = states[1]["method"]["threshold"]
    assert any(value != pytest.approx(0.8) for value in restored["thresholds"].tolist())
    single = single_process_update(mapping, states[2], restored, str(tmp_path / "single"))
    torch.testing.assert_close(single, states[2]["method"]["threshold"]["thresholds"], rtol=1e-6, atol=1e-7)
    assert states[3]["method"]["threshold"]["updates"] == 3
