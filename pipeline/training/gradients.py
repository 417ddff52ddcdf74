"""Averaging gradients over data-parallel workers, overlapped with the backward pass.

`average_gradients` is the plain form: after backward, one collective over every gradient. It is
exact and simple, but the network sits idle while the gradients cross the wire (ResNet-50's
~100 MB take milliseconds per step even on NVLink). `OverlappedGradientAverage` does the same
arithmetic the way DDP does: parameters are packed into buckets in reverse registration order
(roughly the order backward produces their gradients); a per-parameter post-accumulate-grad hook
counts a bucket down, and a complete bucket is launched as an asynchronous all-reduce while
backward goes on with the layers below. The optimizer's pre-step hook launches what is left and
waits. Unlike wrapping the model in DDP, it sees every gradient that reaches the optimizer's
parameters, whichever sub-module the method called, so methods that call a head or a backbone
directly (MutexMatch, noise_aware) are reduced too.

Two rules keep the workers' collectives paired: buckets are launched strictly in index order on
every worker (a bucket that is ready early waits for the ones before it), and every bucket is
launched exactly once per step. A gradient missing on some workers counts as zero there; one
missing on every worker stays None, as in one process; each bucket carries a presence count per
parameter for that, read on the host only on a step where this worker lacked a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from pipeline.methods.base import Collectives, PendingReduction

DEFAULT_BUCKET_MEGABYTES = 25.0
"""DDP's default bucket size: large enough that each collective's fixed cost is amortised, small
enough that the first bucket is launched early in backward."""


def average_gradients(parameters: list[torch.Tensor], collectives: Collectives) -> None:
    """Replace each gradient by its mean over the workers (data-parallel SGD, as DDP averages).

    A gradient missing on some workers counts as zero there; one missing on every worker stays
    None, so the optimizer skips that parameter as it would in one process.
    """
    present = torch.tensor([parameter.grad is not None for parameter in parameters], dtype=torch.float64)
    present = collectives.all_reduce_sum(present) > 0
    reduced = [parameter for parameter, flag in zip(parameters, present.tolist()) if flag]
    for parameter in reduced:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    reduce_in_place([parameter.grad for parameter in reduced], collectives.all_reduce_mean)


def carrier_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor travels in: float64 as is, other floats as float32 (float16/bfloat16 ->
    float32 and back is exact), everything else (counters, bools) as int64."""
    if dtype == torch.float64:
        return torch.float64
    if dtype.is_floating_point:
        return torch.float32
    return torch.int64


def reduce_in_place(tensors: list[torch.Tensor], reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """One collective per (carrier dtype, device) group over the tensors flattened, written back."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((carrier_dtype(tensor.dtype), tensor.device), []).append(tensor)
    for (carrier, _), group in groups.items():
        flat = reduce(torch.cat([tensor.reshape(-1).to(carrier) for tensor in group]))
        offset = 0
        for tensor in group:
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


@dataclass
class _Bucket:
    parameters: list[torch.Tensor]
    carrier: torch.dtype
    bytes: int = 0
    reduction: PendingReduction | None = None
    everywhere: torch.Tensor | None = None
    """The presence counts of a worker that has every gradient, made once on the device."""
    locally_missing: bool = False
    members: set[int] = field(default_factory=set)
    """The parameters whose gradient has arrived this step; the bucket is ready when all have."""

    @property
    def ready(self) -> bool:
        return len(self.members) == len(self.parameters)


class OverlappedGradientAverage:
    """Average the gradients of `optimizer`'s parameters over the workers, overlapping the
    all-reduce with backward (see the module docstring). Installs its hooks on construction;
    `remove()` takes them off. Equal, bit for bit with two workers, to `average_gradients`.

    Assumes what every method here does per optimizer: zero_grad, one backward, step, with no other
    collective in between (one would pair with a bucket another worker sent earlier). A gradient
    accumulated again after its bucket was sent (a second backward before the step) is detected
    at the step and the whole step falls back to `average_gradients`, which every worker, running
    the same code, then does too."""

    def __init__(self, optimizer: torch.optim.Optimizer, collectives: Collectives,
                 bucket_megabytes: float = DEFAULT_BUCKET_MEGABYTES) -> None:
        self.collectives = collectives
        self.parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        trainable = [parameter for parameter in self.parameters if parameter.requires_grad]
        limit = max(1, int(bucket_megabytes * 2**20))
        self.buckets: list[_Bucket] = []
        open_buckets: dict[tuple[torch.dtype, torch.device], _Bucket] = {}
        # Reverse registration order: the output layers' gradients are ready first.
        for parameter in reversed(trainable):
            key = (carrier_dtype(parameter.dtype), parameter.device)
            bucket = open_buckets.get(key)
            if bucket is None or bucket.bytes >= limit:
                bucket = open_buckets[key] = _Bucket([], key[0])
                self.buckets.append(bucket)
            bucket.parameters.append(parameter)
            bucket.bytes += parameter.numel() * key[0].itemsize
        self.bucket_of: dict[int, int] = {}
        for index, bucket in enumerate(self.buckets):
            bucket.everywhere = torch.ones(len(bucket.parameters), dtype=bucket.carrier,
                                           device=bucket.parameters[0].device)
            for parameter in bucket.parameters:
                self.bucket_of[id(parameter)] = index
        self.handles = [parameter.register_post_accumulate_grad_hook(self._gradient_ready)
                        for parameter in trainable]
        self.handles.append(optimizer.register_step_pre_hook(self._before_step))
        self.launches: list[int] = []
        """Bucket indices in launch order, this step (read by the tests)."""
        self.repeated = False
        self.fallback_steps = 0
        """Steps that fell back to `average_gradients` (see the class docstring)."""
        self._reset()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _reset(self) -> None:
        for bucket in self.buckets:
            bucket.reduction = None
            bucket.locally_missing = False
            bucket.members = set()
        self.next_bucket = 0
        self.repeated = False

    def _gradient_ready(self, parameter: torch.Tensor) -> None:
        bucket = self.buckets[self.bucket_of[id(parameter)]]
        if bucket.reduction is not None:
            self.repeated = True  # accumulated after its bucket was sent: see the class docstring
            return
        # A second accumulation before the bucket left changes nothing here: it will carry the sum.
        bucket.members.add(id(parameter))
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self.next_bucket < len(self.buckets) and self.buckets[self.next_bucket].ready:
            self._launch(self.next_bucket)

    def _launch(self, index: int) -> None:
        bucket = self.buckets[index]
        pieces = []
        for parameter in bucket.parameters:
            if parameter.grad is None:
                bucket.locally_missing = True
                pieces.append(torch.zeros(parameter.numel(), dtype=bucket.carrier, device=parameter.device))
            else:
                pieces.append(parameter.grad.detach().reshape(-1).to(bucket.carrier))
        if bucket.locally_missing:  # rare (a branch unused this step): a small blocking copy is fine
            flags = [0.0 if parameter.grad is None else 1.0 for parameter in bucket.parameters]
            pieces.append(torch.tensor(flags, dtype=bucket.carrier).to(bucket.parameters[0].device))
        else:
            pieces.append(bucket.everywhere)
        bucket.reduction = self.collectives.all_reduce_sum_async(torch.cat(pieces))
        self.launches.append(index)
        self.next_bucket = index + 1

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            while self.next_bucket < len(self.buckets):
                self._launch(self.next_bucket)  # parameters that got no gradient on this worker
            results = [bucket.reduction.wait() for bucket in self.buckets]
            if self.repeated:
                self.fallback_steps += 1
                average_gradients(self.parameters, self.collectives)
                return
            for bucket, flat in zip(self.buckets, results):
                self._write_back(bucket, flat)
        finally:
            self.launches = []
            self._reset()

    def _write_back(self, bucket: _Bucket, flat: torch.Tensor) -> None:
        count = len(bucket.parameters)
        values = flat[:-count] / self.collectives.world_size
        present = flat[-count:].tolist() if bucket.locally_missing else [1.0] * count
        offset = 0
        for parameter, flag in zip(bucket.parameters, present):
            size = parameter.numel()
            if flag > 0:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                parameter.grad.copy_(values[offset:offset + size].view_as(parameter.grad))
            offset += size
