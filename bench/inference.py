"""Batch inference throughput on this machine, side by side on the same frames and model:

- job:  `pipeline.inference.ray_inference.run_predictions` (what `jobs.infer` / `jobs.pseudolabel` run:
        Ray Data read + filter, an actor pool running `predict_rows`, the driver writing one
        output file per input file);
- bare: one process, the same files read with pyarrow and `predict_rows` called in a loop with all
        the cores as torch threads (no Ray, no output written).

Reported: images/s end to end and at steady state (the rows after the first quarter of them
reached the driver), time to the first predictions at the driver, and the per-video smoothing of
all predictions as a fraction of the job's time.

    .venv/bin/python bench/inference.py [--files 3] [--actors 2] [--threads 1] [--repeats 2]

Frames: bench_out/stream_pool-80000-16 (made by `bench/streaming.py --rows 80000`: the demo pool's 112 px JPEGs, replicated);
model: resnet18 at 112 px (the ABAW5 input size), trained for one step on the demo split so that a
real checkpoint is loaded (weights do not change the cost).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.core import smoothing  # noqa: E402
from pipeline.inference.config import InferenceConfig  # noqa: E402
from pipeline.inference.ray_inference import run_predictions  # noqa: E402
from pipeline.data.schema import PREDICTED  # noqa: E402
from pipeline.inference.predict import load_frame_model, predict_rows  # noqa: E402
from pipeline.inference.prediction_files import InputFile, RowFilter  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_checkpoint(split: str, folder: str, backbone: str, size: int) -> str:
    run = os.path.join(folder, f"infer-{backbone}-{size}")
    if not os.path.exists(os.path.join(run, "metrics.json")):
        subprocess.run([sys.executable, "-m", "jobs.train", "--config", "jobs/recipes/demo_seed002_supervised.yaml",
                        "--set", f"data.split={split}", "--set", f"run.storage={folder}",
                        "--set", f"run.name=infer-{backbone}-{size}", "--set", f"model.backbone={backbone}",
                        "--set", f"data.image_size={size}", "--set", "run.epochs=1",
                        "--set", "run.steps_per_epoch=1", "--set", "evaluation.every_epochs=1"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return run


def bare(files: list[str], checkpoint: str, batch: int, threads: int) -> tuple[float, int]:
    torch.set_num_threads(threads)
    model = load_frame_model(checkpoint)
    started = time.perf_counter()
    rows = 0
    for path in files:
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch):
            output = predict_rows(model, pa.Table.from_batches([record_batch]))
            rows += output.num_rows
    return time.perf_counter() - started, rows


def job(files: list[str], checkpoint: str, settings: InferenceConfig, out: str) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    inputs = [InputFile(path, os.path.basename(path), pq.ParquetFile(path).metadata.num_rows) for path in files]
    from pipeline.inference import prediction_files

    arrivals: list[tuple[float, int]] = []  # (time, rows) of each batch reaching the driver
    original = prediction_files.FileCollector.add

    def timed_add(self, table):
        arrivals.append((time.perf_counter(), table.num_rows))
        original(self, table)

    prediction_files.FileCollector.add = timed_add
    try:
        started = time.perf_counter()
        run_predictions(inputs, RowFilter(), checkpoint, out, settings, {"bench": True}, progress=False)
        finished = time.perf_counter()
    finally:
        prediction_files.FileCollector.add = original
    rows = sum(item.rows for item in inputs)
    # Steady state: the rows that arrived after the first quarter did, over the time they took.
    counts = np.cumsum([count for _, count in arrivals])
    quarter = int(np.searchsorted(counts, rows / 4))
    steady_rows = rows - counts[quarter]
    return {"seconds": finished - started, "rows": rows, "images_per_second": rows / (finished - started),
            "first_output_s": arrivals[0][0] - started,
            "steady_images_per_second": steady_rows / max(finished - arrivals[quarter][0], 1e-9)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="demo_run/split")
    parser.add_argument("--pool", default="bench_out/stream_pool-80000-16")
    parser.add_argument("--files", type=int, default=3)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per actor")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench_out/inference.json")
    arguments = parser.parse_args()
    files = sorted(os.path.join(arguments.pool, name) for name in os.listdir(arguments.pool)
                   if name.endswith(".parquet"))[:arguments.files]
    if not files:
        raise SystemExit(f"{arguments.pool}: no Parquet files; run bench/streaming.py first")
    checkpoint = make_checkpoint(arguments.split, os.path.abspath("bench_out/runs"), arguments.backbone,
                                 arguments.image_size)
    from pipeline.data.ray_ingest import ensure_ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ensure_ray(num_cpus=arguments.cpus)
    # Logical CPUs: the pool takes half the cluster so the read tasks always get one (an actor pool
    # holding every CPU starves them); the actors still run on every core.
    settings = InferenceConfig(batch_size=arguments.batch, actors=arguments.actors, threads=arguments.threads,
                               cpus_per_actor=arguments.cpus / 2 / arguments.actors)
    results: dict[str, list] = {"bare": [], "job": []}
    for repeat in range(arguments.repeats):
        seconds, rows = bare(files, checkpoint, arguments.batch, arguments.cpus)
        results["bare"].append(rows / seconds)
        print(f"[{repeat}] bare  {rows / seconds:7.1f} img/s ({rows} images, {seconds:.1f} s)", flush=True)
        torch.set_num_threads(1)
        measured = job(files, checkpoint, settings, "bench_out/inference_out")
        results["job"].append(measured)
        print(f"[{repeat}] job   {measured['images_per_second']:7.1f} img/s end to end, "
              f"{measured['steady_images_per_second']:7.1f} steady, first output "
              f"{measured['first_output_s']:.1f} s", flush=True)

    # Smoothing: every prediction as one table of videos (600-frame videos), timed alone.
    from pipeline.data import storage

    table = pa.concat_tables([storage.read_parquet(os.path.join("bench_out/inference_out", os.path.basename(path)))
                              for path in files])
    count = table.num_rows
    videos = np.array([f"video{index // 600}" for index in range(count)], dtype=object)
    frames = np.arange(count) % 600 + 1
    predicted = table[PREDICTED].to_numpy()
    started = time.perf_counter()
    for _ in range(5):
        smoothing.smooth_by_video(videos, frames, predicted, 30, smoothing.CENTRED)
    smoothing_seconds = (time.perf_counter() - started) / 5
    best_job = max(results["job"], key=lambda item: item["steady_images_per_second"])
    summary = {
        "bare_images_per_second": max(results["bare"]),
        "job": best_job,
        "ratio_steady_job_over_bare": best_job["steady_images_per_second"] / max(results["bare"]),
        "ratio_end_to_end_job_over_bare": best_job["images_per_second"] / max(results["bare"]),
        "smoothing_seconds": smoothing_seconds,
        "smoothing_fraction_of_job": smoothing_seconds / best_job["seconds"],
        "frames": count, "schema_frames_per_video": 600, "all": results, "settings": vars(arguments),
    }
    os.makedirs(os.path.dirname(arguments.out), exist_ok=True)
    with open(arguments.out, "w") as handle:
        json.dump(summary, handle, indent=1)
    print(json.dumps({key: value for key, value in summary.items() if key not in ("all",)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
