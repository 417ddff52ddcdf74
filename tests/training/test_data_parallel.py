"""Data-parallel training against one process, without Ray, in 2-process gloo groups: the torch
collectives (sums, means, the gradient average with gradients missing on some ranks, the rank-0
broadcast), and one data-parallel step of 2 workers (the Trainer, its overlapped gradient hooks and
torch collectives, as Ray Train runs it per worker) equals one single-process step on their
concatenated batches, with the replicas identical after it, before the epoch's rank-0 broadcast
(supervised and DTM; this fails when gradients are not averaged). Kept out of the Ray test modules
so that they run beside them, not in their queue."""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pipeline.methods.base import MethodContext, StepResult, TrainBatch
from pipeline.training.config import load_config
from pipeline.training.distributed import TorchCollectives
from pipeline.training.gradients import average_gradients
from pipeline.training.loop import StepObserver, Trainer, synchronize_replicas

from conftest import build_tiny_split
from processes import spawn_and_join
from test_distributed import WORKERS, settings


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    return build_tiny_split(tmp_path_factory.mktemp("data-parallel"))


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
    spawn_and_join(_collectives_worker, (2, str(tmp_path)), processes=2)
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
    spawn_and_join(_data_parallel_worker, (WORKERS, str(folder), mapping), processes=WORKERS)
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
