"""Checkpoints that hold everything needed to continue exactly, saved to a local or s3:// run folder
and always loaded with `weights_only=True` (tensors and plain containers only: no pickled code).
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import torch

from pipeline.data import storage

CHECKPOINT_FOLDER = "checkpoints"
_NAME = re.compile(r"^epoch-(\d{4,})\.pt$")


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.pt"


def rng_state(numpy_generator: np.random.Generator, device: torch.device | None = None) -> dict[str, Any]:
    """Torch and numpy generator states in weights_only-loadable form, plus the CUDA generator's of
    `device` when it is a CUDA device (dropout and any draw made on the GPU come from it)."""
    state = numpy_generator.bit_generator.state
    saved = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": state["bit_generator"],
                  "state": str(state["state"]["state"]), "inc": str(state["state"]["inc"]),
                  "has_uint32": int(state["has_uint32"]), "uinteger": int(state["uinteger"])},
    }
    if device is not None and device.type == "cuda":
        saved["cuda"] = torch.cuda.get_rng_state(device)
    return saved


def restore_rng_state(state: dict[str, Any], numpy_generator: np.random.Generator,
                      device: torch.device | None = None) -> None:
    """Undo `rng_state`. A CUDA state is restored only onto a CUDA device (a run resumed on another
    kind of device goes on, but its GPU-side draws differ from the original's)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    saved = state["numpy"]
    numpy_generator.bit_generator.state = {
        "bit_generator": saved["bit_generator"],
        "state": {"state": int(saved["state"]), "inc": int(saved["inc"])},
        "has_uint32": saved["has_uint32"], "uinteger": saved["uinteger"],
    }


def save(folder: str, epoch: int, payload: dict[str, Any], keep: int) -> str:
    """Write `checkpoints/epoch-NNNN.pt` atomically, then prune all but the newest `keep`."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    uri = storage.join(folder, CHECKPOINT_FOLDER, checkpoint_name(epoch))
    storage.write_bytes_atomic(uri, buffer.getvalue())
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        storage.remove(storage.join(folder, CHECKPOINT_FOLDER, checkpoint_name(old)))
    return uri


def list_checkpoints(folder: str) -> list[int]:
    """Epoch numbers of the complete checkpoints in a run folder, oldest first."""
    directory = storage.join(folder, CHECKPOINT_FOLDER)
    if not storage.exists(directory):
        return []
    epochs = [int(match.group(1)) for name in storage.list_dir(directory)
              if (match := _NAME.match(name))]
    return sorted(epochs)


def load(uri: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    data = storage.read_bytes(uri)
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def latest(folder: str) -> str | None:
    epochs = list_checkpoints(folder)
    return storage.join(folder, CHECKPOINT_FOLDER, checkpoint_name(epochs[-1])) if epochs else None
