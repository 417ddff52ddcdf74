"""`Collectives` over torch.distributed, without Ray: the Ray Train adapter uses it inside its
workers (Ray Train sets the process group up), and the GPU check uses it on a one-rank group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.methods.base import Collectives, PendingReduction


class TorchCollectives(Collectives):
    """`Collectives` over the default torch.distributed process group (Ray Train sets it up).

    Inputs are never modified; each call returns a new tensor on the input's device and dtype
    (float for a mean of integers), moved through the backend's device (CUDA for NCCL).
    """

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._start(tensor, copy=True, background=False).wait()

    def all_reduce_sum_async(self, tensor: torch.Tensor) -> PendingReduction:
        return self._start(tensor, copy=False, background=True)

    def _start(self, tensor: torch.Tensor, copy: bool, background: bool) -> PendingReduction:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchCollectives needs an initialised torch.distributed process group")
        backend_device = (torch.device("cuda", torch.cuda.current_device())
                          if dist.get_backend() == "nccl" else torch.device("cpu"))
        buffer = tensor.detach().to(backend_device, copy=copy)
        work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, async_op=background)
        if buffer.device == tensor.device:
            return PendingReduction(buffer, work)
        if work is not None:
            work.wait()  # gloo with device tensors: the result has to come back to the device
        return PendingReduction(buffer.to(tensor.device))

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(tensor) / self.world_size
