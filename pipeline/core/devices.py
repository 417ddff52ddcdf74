"""Moving small host tensors to the training device without stalling it.

A copy from ordinary (pageable) host memory to a GPU makes the host wait until the copy is done,
which, behind a queue of launched kernels, means waiting for the queue to drain. A copy from
pinned memory with `non_blocking=True` is queued like a kernel and the host runs on. The views
and the methods draw their random parameters on the host (from checkpointed CPU generators, so
runs repeat on every device) and send them over with `to_device`.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; from pinned memory and without waiting when that is a CUDA device.
    On the CPU (and on `meta`, which the sync-free tests use) it is a plain `.to`."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
        return pinned.to(device, non_blocking=True)
    return tensor.to(device)


def host_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """`array` as a host tensor ready for `to_device`: pinned when `device` is a CUDA device (a
    copy, best made off the training thread, as the input pipeline's prefetch does), else shared."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.pin_memory() if device.type == "cuda" else tensor


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant vector on `device`, copied there once per process (a normalisation's mean,
    the luma weights) instead of at every call. Callers must not modify it."""
    key = (tuple(values), torch.device(device), dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = to_device(torch.tensor(values, dtype=dtype), torch.device(device))
    return _CONSTANTS[key]
