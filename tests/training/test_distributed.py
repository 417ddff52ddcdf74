"""Data-parallel training against one process. Without Ray, in 2-process gloo groups: the torch
collectives, and one data-parallel step of 2 workers equals one single-process step on their
concatenated batches with the replicas identical after it, before the epoch's rank-0 broadcast
(supervised and DTM; this fails when gradients are not averaged). On a local Ray (2 CPU workers,
gloo), the Ray Train adapter: the DTM threshold sync is global and equals the single-process
update, the replicas' parameter fingerprints agree before each broadcast, the feedback coefficient
is averaged, a SIGKILLed worker is restarted from the last checkpoint, and re-running the job
continues the run."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import io
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as multiprocessing
import yaml
from torch import nn

from jobs import train as train_job
from pipeline.data import split
from pipeline.training import checkpoint
from pipeline.training.config import load_config
from pipeline.methods.base import MethodContext, StepResult, TrainBatch
from pipeline.training.gradients import average_gradients
from pipeline.training.loop import (METRICS_LINES, StepObserver, Trainer,
                                    synchronize_replicas, worker_metrics_uri)
from pipeline.training.distributed import TorchCollectives
from pipeline.training.ray_train import WorkerKill, build_trainer

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


# ------------------------------------------------------------------ collectives, no Ray (gloo x 2)

class _Replica:
    """A stand-in method for `synchronize_replicas`: networks with BatchNorm, a float64 threshold
    and an integer counter, different on each rank until synchronised."""

    def __init__(self, rank: int) -> None:
        torch.manual_seed(100 + rank)
        self.network = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.network(torch.randn(5, 3))  # rank-specific running statistics
        self.threshold = torch.rand(8, dtype=torch.float64)
        self.updates = torch.tensor(rank + 3)

    def state_dict(self) -> dict:
        return {"network": self.network.state_dict(), "threshold": self.threshold.clone(),
                "extra": [self.updates.clone(), 1.5]}

    def load_state_dict(self, state: dict) -> None:
        self.network.load_state_dict(state["network"])
        self.threshold = state["threshold"].clone()
        self.updates = state["extra"][0].clone()


def _collectives_worker(rank: int, world_size: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world_size)
    try:
        collectives = TorchCollectives()
        vector = torch.tensor([0.1, 1e-12, 3.0], dtype=torch.float64) * (rank + 1)
        summed = collectives.all_reduce_sum(vector)
        scalar = torch.tensor(rank + 0.5, dtype=torch.float32)
        mean = collectives.all_reduce_mean(scalar)

        present, partial, absent = (torch.zeros(2, requires_grad=True) for _ in range(3))
        present.grad = torch.full((2,), float(rank + 1))
        if rank == 1:
            partial.grad = torch.full((2,), 4.0)
        average_gradients([present, partial, absent], collectives)

        replica = _Replica(rank)
        before = replica.state_dict()
        synchronize_replicas(replica, collectives, rank)
        torch.save({"world_size": collectives.world_size, "vector": vector, "summed": summed,
                    "scalar": scalar, "mean": mean, "present": present.grad, "partial": partial.grad,
                    "absent": absent.grad, "before": before, "after": replica.state_dict()},
                   os.path.join(folder, f"rank-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_torch_collectives_in_a_two_process_gloo_group(tmp_path):
    multiprocessing.spawn(_collectives_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank-{rank}.pt", weights_only=False) for rank in range(2)]
    expected_sum = torch.tensor([0.1, 1e-12, 3.0], dtype=torch.float64) * 3
    for rank, result in enumerate(ranks):
        assert result["world_size"] == 2
        assert result["summed"].dtype == torch.float64
        torch.testing.assert_close(result["summed"], expected_sum, rtol=1e-15, atol=0)
        assert torch.equal(result["vector"], torch.tensor([0.1, 1e-12, 3.0], dtype=torch.float64)
                           * (rank + 1)), "the input was modified"
        assert result["mean"].shape == () and result["mean"].item() == pytest.approx(1.0)
        assert result["scalar"].item() == rank + 0.5
        assert torch.equal(result["present"], torch.full((2,), 1.5))
        assert torch.equal(result["partial"], torch.full((2,), 2.0))  # missing on rank 0 = zero
        assert result["absent"] is None
    # Rank 0's state everywhere, bit for bit, non-tensor values untouched.
    rank0_before = ranks[0]["before"]
    for result in ranks:
        after = result["after"]
        for key, value in rank0_before["network"].items():
            assert torch.equal(after["network"][key], value), key
        assert torch.equal(after["threshold"], rank0_before["threshold"])
        assert torch.equal(after["extra"][0], torch.tensor(3))
    assert not torch.equal(ranks[1]["before"]["threshold"], rank0_before["threshold"])


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


@pytest.mark.ray
def test_a_killed_worker_restarts_from_the_last_checkpoint(local_ray, tiny_split, tmp_path):
    mapping = settings(tiny_split, str(tmp_path), "fault", epochs=3, max_failures=1)
    marker = tmp_path / "killed"
    result = build_trainer(load_config(base=mapping),
                           kill_worker=WorkerKill(rank=1, epoch=2, marker=str(marker))).fit()
    assert marker.exists(), "the worker was not killed"
    run = str(tmp_path / "fault")

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


# ------------------------------------- data-parallel equivalence (2 processes, gloo, one step, no Ray)

class StepRecorder(StepObserver):
    """Records, on each worker, the first step's batch as `method.train_step` received it, the
    method's state before the step, and its network's parameters and gradients after it (the
    gradients the optimizer applied: averaged in place by the pre-step hook, cleared only at the
    next step) in `folder`/rank-N.pt. It only copies: the step itself, the gradient hook and the
    collectives are production code."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.before: dict | None = None

    def before_step(self, trainer: Trainer, batch: TrainBatch) -> None:
        if trainer.global_step == 0:
            self.before = {"step": trainer.global_step,
                           "batch": copy.deepcopy(batch),
                           "state": copy.deepcopy(trainer.method.state_dict())}

    def after_step(self, trainer: Trainer, batch: TrainBatch, result: StepResult) -> None:
        if self.before is None:
            return
        # Supervised and DTM train exactly `model` (its optimizer holds model.parameters()).
        named = list(trainer.method.model.named_parameters())
        after = {name: parameter.detach().clone() for name, parameter in named}
        gradients = {name: parameter.grad.clone() for name, parameter in named}
        torch.save({**self.before, "after": after, "gradients": gradients, "losses": result.losses},
                   os.path.join(self.folder, f"rank-{trainer.rank}.pt"))
        self.before = None


def concatenated(batches: list[TrainBatch]) -> TrainBatch:
    """The workers' batches as one batch, view by view, in rank order."""
    views = {}
    for field in dataclasses.fields(TrainBatch):
        parts = [getattr(batch, field.name) for batch in batches]
        views[field.name] = None if parts[0] is None else torch.cat(parts)
    return TrainBatch(**views)


def labelled(label: str):
    """An assert_close `msg` that keeps its mismatch report and says what was compared."""
    return lambda report: f"{label}: {report}"


def _data_parallel_worker(rank: int, world_size: int, folder: str, mapping: dict) -> None:
    """One worker of `one_data_parallel_step`: the Trainer as Ray Train's worker runs it (torch
    collectives, the overlapped gradient average, the start-of-run broadcast), in a gloo group."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world_size)
    try:
        torch.set_num_threads(1)
        Trainer(load_config(base=mapping), collectives=TorchCollectives(), rank=rank, world_size=world_size,
                run_folder=os.path.join(folder, "run"), save_checkpoints=False,
                step_observer=StepRecorder(os.path.join(folder, "steps"))).fit()
    finally:
        dist.destroy_process_group()


def one_data_parallel_step(split_dir: str, folder, method: str, method_options: dict) -> list[dict]:
    """Train 1 epoch of 1 step on 2 workers (the Trainer, its gradient hooks and torch collectives
    over gloo, in 2 processes; Ray Train runs the same Trainer per worker, and the Ray tests above
    cover its adapter); check that the replicas are identical after the step and equal one
    process's step on the concatenated batches. Returns each rank's StepRecorder record."""
    mapping = settings(split_dir, str(folder), method, method=method, epochs=1)
    mapping["method_options"].update(method_options)
    mapping["run"]["steps_per_epoch"] = 1  # so the recorded step ends the epoch, before the broadcast
    # Data-parallel steps equal one step on the whole batch only for a network whose forward pass
    # treats each sample on its own: BatchNorm in training mode normalises each worker's half by
    # that half's statistics (test_resnet would differ by far more than rounding). timm's test_vit
    # normalises with LayerNorm, per sample, and has no dropout at drop_rate 0.
    mapping["model"] = {"backbone": "test_vit", "channels_last": False}
    mapping["data"]["unlabeled_reader"] = "in_process"
    config = load_config(base=mapping)
    recordings = folder / "steps"
    recordings.mkdir()
    multiprocessing.spawn(_data_parallel_worker, args=(WORKERS, str(folder), mapping), nprocs=WORKERS, join=True)
    ranks = [torch.load(recordings / f"rank-{rank}.pt", weights_only=False) for rank in range(WORKERS)]

    # The replicas started from rank 0's state and drew different, equally large batches (equal
    # batches would make averaging irrelevant).
    for name, value in ranks[0]["state"]["model"].items():
        assert torch.equal(ranks[1]["state"]["model"][name], value), name
    batches = [record["batch"] for record in ranks]
    assert batches[0].labels.shape == batches[1].labels.shape == (8,)
    assert not torch.equal(batches[0].labeled_weak, batches[1].labeled_weak)

    # The replicas are identical after the step, and so at the end of the epoch, before the rank-0
    # broadcast could hide a difference: both applied the same all-reduced gradient (bit for bit:
    # rtol=atol=0, which reports the mismatch as assert_close does).
    after = [record["after"] for record in ranks]
    for name, value in after[0].items():
        torch.testing.assert_close(after[1][name], value, rtol=0, atol=0,
                                   msg=labelled(f"{name}, rank 1 against rank 0"))
        torch.testing.assert_close(ranks[1]["gradients"][name], ranks[0]["gradients"][name], rtol=0, atol=0,
                                   msg=labelled(f"{name} gradient, rank 1 against rank 0"))

    # One process from the same state, one step on the concatenation: a mean over 16 samples is
    # the mean of the two workers' means over 8, so its gradient is the workers' average.
    single = config.method_class()(config.options(), MethodContext(
        model=config.model, optimizer=config.optimizer, total_steps=config.total_steps))
    single.load_state_dict(ranks[0]["state"])
    single.train_step(concatenated(batches), ranks[0]["step"])
    compared = total = 0
    for name, parameter in single.model.named_parameters():
        torch.testing.assert_close(ranks[0]["gradients"][name], parameter.grad, rtol=1e-5, atol=1e-6,
                                   msg=labelled(f"{name} gradient, workers against one process"))
        # Adam's first step moves a parameter by lr * g / (|g| + eps), eps = 1e-8: where the gradient
        # is near zero (the attention key biases' gradient is zero up to rounding, and the two
        # halves' gradients can cancel), float rounding of g alone moves the update by up to lr.
        # Where |g| >= 1e-6 the same rounding (about 1e-9) changes it by under 1e-8: compare there.
        conditioned = parameter.grad.abs() >= 1e-6
        torch.testing.assert_close(after[0][name][conditioned], parameter.detach()[conditioned],
                                   rtol=1e-5, atol=1e-6, msg=labelled(f"{name}, workers against one process"))
        assert not torch.equal(parameter.detach(), ranks[0]["state"]["model"][name]), f"{name} did not move"
        compared += int(conditioned.sum())
        total += parameter.numel()
    assert compared > 0.98 * total, f"only {compared} of {total} parameters have a well-conditioned step"
    return ranks


@pytest.mark.slow
def test_a_data_parallel_supervised_step_equals_one_step_on_the_concatenated_batch(tiny_split, tmp_path):
    one_data_parallel_step(tiny_split, tmp_path, "supervised", {})


@pytest.mark.slow
def test_a_data_parallel_dtm_step_equals_one_step_on_the_concatenated_batch(tiny_split, tmp_path):
    # Threshold 0 accepts every pseudo label, so the unlabeled loss (a sum over the accepted samples
    # divided by each worker's own unlabeled count) is part of the step being compared.
    ranks = one_data_parallel_step(tiny_split, tmp_path, "dtm", {"initial_threshold": 0.0})
    batches = [record["batch"] for record in ranks]
    for view in ("unlabeled_weak", "unlabeled_strong"):
        assert getattr(batches[0], view).shape == getattr(batches[1], view).shape == (8, 3, 32, 32), view
        assert not torch.equal(getattr(batches[0], view), getattr(batches[1], view)), view
    assert [record["losses"]["mask_rate"] for record in ranks] == [1.0, 1.0]
    assert all(record["losses"]["unlabeled_loss"] > 0 for record in ranks)
