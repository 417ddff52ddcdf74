"""Checkpoints and weight files load as tensors only: a file carrying a pickled object (which
would run code on load) is refused by every loader, and the object's code never runs."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.core import models
from pipeline.temporal import training as temporal_training
from pipeline.training import checkpoint


class Payload:
    """Unpickling this calls `os.mkdir(marker)`: the footprint of code run by a loader."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def hostile_file(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "epoch-0001.pt"
    torch.save({"model": {"weight": torch.zeros(2)}, "extra": Payload(str(marker))}, path)
    return str(path), marker


def test_a_training_checkpoint_with_a_pickled_object_is_refused(hostile_file):
    path, marker = hostile_file
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|global"):
        checkpoint.load(path)
    assert not marker.exists()


def test_a_temporal_checkpoint_with_a_pickled_object_is_refused(hostile_file):
    path, marker = hostile_file
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|global"):
        temporal_training.load_checkpoint(path)
    assert not marker.exists()


def test_a_weight_file_with_a_pickled_object_is_refused(hostile_file):
    path, marker = hostile_file
    with pytest.raises(models.WeightLoadError, match="not a torch checkpoint"):
        models.read_state_dict(path)
    assert not marker.exists()


def test_a_plain_tensor_checkpoint_still_loads(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"model": {"weight": torch.ones(3)}, "epoch": 1}, path)
    assert checkpoint.load(str(path))["model"]["weight"].sum() == 3
