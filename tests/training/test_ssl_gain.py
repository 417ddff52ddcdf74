"""An SSL method trained through the whole Trainer (real readers, split, input path, unlabeled
stream, per-epoch thresholds, validation) beats the same run with the unlabeled data switched off.

The data are Gaussian clusters drawn as pictures: each class is a mirror-symmetric 4x4 colour
pattern (orthonormal across classes, so flips keep it and every pair of classes is equally far),
scaled by CLUSTER_DISTANCE, under unit Gaussian noise per cell, written as Aff-Wild2 videos of
JPEG frames. The network is a linear probe on the 4x4 average-pooled image (registered with timm
below), so the few labels (2 per class) leave it tilted by the noise and only the unlabeled
frames show where the clusters are, as in tests/synthetic.py's cluster problem.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models import register_model
from torch import nn

from pipeline.data import ingest, schema
from pipeline.data.readers import make_reader
from pipeline.data.split import make_split
from pipeline.training.config import load_config
from pipeline.training.loop import Trainer

GRID = 4
CLUSTER_DISTANCE = 3.5
CELL_PIXELS = 30
"""Grey levels per unit of the cell values around mid-grey 128."""
SEEDS = (0, 1, 2)


class ClusterProbe(nn.Module):
    """A linear classifier on the GRID x GRID average-pooled image, with timm's interface
    (forward_features / forward_head / get_classifier) so every method can use it."""

    def __init__(self, num_classes: int = schema.NUM_CLASSES, **_: object) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(GRID)
        self.num_features = 3 * GRID * GRID
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(images)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        flat = features.flatten(1)
        return flat if pre_logits else self.fc(flat)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


@register_model
def cluster_probe_test(pretrained: bool = False, **kwargs) -> ClusterProbe:
    kwargs.pop("drop_rate", None)
    return ClusterProbe(**kwargs)


def write_cluster_videos(root: str, seed: int, train_videos: int = 40, validation_videos: int = 16,
                         frames: int = 20, size: int = 32) -> None:
    """Aff-Wild2's layout (cropped_aligned/<video>/<frame>.jpg, one annotation file per video);
    every frame's class is drawn uniformly."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(3 * GRID * GRID // 2, schema.NUM_CLASSES)))
    half = basis.T.reshape(schema.NUM_CLASSES, 3, GRID, GRID // 2) / np.sqrt(2)
    patterns = np.concatenate([half, half[..., ::-1]], axis=-1)  # unit norm, mirror-symmetric
    header = ",".join(schema.CLASS_NAMES)
    for subset, count, first in (("Train_Set", train_videos, 0), ("Validation_Set", validation_videos, 500)):
        annotations = os.path.join(root, "EXPR_Classification_Challenge", subset)
        os.makedirs(annotations, exist_ok=True)
        for index in range(count):
            video = f"{first + index:03d}-clusters"
            labels = rng.integers(0, schema.NUM_CLASSES, frames)
            folder = os.path.join(root, "cropped_aligned", video)
            os.makedirs(folder, exist_ok=True)
            for frame, label in enumerate(labels):
                cells = CLUSTER_DISTANCE * patterns[label] + rng.normal(size=(3, GRID, GRID))
                pixels = np.kron(cells, np.ones((1, size // GRID, size // GRID)))
                pixels = 128 + CELL_PIXELS * pixels + rng.normal(0, 4, pixels.shape)
                image = np.clip(pixels, 0, 255).astype(np.uint8).transpose(1, 2, 0)
                Image.fromarray(image).save(os.path.join(folder, f"{frame + 1:05d}.jpg"), quality=95)
            with open(os.path.join(annotations, f"{video}.txt"), "w") as handle:
                handle.write(header + "\n")
                handle.writelines(f"{label}\n" for label in labels)


@pytest.fixture(scope="module")
def cluster_splits(tmp_path_factory) -> dict[int, str]:
    """One split per seed: 2 labeled frames per class, the other 784 train frames unlabeled (their
    labels hidden), 320 validation frames in 16 videos."""
    splits = {}
    for seed in SEEDS:
        root = tmp_path_factory.mktemp(f"clusters-{seed}")
        write_cluster_videos(str(root / "corpus"), seed)
        ingest.ingest(make_reader(schema.AFFWILD2, str(root / "corpus")), str(root / "shards"), progress=False)
        make_split(str(root / "shards"), str(root / "split"), per_class=2, seed=seed)
        splits[seed] = str(root / "split")
    return splits


def train_dtm(split: str, storage: str, seed: int, use_unlabeled: bool) -> dict:
    settings = {
        "method": "dtm",
        # τ⁰ = 0.7 rather than the recipe's 0.8: with a 300-step budget the stricter start leaves
        # most of the run at a ~25% acceptance rate (measured), and the paper gives no τ⁰.
        "method_options": {"ema_decay": 0.9, "initial_threshold": 0.7, "unlabeled_loss": "stop_gradient"},
        "model": {"backbone": "cluster_probe_test", "channels_last": False},
        "optimizer": {"lr": 0.05},
        "data": {"split": split, "image_size": 32, "labeled_batch": 16, "unlabeled_ratio": 4,
                 "shuffle_buffer": 256, "use_unlabeled": use_unlabeled},
        "evaluation": {"windows": [5], "batch_size": 256},
        "run": {"name": "dtm", "storage": storage, "epochs": 6, "steps_per_epoch": 50, "seed": seed,
                "threads": 1},
    }
    return Trainer(load_config(base=settings)).fit()


@pytest.mark.slow
def test_dtm_through_the_trainer_beats_the_same_run_without_unlabeled_data(cluster_splits, tmp_path):
    """Seeds 0-3 measured (validation macro-F1, last epoch): control 0.78, 0.68, 0.73, 0.57; DTM
    0.88, 0.81, 0.82, 0.66 (paired gain 0.08-0.13), accepting ~40% of the pool at pseudo-label
    accuracy 0.81-0.95."""
    gains, accuracies = [], []
    for seed in SEEDS:
        with_unlabeled = train_dtm(cluster_splits[seed], str(tmp_path / f"ssl-{seed}"), seed, True)
        without = train_dtm(cluster_splits[seed], str(tmp_path / f"control-{seed}"), seed, False)
        gains.append(with_unlabeled["final"]["validation"]["macro_f1"] - without["final"]["validation"]["macro_f1"])
        accuracies.append(with_unlabeled["final"]["pseudo_label_quality"]["accuracy"])
        assert without["final"]["pseudo_label_quality"] is None  # the control saw no unlabeled row
    assert sum(gains) / len(SEEDS) >= 0.06, gains
    assert min(gains) > 0.03, gains
    # The gain comes from pseudo labels that are mostly right (chance is 1/8).
    assert min(accuracies) >= 0.8, accuracies
