"""Input-path throughput on this CPU, images/s, batch 64, ours vs the per-image PIL baselines side by
side in one run (ratios: this machine is shared and noisy; each figure is the best of --repeats).

    .venv/bin/python bench/views.py [--threads 1] [--repeats 5] [--batch 64]

Rows: decode + resize (decode_resize vs Pillow open/convert/resize); weak view (flip + colour jitter
+ normalise from decoded uint8, vs torchvision's PIL transforms); RandAugment alone (batched vs
timm's `rand-m9-mstd0.5-inc1` per PIL image); strong view (jitter + RandAugment + normalise).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.core import views  # noqa: E402
from pipeline.demo import faces  # noqa: E402


def rendered_jpegs(count: int, size: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    payloads = []
    for index in range(count):
        weights = faces.expression_weights(index % 8, float(rng.uniform(0.3, 1.0)))
        identity, conditions = faces.Identity.sample(rng), faces.Conditions.sample(rng)
        image = faces.render_face(weights, identity, conditions, size=size)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=92)
        payloads.append(buffer.getvalue())
    return payloads


def images_per_second(work, count: int, repeats: int) -> float:
    work()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return count / best


def pillow_decode(payloads: list[bytes], size: int) -> np.ndarray:
    return np.stack([
        np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BILINEAR))
        for data in payloads
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: per-core figures)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    count, repeats = arguments.batch, arguments.repeats
    normalise = transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    flip, jitter = transforms.RandomHorizontalFlip(), transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)
    pil_weak = transforms.Compose([flip, jitter, transforms.ToTensor(), normalise])
    timm_rand_augment = views.timm_strong_transform()
    pil_strong = transforms.Compose([flip, jitter, timm_rand_augment, transforms.ToTensor(), normalise])

    def compare(name: str, ours, baseline) -> None:
        ours_rate = images_per_second(ours, count, repeats)
        baseline_rate = images_per_second(baseline, count, repeats)
        ratio = ours_rate / baseline_rate
        print(f"{name:34s} {ours_rate:9.0f} {baseline_rate:9.0f} {ratio:7.1f}x", flush=True)

    print(f"torch threads {arguments.threads}, batch {count}, best of {repeats}; images/s")
    print(f"{'':34s} {'ours':>9s} {'PIL':>9s} {'ratio':>8s}")
    sources = {112: rendered_jpegs(count, 112), 256: rendered_jpegs(count, 256, seed=1)}
    for source, size in ((112, 112), (112, 224), (256, 224), (256, 112)):
        payloads = sources[source]
        compare(f"decode+resize {source}->{size}", lambda: views.decode_resize(payloads, size),
                lambda: pillow_decode(payloads, size))
    for size in (112, 224):
        decoded, _ = views.decode_resize(sources[112], size)
        pil_images = [Image.fromarray(pixels) for pixels in decoded]
        rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
        weak = views.WeakView(views.WeakViewConfig(resize=size))
        strong = views.StrongView(views.StrongViewConfig(weak=weak.config))
        compare(f"weak view {size} (vs torchvision PIL)",
                lambda: weak(weak.geometry(decoded, rng), generator),
                lambda: torch.stack([pil_weak(image) for image in pil_images]))
        unit = views.to_unit(decoded)
        compare(f"RandAugment {size} (vs timm PIL)", lambda: strong.rand_augment(unit, generator),
                lambda: [timm_rand_augment(image) for image in pil_images])
        compare(f"strong view {size} (vs PIL + timm)",
                lambda: strong(strong.geometry(decoded, rng), generator),
                lambda: torch.stack([pil_strong(image) for image in pil_images]))


if __name__ == "__main__":
    main()
