"""Step cost of every method relative to supervised at the same batch, and the input path's
images/s against the bare decode+resize+flip loop, side by side in one run on this CPU.

    .venv/bin/python bench/step_cost.py [--backbone resnet10t --image-size 112 --batch 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.core import views  # noqa: E402
from pipeline.methods import METHODS, find_method  # noqa: E402
from pipeline.methods.base import MethodContext, OptimizerConfig, TrainBatch  # noqa: E402
from pipeline.core.models import ModelConfig  # noqa: E402
from pipeline.training.config import DataConfig  # noqa: E402
from pipeline.training.data import read_labeled  # noqa: E402
from pipeline.training.inputs import make_views  # noqa: E402


def step_seconds(name: str, backbone: str, size: int, batch: int, ratio: int, steps: int) -> float:
    method_class = find_method(name)
    model = ModelConfig(backbone="vgg11" if name == "vgg_baseline" else backbone)
    method = method_class(method_class.Options(), MethodContext(model, OptimizerConfig(lr=1e-3), 1000))
    needs = method_class.views
    image = lambda count: torch.randn(count, 3, size, size).contiguous(memory_format=torch.channels_last)
    inputs = TrainBatch(image(batch), torch.arange(batch) % 8,
                        labeled_strong=image(batch) if needs.labeled_strong else None,
                        unlabeled_weak=image(batch * ratio) if needs.unlabeled else None,
                        unlabeled_strong=image(batch * ratio) if needs.unlabeled_strong else None)
    for step in range(2):
        method.train_step(inputs, step)
    times = []
    for step in range(steps):
        started = time.perf_counter()
        method.train_step(inputs, step + 2)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def input_rates(split: str, size: int, batch: int, repeats: int) -> dict[str, float]:
    table = read_labeled(split)
    images = table.take_images(np.arange(min(len(table), batch * 8)) % len(table))
    rng = np.random.default_rng(0)
    weak, strong = make_views(DataConfig(image_size=size))

    def bare() -> None:
        for start in range(0, len(images), batch):
            pixels, _ = views.decode_resize(images[start:start + batch], size)
            flips = rng.random(len(pixels)) < 0.5
            pixels[flips] = pixels[flips, :, ::-1]

    def weak_path() -> None:
        for start in range(0, len(images), batch):
            pixels, ok = weak.decode(images[start:start + batch])
            weak(torch.from_numpy(weak.geometry(pixels[ok], rng)))

    def weak_and_strong() -> None:
        for start in range(0, len(images), batch):
            pixels, ok = weak.decode(images[start:start + batch])
            cropped = torch.from_numpy(weak.geometry(pixels[ok], rng))
            weak(cropped)
            strong(cropped)

    rates = {}
    for name, function in (("bare decode+resize+flip", bare), ("decode + weak view", weak_path),
                           ("decode + weak + strong views", weak_and_strong)):
        function()
        durations = []
        for _ in range(repeats):
            started = time.perf_counter()
            function()
            durations.append(time.perf_counter() - started)
        rates[name] = len(images) / statistics.median(durations)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--unlabeled-ratio", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--split", default="demo_run/split")
    parser.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)

    print(f"step cost: {arguments.backbone} at {arguments.image_size} px, batch {arguments.batch} "
          f"labeled + {arguments.batch * arguments.unlabeled_ratio} unlabeled, {arguments.threads} threads")
    seconds = {name: step_seconds(name, arguments.backbone, arguments.image_size, arguments.batch,
                                  arguments.unlabeled_ratio, arguments.steps)
               for name in sorted(METHODS)}
    print("| method | s/step | × supervised |")
    print("|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.3f} | {value / seconds['supervised']:.2f} |")
    if os.path.exists(arguments.split):
        rates = input_rates(arguments.split, arguments.image_size, arguments.batch, 3)
        base = rates["bare decode+resize+flip"]
        print("\n| input path | images/s | ratio to bare |")
        print("|---|---|---|")
        for name, value in rates.items():
            print(f"| {name} | {value:,.0f} | {value / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
