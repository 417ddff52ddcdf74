"""Batch inference throughput on this machine, side by side on the same frames and model, three
repeats interleaved, median and range:

- job:        `pipeline.inference.ray_inference.run_predictions` (what `jobs.infer` / `jobs.pseudolabel`
              run: Ray Data read + filter, an actor pool running `predict_rows`, the driver writing
              one output file per input file);
- overlapped: the strongest one-process loop a competent engineer would write on the same cores:
              a decode thread (pyarrow read, JPEG decode, evaluation view) feeding the network,
              which runs on the other cores (decode of batch k+1 while batch k is in the network);
- processes:  `--actors` plain processes with `--threads` torch threads each, every one running
              `predict_rows` over its share of the files (the job's arrangement without Ray), its
              own decode and compute overlapping the others';
- serial:     one process, `predict_rows` in a loop with all cores as torch threads (the baseline
              this benchmark used before: decode and compute never overlap).

Reported for each: images/s end to end (start-up, model loading and the first batches included)
and at steady state (the rows that finished after the first quarter did, over their time), and
the job's ratio to each baseline on both. Plus the per-video smoothing of all predictions as a
fraction of the job's time.

    .venv/bin/python bench/inference.py [--split S] [--files 3] [--actors 2] [--threads 1] [--repeats 3]

Frames: bench_out/stream_pool-v2-<rows>-16 (made here from the split's pool, as `bench/streaming.py`
makes it: 112 px JPEGs replicated); model: resnet18 at 112 px (the ABAW5 input size), trained for
one step on the split so that a real checkpoint is loaded (weights do not change the cost).
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/streaming.py's make_pool

from pipeline.core import smoothing  # noqa: E402
from pipeline.inference.config import InferenceConfig  # noqa: E402
from pipeline.inference.ray_inference import run_predictions  # noqa: E402
from pipeline.data import schema  # noqa: E402
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


def steady(arrivals: list[tuple[float, int]], started: float, finished: float) -> dict[str, float]:
    """End-to-end and steady-state images/s from (time, rows) completions: steady counts the rows
    that completed after the first quarter of them did, over the time they took."""
    arrivals = sorted(arrivals)
    rows = sum(count for _, count in arrivals)
    counts = np.cumsum([count for _, count in arrivals])
    quarter = int(np.searchsorted(counts, rows / 4))
    return {"seconds": finished - started, "rows": rows, "images_per_second": rows / (finished - started),
            "first_output_s": arrivals[0][0] - started,
            "steady_images_per_second": (rows - counts[quarter]) / max(finished - arrivals[quarter][0], 1e-9)}


def serial(files: list[str], checkpoint: str, batch: int, threads: int) -> dict[str, float]:
    started = time.perf_counter()
    torch.set_num_threads(threads)
    model = load_frame_model(checkpoint)
    arrivals = []
    for path in files:
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch):
            output = predict_rows(model, pa.Table.from_batches([record_batch]))
            arrivals.append((time.perf_counter(), output.num_rows))
    return steady(arrivals, started, time.perf_counter())


def overlapped(files: list[str], checkpoint: str, batch: int, threads: int) -> dict[str, float]:
    """A decode thread one batch ahead of the network; torch gets the cores the decoder does not use."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.training.inputs import evaluation_tensor

    started = time.perf_counter()
    torch.set_num_threads(max(1, threads - 1))
    model = load_frame_model(checkpoint)
    data = model.config.data
    batches = (record_batch for path in files for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch))

    def decode(record_batch) -> tuple[torch.Tensor, np.ndarray]:
        return evaluation_tensor(record_batch.column(schema.IMAGE).to_pylist(), data, model.method.device)

    arrivals = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(decode, next(batches))
        for record_batch in [*batches, None]:
            images, ok = pending.result()
            if record_batch is not None:
                pending = pool.submit(decode, record_batch)
            probabilities = model.method.predict(images[torch.from_numpy(ok)]).cpu().numpy()
            arrivals.append((time.perf_counter(), len(ok)))
            del probabilities
    return steady(arrivals, started, time.perf_counter())


def _process_share(files: list[str], index: int, count: int, checkpoint: str, batch: int, threads: int,
                   queue) -> None:
    torch.set_num_threads(threads)
    model = load_frame_model(checkpoint)
    groups = [(path, group) for path in files for group in range(pq.ParquetFile(path).num_row_groups)]
    for path, group in groups[index::count]:
        for record_batch in pq.ParquetFile(path).read_row_group(group).to_batches(max_chunksize=batch):
            output = predict_rows(model, pa.Table.from_batches([record_batch]))
            queue.put((time.perf_counter(), output.num_rows))
    queue.put(None)


def processes(files: list[str], checkpoint: str, batch: int, count: int, threads: int) -> dict[str, float]:
    """`count` processes, each every count-th row group of the files (so each gets an equal share)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    started = time.perf_counter()
    workers = [context.Process(target=_process_share, args=(files, index, count, checkpoint, batch, threads, queue))
               for index in range(count)]
    for worker in workers:
        worker.start()
    arrivals, done = [], 0
    while done < count:
        item = queue.get()
        if item is None:
            done += 1
        else:
            arrivals.append(item)
    for worker in workers:
        worker.join()
    return steady(arrivals, started, time.perf_counter())


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
    return steady(arrivals, started, finished)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="demo_run/split")
    parser.add_argument("--rows", type=int, default=80000, help="rows of the replicated pool")
    parser.add_argument("--files", type=int, default=3)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per actor")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_out/inference.json")
    arguments = parser.parse_args()
    from streaming import make_pool

    pool_folder = f"bench_out/stream_pool-v2-{arguments.rows}-16"
    files = make_pool(arguments.split, arguments.rows, 16, pool_folder)[:arguments.files]
    checkpoint = make_checkpoint(arguments.split, os.path.abspath("bench_out/runs"), arguments.backbone,
                                 arguments.image_size)
    from pipeline.data.ray_ingest import ensure_ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ensure_ray(num_cpus=arguments.cpus)
    # Logical CPUs: the pool takes half the cluster so the read tasks always get one (an actor pool
    # holding every CPU starves them); the actors still run on every core.
    settings = InferenceConfig(batch_size=arguments.batch, actors=arguments.actors, threads=arguments.threads,
                               cpus_per_actor=arguments.cpus / 2 / arguments.actors)
    variants = {
        "job": lambda: job(files, checkpoint, settings, "bench_out/inference_out"),
        "overlapped": lambda: overlapped(files, checkpoint, arguments.batch, arguments.cpus),
        "processes": lambda: processes(files, checkpoint, arguments.batch, arguments.actors, arguments.threads),
        "serial": lambda: serial(files, checkpoint, arguments.batch, arguments.cpus),
    }
    results: dict[str, list] = {name: [] for name in variants}
    for repeat in range(arguments.repeats):  # interleaved: machine drift hits every variant alike
        for name, run in variants.items():
            measured = run()
            torch.set_num_threads(arguments.cpus)
            results[name].append(measured)
            print(f"[{repeat}] {name:10s} {measured['images_per_second']:7.1f} img/s end to end, "
                  f"{measured['steady_images_per_second']:7.1f} steady, first output "
                  f"{measured['first_output_s']:.1f} s ({measured['rows']} images)", flush=True)

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
    figures = {name: {key: spread([item[key] for item in runs])
                      for key in ("images_per_second", "steady_images_per_second", "first_output_s")}
               for name, runs in results.items()}
    # Ratios per repeat (each repeat's job against the same repeat's baseline), then their spread.
    ratios = {f"job_over_{name}": {key: spread([job_run[key] / base[key]
                                                for job_run, base in zip(results["job"], runs)])
                                   for key in ("images_per_second", "steady_images_per_second")}
              for name, runs in results.items() if name != "job"}
    summary = {
        "figures": figures, "ratios": ratios,
        "smoothing_seconds": smoothing_seconds,
        "smoothing_fraction_of_job": smoothing_seconds / float(np.median([run["seconds"] for run in results["job"]])),
        "frames": count, "schema_frames_per_video": 600, "all": results, "settings": vars(arguments),
    }
    os.makedirs(os.path.dirname(arguments.out), exist_ok=True)
    with open(arguments.out, "w") as handle:
        json.dump(summary, handle, indent=1)
    print(json.dumps({key: value for key, value in summary.items() if key not in ("all",)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
