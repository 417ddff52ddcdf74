"""The overlapped gradient average: buckets leave during backward, in index order, and the result
equals the plain one-collective average bit for bit in a 2-process gloo group, including a
gradient missing on one worker (zero there), one missing on both (stays None), a second step
(the per-step state is reset) and a second backward before the step (the fallback)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pipeline.methods.base import Collectives, PendingReduction
from pipeline.training.gradients import OverlappedGradientAverage, average_gradients

from processes import spawn_and_join

SMALL_BUCKETS = 0.0004  # about 420 bytes: several buckets on the little network below


class Network(nn.Module):
    """A trunk, a branch some workers skip, a branch no worker uses, and an output layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        # Registered first so that it lands in the last bucket (reverse order): a bucket waiting for
        # a gradient that never comes holds back the ones after it until the step.
        self.unused = nn.Linear(16, 4)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16))
        self.branch = nn.Linear(16, 16)
        self.output = nn.Linear(16, 5)

    def forward(self, inputs: torch.Tensor, use_branch: bool) -> torch.Tensor:
        hidden = self.trunk(inputs)
        if use_branch:
            hidden = hidden + self.branch(hidden)
        return self.output(hidden)


class Recording(Collectives):
    """Two identical workers: a sum is twice the tensor. Records, at each launch, whether the first
    layer's gradient (the last one backward produces) existed yet."""

    world_size = 2

    def __init__(self, network: Network) -> None:
        self.network = network
        self.first_layer_ready_at_launch: list[bool] = []

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * 2

    def all_reduce_sum_async(self, tensor: torch.Tensor) -> PendingReduction:
        self.first_layer_ready_at_launch.append(self.network.trunk[0].weight.grad is not None)
        return PendingReduction(tensor * 2)


def test_buckets_leave_during_backward_in_order_and_average_to_the_local_gradient():
    network = Network()
    collectives = Recording(network)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    average = OverlappedGradientAverage(optimizer, collectives, SMALL_BUCKETS)
    assert len(average.buckets) >= 4
    inputs = torch.randn(8, 6)
    network(inputs, use_branch=True).square().mean().backward()
    launched_in_backward = list(average.launches)
    expected = {name: parameter.grad.clone() for name, parameter in network.named_parameters()
                if parameter.grad is not None}
    optimizer.step()

    assert launched_in_backward == list(range(len(launched_in_backward)))
    assert len(launched_in_backward) >= 2, "buckets waited for the end of backward"
    assert collectives.first_layer_ready_at_launch[0] is False, "the first bucket left after backward ended"
    for name, parameter in network.named_parameters():
        if name.startswith("unused"):
            assert parameter.grad is None, name
        else:
            assert torch.equal(parameter.grad, expected[name]), name


def _gloo_worker(rank: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        from pipeline.training.distributed import TorchCollectives
        collectives = TorchCollectives()
        plain, overlapped = Network(), Network()
        plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.0)
        overlapped_optimizer = torch.optim.SGD(overlapped.parameters(), lr=0.0)
        average = OverlappedGradientAverage(overlapped_optimizer, collectives, SMALL_BUCKETS)
        generator = torch.Generator().manual_seed(rank)
        results = []
        # Step 1: rank 0 skips the branch. Step 2: both use it. Step 3: two backward passes.
        for step, (use_branch, passes) in enumerate([(rank == 1, 1), (True, 1), (True, 2)]):
            batches = [torch.randn(8, 6, generator=generator) for _ in range(passes)]
            # Each backward directly followed by its averaging: a collective issued in between would
            # pair with another worker's bucket (see OverlappedGradientAverage).
            for network, optimizer in ((overlapped, overlapped_optimizer), (plain, plain_optimizer)):
                optimizer.zero_grad(set_to_none=True)
                for batch in batches:
                    network(batch, use_branch).square().mean().backward()
                if network is plain:
                    average_gradients(list(plain.parameters()), collectives)
                else:
                    optimizer.step()  # lr 0: only the pre-step hook's averaging acts
            results.append({name: (parameter.grad, dict(overlapped.named_parameters())[name].grad)
                            for name, parameter in plain.named_parameters()})
            results[-1]["fallbacks"] = average.fallback_steps
        torch.save(results, os.path.join(folder, f"rank-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_overlapped_average_equals_the_plain_one_bit_for_bit_on_gloo(tmp_path):
    spawn_and_join(_gloo_worker, (str(tmp_path),), processes=2)
    ranks = [torch.load(tmp_path / f"rank-{rank}.pt", weights_only=False) for rank in range(2)]
    for rank, steps in enumerate(ranks):
        for step, result in enumerate(steps):
            # Only the step with two backward passes falls back; the others are reset and overlap.
            assert result.pop("fallbacks") == (1 if step == 2 else 0), f"rank {rank} step {step}"
            for name, (plain, overlapped) in result.items():
                where = f"rank {rank} step {step} {name}"
                if name.startswith("unused"):
                    assert plain is None and overlapped is None, where
                else:
                    assert plain is not None and torch.equal(plain, overlapped), where
    # The averages agree across ranks, and rank 0's missing branch counted as zero, not skipped.
    for name, (plain, _) in ranks[0][0].items():
        if plain is not None:
            assert torch.equal(plain, ranks[1][0][name][0]), name
    assert ranks[0][0]["branch.weight"][0].abs().sum() > 0
