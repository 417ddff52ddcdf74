"""Backbones through timm by name, with weights from timm's hub or a local/s3 file.

timm is the model layer (`timm.create_model(name, ...)`), not wrapped: this module only adds the
weight-file loading the papers' setups need (face-recognition-pretrained ResNets, say) and the
clear errors a user wants when a checkpoint does not fit.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import timm
import torch
from torch import nn

from pipeline.data import schema, storage


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    """Any timm model name (resnet18/50, efficientnet_b0..b7, vgg16, ...)."""
    pretrained: bool = False
    """Load timm's published weights (needs the hub, or timm's cache, to be reachable)."""
    pretrained_path: str | None = None
    """A local or s3:// weight file (safetensors, timm or torch checkpoint) loaded into the backbone."""
    pretrained_head: bool = False
    """Also load the classifier head from `pretrained_path` (a warm start from a network trained
    on the same 8 classes); by default the head stays fresh."""
    drop_rate: float = 0.0
    channels_last: bool = True
    num_classes: int = schema.NUM_CLASSES


class WeightLoadError(RuntimeError):
    """A weight file that cannot be loaded into the requested backbone."""


def create_model(config: ModelConfig) -> nn.Module:
    """The classifier for `config`: timm backbone + a fresh `num_classes` head."""
    if config.pretrained and config.pretrained_path:
        raise ValueError("model: set either pretrained or pretrained_path, not both")
    try:
        model = timm.create_model(config.backbone, pretrained=config.pretrained,
                                  num_classes=config.num_classes, drop_rate=config.drop_rate)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ValueError(f"model.backbone: {error}") from None
        raise
    if config.pretrained_path:
        load_backbone_weights(model, config.pretrained_path, include_head=config.pretrained_head)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a torch checkpoint (loaded with weights_only=True)."""
    if not storage.exists(uri):
        raise WeightLoadError(f"model.pretrained_path: {uri} does not exist")
    data = storage.read_bytes(uri)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(data)
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError... for foreign files
        raise WeightLoadError(f"model.pretrained_path: {uri} is not a torch checkpoint: {error}") from None
    # Common wrappers: {"state_dict": ...} (timm/lightning), {"model": ...}, DDP "module." prefixes.
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    if not isinstance(payload, dict):
        raise WeightLoadError(f"model.pretrained_path: {uri} holds no state dict")
    return {key.removeprefix("module."): value for key, value in payload.items()
            if isinstance(value, torch.Tensor)}


def load_backbone_weights(model: nn.Module, uri: str, include_head: bool = False) -> None:
    """Load every backbone tensor from `uri`; the classifier head is left fresh unless
    `include_head` (then it must be in the file with the model's shapes).

    A head of another size (a face-recognition or ImageNet checkpoint) is expected and skipped;
    any other missing, unexpected or mis-shaped tensor is an error that lists them.
    """
    state = read_state_dict(uri)
    head_names = set() if include_head else _head_parameter_names(model)
    own = model.state_dict()
    shape_mismatch = [f"{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}"
                      for key, value in state.items()
                      if key in own and own[key].shape != value.shape and key not in head_names]
    loadable = {key: value for key, value in state.items()
                if key in own and own[key].shape == value.shape and key not in head_names}
    missing = sorted(set(own) - set(loadable) - head_names)
    unexpected = sorted(set(state) - set(own) - head_names)
    if shape_mismatch or missing or unexpected:
        details = []
        if shape_mismatch:
            details.append(f"shape mismatch: {shape_mismatch[:5]}")
        if missing:
            details.append(f"missing from file ({len(missing)}): {missing[:5]}")
        if unexpected:
            details.append(f"not in the model ({len(unexpected)}): {unexpected[:5]}")
        raise WeightLoadError(
            f"model.pretrained_path: {uri} does not fit {type(model).__name__}: " + "; ".join(details))
    model.load_state_dict(loadable, strict=False)


def _head_parameter_names(model: nn.Module) -> set[str]:
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Module):
        return set()
    prefix = next((name for name, module in model.named_modules() if module is classifier), None)
    if not prefix:
        return set()
    return {f"{prefix}.{name}" for name in classifier.state_dict()}

