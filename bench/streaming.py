"""Streaming input of the unlabeled pool, images/s on this machine, three ways side by side over the
same Parquet shards doing the same work: the CPU transform (`PoolViews`: pool filter, JPEG decode,
resize, weak-view crop/flip to uint8) and a row-level local shuffle buffer of the size training
uses (`data.shuffle_buffer`), batches of one step's unlabeled images:

- ray_data:   the path a Ray Train worker consumes: `pool_dataset` (Ray Data read + map_batches
              tasks), `streaming_split(1, equal=True)` as the trainer's DataConfig splits it, and
              `StreamedUnlabeled` over that split with its local shuffle buffer;
- dataloader: a torch DataLoader with `--cpus` processes over the files, each shuffling its rows
              through its own buffer of the same size (the overlap a competent engineer would write);
- bare:       one process reading the files, transforming each record batch and shuffling in a loop.

Each is consumed by a loop that turns batches into torch tensors. Reported per pass: time to the
first batch, steady-state images/s over the second half of the pass *by time* (start-up and any
burst of rows buffered during it fall in the first half, whatever their number), and end to end.
The ways are interleaved within each repeat; figures are the median and range of `--repeats`
passes, ratios are taken per repeat and summarised the same way.

    .venv/bin/python bench/streaming.py [--split demo_run/split] [--rows 40000] [--cpus 2]

The pool is the demo split's unlabeled pool replicated to `--rows` rows (unique ids) in `--files`
files under bench_out/stream_pool-v2-<rows>-<files> (made once, reused).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.data import schema, split  # noqa: E402
from pipeline.training.config import DataConfig  # noqa: E402
from pipeline.training.inputs import PREPARED_OK, PREPARED_PIXELS, PoolViews  # noqa: E402

from pipeline.training.ray_train import POOL_COLUMNS as COLUMNS  # noqa: E402  (what the pool stream reads)


def make_pool(split_dir: str, rows: int, files: int, folder: str) -> list[str]:
    stamp = os.path.join(folder, f"_pool-{rows}-{files}.json")
    paths = [os.path.join(folder, f"part-{index:03d}.parquet") for index in range(files)]
    if os.path.exists(stamp):
        return paths
    pool = split.load_unlabeled_pool(split_dir)
    images = []
    for uri in pool.file_uris:
        table = pq.read_table(uri, columns=COLUMNS)
        images += table.filter(split.unlabeled_mask(table, pool.excluded_ids))[schema.IMAGE].to_pylist()
    os.makedirs(folder, exist_ok=True)
    per_file = -(-rows // files)
    for index, path in enumerate(paths):
        numbers = range(index * per_file, min(rows, (index + 1) * per_file))
        table = pa.table({
            schema.SAMPLE_ID: [f"bench:{number}" for number in numbers],
            schema.IMAGE: pa.array([images[number % len(images)] for number in numbers], pa.binary()),
            schema.SOURCE: [schema.MS1MV2] * len(numbers),
            schema.SPLIT: ["train"] * len(numbers),
            schema.LABEL: pa.array([schema.NO_LABEL] * len(numbers), pa.int8()),
        })
        pq.write_table(table, path, row_group_size=1024, compression="none")
    with open(stamp, "w") as handle:
        json.dump({"rows": rows, "files": files, "distinct_images": len(images)}, handle)
    return paths


def consume(batches, steady_fraction: float = 0.5) -> tuple[float, float, float, int]:
    """(seconds to the first batch, steady-state images/s, end-to-end images/s, images seen) for
    one pass. The steady window is the last `steady_fraction` of the time between the first batch
    and the end: a window set by rows would start inside a burst of rows a slow starter buffered."""
    started = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    for pixels in batches:
        tensor = torch.from_numpy(pixels)  # what the training loop does with a batch
        arrivals.append((time.perf_counter(), int(tensor.shape[0])))
    finished = time.perf_counter()
    if not arrivals:
        raise RuntimeError("the pass yielded no batch")
    first = arrivals[0][0]
    window_start = finished - steady_fraction * (finished - first)
    steady_rows = sum(rows for when, rows in arrivals if when > window_start)
    seen = sum(rows for _, rows in arrivals)
    return (first - started, steady_rows / max(finished - window_start, 1e-9),
            seen / (finished - started), seen)


def shuffled(batches, buffer_rows: int, batch_size: int, seed: int):
    """Row-level shuffle through a buffer of at least `buffer_rows` rows, `batch_size` rows out at
    a time (the last partial batch dropped), as Ray Data's local shuffle buffer does. Rows are
    views into their batch; a draw swaps the last row into the hole, so each row costs O(1)."""
    rng = np.random.default_rng(seed)
    buffer: list[np.ndarray] = []
    for pixels in batches:
        buffer.extend(pixels)
        while len(buffer) >= max(buffer_rows, batch_size):
            yield _draw(buffer, batch_size, rng)
    while len(buffer) >= batch_size:
        yield _draw(buffer, batch_size, rng)


def _draw(buffer: list[np.ndarray], count: int, rng: np.random.Generator) -> np.ndarray:
    rows = []
    for _ in range(count):
        index = int(rng.integers(len(buffer)))
        rows.append(buffer[index])
        buffer[index] = buffer[-1]
        buffer.pop()
    return np.stack(rows)


def bare_batches(paths: list[str], views: PoolViews, read_rows: int):
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=read_rows, columns=COLUMNS):
            output = views(pa.Table.from_batches([batch]))
            yield output[PREPARED_PIXELS][output[PREPARED_OK]]


class FileDataset(torch.utils.data.IterableDataset):
    """The DataLoader baseline: each loader process takes every n-th file and shuffles its rows."""

    def __init__(self, paths: list[str], views: PoolViews, read_rows: int, shuffle_buffer: int,
                 batch: int, seed: int) -> None:
        self.paths, self.views, self.read_rows = paths, views, read_rows
        self.shuffle_buffer, self.batch, self.seed = shuffle_buffer, batch, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        paths = self.paths[info.id::info.num_workers] if info else self.paths
        torch.set_num_threads(1)
        yield from shuffled(bare_batches(paths, self.views, self.read_rows), self.shuffle_buffer,
                            self.batch, self.seed + (info.id if info else 0))


def loader_batches(paths: list[str], views: PoolViews, read_rows: int, workers: int,
                   shuffle_buffer: int, batch: int, seed: int):
    dataset = FileDataset(paths, views, read_rows, shuffle_buffer, batch, seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    for pixels in loader:
        yield pixels.numpy()


def ray_batches(paths: list[str], rows: int, data: DataConfig, batch: int, seed: int):
    """One pass through what a Ray Train worker consumes, from the dataset's creation on."""
    from pipeline.training.ray_train import StreamedUnlabeled, pool_dataset

    dataset = pool_dataset(paths, pa.array([], pa.string()), data, seed=seed)
    # What ray.train.DataConfig(datasets_to_split=[...]) hands each of N workers; here N = 1.
    (shard,) = dataset.streaming_split(1, equal=True)
    stream = StreamedUnlabeled(shard, batch, data.shuffle_buffer, seed=seed, rank=0)
    try:
        for _ in range(rows // batch):  # exactly one pass (the stream drops the last partial batch)
            yield stream.next_batch()[PREPARED_PIXELS]
    finally:
        stream.close()


def median_range(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "low": min(values), "high": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="demo_run/split")
    parser.add_argument("--rows", type=int, default=40000)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=128, help="unlabeled images a step")
    parser.add_argument("--read-rows", type=int, default=256, help="rows per transform call")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for Ray and loader processes")
    parser.add_argument("--shuffle-buffer", type=int, default=DataConfig().shuffle_buffer)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steady-fraction", type=float, default=0.5)
    parser.add_argument("--out", default="bench_out/streaming.json")
    arguments = parser.parse_args()
    torch.set_num_threads(1)

    paths = make_pool(arguments.split, arguments.rows, arguments.files,
                      f"bench_out/stream_pool-v2-{arguments.rows}-{arguments.files}")
    data = DataConfig(image_size=arguments.image_size, decode_batch=arguments.read_rows,
                      shuffle_buffer=arguments.shuffle_buffer)
    views = PoolViews(data, pa.array([], pa.string()), seed=0)

    from pipeline.data.ray_ingest import ensure_ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ensure_ray(num_cpus=arguments.cpus)
    ways = {
        "bare": lambda seed: shuffled(bare_batches(paths, views, arguments.read_rows),
                                      arguments.shuffle_buffer, arguments.batch, seed),
        "dataloader": lambda seed: loader_batches(paths, views, arguments.read_rows, arguments.cpus,
                                                  arguments.shuffle_buffer, arguments.batch, seed),
        "ray_data": lambda seed: ray_batches(paths, arguments.rows, data, arguments.batch, seed),
    }
    passes: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    for repeat in range(arguments.repeats):
        for name, batches in ways.items():  # interleaved: a noisy stretch hits every way alike
            first, rate, overall, seen = consume(batches(repeat), arguments.steady_fraction)
            passes[name].append({"first_batch_s": first, "steady_images_per_second": rate,
                                 "end_to_end_images_per_second": overall, "images": seen})
            print(f"[{repeat}] {name:10s} first batch {first:6.2f} s  steady {rate:7.0f} img/s  "
                  f"end to end {overall:7.0f} img/s ({seen} images)", flush=True)
    figures = ("first_batch_s", "steady_images_per_second", "end_to_end_images_per_second")
    summary: dict[str, object] = {
        name: {figure: median_range([run[figure] for run in runs]) for figure in figures}
        for name, runs in passes.items()}
    ratios = {}
    for baseline in ("dataloader", "bare"):
        for figure in figures[1:]:
            ratios[f"ray_data/{baseline} {figure}"] = median_range(
                [ray[figure] / base[figure] for ray, base in zip(passes["ray_data"], passes[baseline])])
    summary["ratios"] = ratios
    summary["passes"] = passes
    summary["settings"] = vars(arguments)
    os.makedirs(os.path.dirname(arguments.out), exist_ok=True)
    with open(arguments.out, "w") as handle:
        json.dump(summary, handle, indent=1)
    print("\n| path | first batch (s) | steady images/s | end-to-end images/s |\n|---|---|---|---|")
    for name in ways:
        cells = [summary[name][figure] for figure in figures]
        print(f"| {name} | " + " | ".join(
            f"{cell['median']:,.{2 if index == 0 else 0}f} ({cell['low']:,.{2 if index == 0 else 0}f}-"
            f"{cell['high']:,.{2 if index == 0 else 0}f})" for index, cell in enumerate(cells)) + " |")
    for key, value in ratios.items():
        print(f"{key}: {value['median']:.2f} ({value['low']:.2f}-{value['high']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
