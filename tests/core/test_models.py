"""Backbones by timm name and weights from local files: safetensors, torch checkpoints in their
usual wrappers, a foreign head skipped, anything else that does not fit reported by name."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pipeline.core.models import ModelConfig, WeightLoadError, create_model, read_state_dict


def tiny(**options) -> ModelConfig:
    return ModelConfig(backbone="test_resnet", channels_last=False, **options)


def backbone_only(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value for key, value in model.state_dict().items() if not key.startswith("fc.")}


def test_create_by_name_with_a_fresh_eight_class_head():
    model = create_model(tiny())
    assert model.get_classifier().out_features == 8
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 8)
    with pytest.raises(ValueError, match="model.backbone"):
        create_model(ModelConfig(backbone="no_such_net"))


def test_safetensors_weights_load_into_the_backbone(tmp_path):
    source = create_model(tiny())
    path = tmp_path / "face.safetensors"
    save_file({key: value.contiguous() for key, value in source.state_dict().items()}, str(path))
    loaded = create_model(tiny(pretrained_path=str(path)))
    for key, value in backbone_only(source).items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("wrap", [
    lambda state: state,
    lambda state: {"state_dict": state, "epoch": 3},
    lambda state: {"model": {f"module.{key}": value for key, value in state.items()}},
])
def test_torch_checkpoints_in_their_usual_wrappers(tmp_path, wrap):
    source = create_model(ModelConfig(backbone="test_resnet", num_classes=1000, channels_last=False))
    path = tmp_path / "weights.pt"
    torch.save(wrap(source.state_dict()), path)
    loaded = create_model(tiny(pretrained_path=str(path)))  # a 1000-class head is skipped
    assert torch.equal(loaded.state_dict()["conv1.0.weight"], source.state_dict()["conv1.0.weight"])
    assert loaded.get_classifier().out_features == 8


def test_a_checkpoint_that_does_not_fit_names_the_problem(tmp_path):
    source = create_model(tiny())
    state = source.state_dict()
    del state["conv1.0.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(WeightLoadError, match=r"missing from file \(1\).*conv1.0.weight.*not in the model"):
        create_model(tiny(pretrained_path=str(path)))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(1), "hook": print}, path)
    with pytest.raises(WeightLoadError, match="not a torch checkpoint"):
        read_state_dict(str(path))


def test_missing_file_and_conflicting_options():
    with pytest.raises(WeightLoadError, match="does not exist"):
        create_model(tiny(pretrained_path="/nonexistent/weights.pt"))
    with pytest.raises(ValueError, match="either pretrained or pretrained_path"):
        create_model(tiny(pretrained=True, pretrained_path="/x.pt"))


def test_warm_start_can_keep_the_head(tmp_path):
    source = create_model(tiny())
    path = tmp_path / "trained.pt"
    torch.save(source.state_dict(), path)
    fresh_head = create_model(tiny(pretrained_path=str(path)))
    warm = create_model(tiny(pretrained_path=str(path), pretrained_head=True))
    assert torch.equal(warm.state_dict()["fc.weight"], source.state_dict()["fc.weight"])
    assert not torch.equal(fresh_head.state_dict()["fc.weight"], source.state_dict()["fc.weight"])
    foreign = tmp_path / "foreign.pt"
    torch.save(create_model(ModelConfig(backbone="test_resnet", num_classes=5, channels_last=False)).state_dict(), foreign)
    with pytest.raises(WeightLoadError, match="shape mismatch"):
        create_model(tiny(pretrained_path=str(foreign), pretrained_head=True))
