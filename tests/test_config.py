"""Typed configs: unknown keys and bad values fail with the key's path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from pipeline.config import ConfigError, from_mapping, to_mapping
from pipeline.demo.corpus import DemoCorpusConfig


@dataclass
class Optimizer:
    name: Literal["adam", "sgd"] = "adam"
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Train:
    steps: int = 10
    optimizer: Optimizer = field(default_factory=Optimizer)
    backbone: str | None = None
    windows: list[int] = field(default_factory=lambda: [10])
    use_gpu: bool = False


def test_nested_values_convert_and_defaults_fill_in():
    config = from_mapping(Train, {"steps": 5, "optimizer": {"lr": 1, "betas": [0.5, 0.6]},
                                  "windows": [3, 30]})
    assert config.steps == 5 and config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)
    assert config.optimizer.betas == (0.5, 0.6) and config.windows == [3, 30]
    assert to_mapping(config)["optimizer"]["name"] == "adam"


@pytest.mark.parametrize("data, message", [
    ({"step": 5}, "step: unknown key for Train"),
    ({"optimizer": {"learning_rate": 1}}, "optimizer.learning_rate: unknown key"),
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr: expected a number"),
    ({"optimizer": {"name": "adamw"}}, "optimizer.name: expected one of"),
    ({"steps": 2.5}, "steps: expected an integer"),
    ({"steps": True}, "steps: expected an integer"),
    ({"use_gpu": "yes"}, "use_gpu: expected true or false"),
    ({"windows": [1, "x"]}, r"windows\[1\]: expected an integer"),
    ({"optimizer": {"betas": [1.0]}}, "optimizer.betas: expected 2 items"),
    ({"optimizer": 3}, "optimizer: expected a mapping"),
])
def test_errors_name_the_key_path(data, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(Train, data)


def test_post_init_checks_report_the_field():
    with pytest.raises(ConfigError, match="class_shares"):
        from_mapping(DemoCorpusConfig, {"class_shares": [1.0, 2.0]})
    with pytest.raises(ConfigError, match="two_person_videos"):
        from_mapping(DemoCorpusConfig, {"train_videos": 2, "two_person_videos": 2})
