"""Streaming input of the unlabeled pool, images/s on this machine, three ways side by side over the
same Parquet shards with the same CPU transform (`PoolViews`: pool filter, JPEG decode, resize,
weak-view crop/flip to uint8):

- ray_data:   `pipeline.training.ray_train` (Ray Data read + map_batches tasks -> StreamedUnlabeled), the
              path Ray Train workers consume;
- dataloader: a torch DataLoader with `--loader-workers` processes over the files;
- bare:       one process reading the files and transforming each record batch in a loop.

Each is consumed by a loop that turns batches into torch tensors. Reported: time to first batch,
and steady-state images/s over the rows after the first `--warmup` fraction of the pass (best of
`--repeats` passes), with the ratios the issue asks for (ray_data / dataloader, ray_data / bare).

    .venv/bin/python bench/streaming.py [--split demo_run/split] [--rows 40000] [--cpus 2]

The pool is the demo split's unlabeled pool replicated to `--rows` rows (unique ids) in `--files`
files under bench_out/stream_pool-<rows>-<files> (made once, reused).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.data import schema, split  # noqa: E402
from pipeline.training.config import DataConfig  # noqa: E402
from pipeline.training.inputs import PREPARED_OK, PREPARED_PIXELS, PoolViews  # noqa: E402

COLUMNS = [schema.SAMPLE_ID, schema.IMAGE, schema.SOURCE, schema.SPLIT]


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
        })
        pq.write_table(table, path, row_group_size=1024, compression="none")
    with open(stamp, "w") as handle:
        json.dump({"rows": rows, "files": files, "distinct_images": len(images)}, handle)
    return paths


def consume(batches, rows: int, warmup: float) -> tuple[float, float, float, int]:
    """(seconds to the first batch, steady-state images/s, end-to-end images/s, images seen) for
    one pass. Steady state is measured from the point `warmup` of the pass was consumed: a path
    that was slow to its first batch may have buffered rows meanwhile, so keep `warmup` large
    enough (0.5) that the buffer is spent before the window starts."""
    started = time.perf_counter()
    first = None
    seen = 0
    steady_from, steady_rows = None, 0
    for pixels in batches:
        tensor = torch.from_numpy(pixels)  # what the training loop does with a batch
        seen += int(tensor.shape[0])
        now = time.perf_counter()
        if first is None:
            first = now - started
        if steady_from is None and seen >= warmup * rows:
            steady_from, steady_rows = now, seen
    finished = time.perf_counter()
    rate = (seen - steady_rows) / max(finished - steady_from, 1e-9) if steady_from else float("nan")
    return first or float("nan"), rate, seen / (finished - started), seen


def bare_batches(paths: list[str], views: PoolViews, read_rows: int):
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=read_rows, columns=COLUMNS):
            output = views(pa.Table.from_batches([batch]))
            yield output[PREPARED_PIXELS][output[PREPARED_OK]]


class FileDataset(torch.utils.data.IterableDataset):
    """The DataLoader baseline: each loader process takes every n-th file."""

    def __init__(self, paths: list[str], views: PoolViews, read_rows: int) -> None:
        self.paths, self.views, self.read_rows = paths, views, read_rows

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        paths = self.paths[info.id::info.num_workers] if info else self.paths
        torch.set_num_threads(1)
        yield from bare_batches(paths, self.views, self.read_rows)


def loader_batches(paths: list[str], views: PoolViews, read_rows: int, workers: int):
    loader = torch.utils.data.DataLoader(FileDataset(paths, views, read_rows), batch_size=None,
                                         num_workers=workers, prefetch_factor=4 if workers else None)
    for pixels in loader:
        yield pixels.numpy()


def ray_batches(paths: list[str], rows: int, data: DataConfig, batch: int, shuffle_buffer: int):
    from pipeline.training.ray_train import StreamedUnlabeled, pool_dataset

    dataset = pool_dataset(paths, pa.array([], pa.string()), data, seed=0)
    stream = StreamedUnlabeled(dataset.iterator(), batch, shuffle_buffer, seed=0, rank=0)
    for _ in range(rows // batch):  # exactly one pass (the stream drops the last partial batch)
        yield stream.next_batch()[PREPARED_PIXELS]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="demo_run/split")
    parser.add_argument("--rows", type=int, default=40000)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--read-rows", type=int, default=256, help="rows per transform call")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for Ray and loader processes")
    parser.add_argument("--shuffle-buffer", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--out", default="bench_out/streaming.json")
    arguments = parser.parse_args()
    torch.set_num_threads(1)

    paths = make_pool(arguments.split, arguments.rows, arguments.files,
                      f"bench_out/stream_pool-{arguments.rows}-{arguments.files}")
    data = DataConfig(image_size=arguments.image_size, decode_batch=arguments.read_rows)
    views = PoolViews(data, pa.array([], pa.string()), seed=0)

    from pipeline.data.ray_ingest import ensure_ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ensure_ray(num_cpus=arguments.cpus)
    ways = {
        "bare": lambda: bare_batches(paths, views, arguments.read_rows),
        "dataloader": lambda: loader_batches(paths, views, arguments.read_rows, arguments.cpus),
        "ray_data": lambda: ray_batches(paths, arguments.rows, data, arguments.batch, arguments.shuffle_buffer),
    }
    results: dict[str, dict[str, list]] = {name: {"first": [], "rate": [], "overall": []} for name in ways}
    for repeat in range(arguments.repeats):
        for name, batches in ways.items():  # interleaved: a noisy stretch hits every way alike
            first, rate, overall, seen = consume(batches(), arguments.rows, arguments.warmup)
            results[name]["first"].append(first)
            results[name]["rate"].append(rate)
            results[name]["overall"].append(overall)
            print(f"[{repeat}] {name:10s} first batch {first:6.2f} s  steady {rate:7.0f} img/s  "
                  f"end to end {overall:7.0f} img/s ({seen} images)", flush=True)
    summary = {name: {"first_batch_s": min(value["first"]), "images_per_second": max(value["rate"]),
                      "end_to_end_images_per_second": max(value["overall"]), "all": value}
               for name, value in results.items()}
    summary["ratios"] = {
        "ray_data/dataloader": summary["ray_data"]["images_per_second"]
        / summary["dataloader"]["images_per_second"],
        "ray_data/bare": summary["ray_data"]["images_per_second"] / summary["bare"]["images_per_second"],
    }
    summary["settings"] = vars(arguments)
    os.makedirs(os.path.dirname(arguments.out), exist_ok=True)
    with open(arguments.out, "w") as handle:
        json.dump(summary, handle, indent=1)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
