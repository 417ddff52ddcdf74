"""MS1MV2 ingest benchmark: the ingest against raw reads and copies of the same .rec with the same
parallelism, and its memory over an idle Ray, at each size, side by side in one run (ratios: this
machine is shared and noisy).

    .venv/bin/python bench/ingest_ms1mv2.py [--sizes 200000 1940884] [--work /tmp/fer-bench]

Writes InsightFace-style .rec files (our writer; 112 px faces as JPEG of about `--record-bytes`),
then for each size, on a fresh local Ray warmed by a small ingest, `--repeats` interleaved rounds of
three cold runs (the .rec dropped from the page cache before each):
- raw read:  the ingest's units (byte ranges), one per worker thread, as many threads as the
             ingest runs tasks, read in 16 MB chunks;
- raw copy:  the same reads written to one file per unit, each fsynced (the I/O floor of any
             ingest that writes its output durably);
- ingest:    `ingest.ingest` through the Ray Data executor, its shards fsynced as they close;
- ingest again, for memory only: the summed PSS of the driver and every Ray process sampled
             every 0.25 s, less the idle (warmed) Ray's just before. Not in the timed run: reading
             PSS walks each process's page tables (~80 ms for a local Ray's 9 processes), and a
             sampler at 50 ms kept one of the two cores busy.
Figures are medians with their range; ratios are taken per round.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import sys
import threading
import time

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.data import ingest, recordio  # noqa: E402
from pipeline.demo import faces  # noqa: E402
from pipeline.demo.corpus import _jpeg_bytes  # noqa: E402
from pipeline.data.ray_ingest import RayDataExecutor, ensure_ray  # noqa: E402
from pipeline.data.readers.ms1mv2 import Ms1mv2Reader  # noqa: E402

REAL_SUBSET_RECORDS = 1_940_884  # 5,822,653 / 3, the papers' MS1MV2 subset


# Real MS1MV2 faces are 112x112 JPEGs of photographs (37.6 kB of raw pixels). Our renders are
# smooth and compress to ~4 kB; photographs keep more high-frequency detail (skin, hair,
# background). We add sensor-like noise until the mean JPEG is near `record_bytes` (default 6 kB,
# about 6:1 compression at quality 95): an assumption, not a measurement of the real .idx.
DEFAULT_RECORD_BYTES = 6000


def face_jpegs(distinct: int, record_bytes: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(distinct):
        weights = faces.expression_weights(int(rng.integers(0, 8)), float(rng.uniform(0.3, 1)))
        image = faces.render_face(weights, faces.Identity.sample(rng), faces.Conditions.sample(rng))
        pixels = np.asarray(image, dtype=np.float32)
        noise = 0.0
        encoded = _jpeg_bytes(image, 95)
        while len(encoded) < record_bytes and noise < 40:  # a few steps of 2 grey levels
            noise += 2.0
            noisy = np.clip(pixels + rng.normal(0, noise, pixels.shape), 0, 255).astype(np.uint8)
            encoded = _jpeg_bytes(Image.fromarray(noisy), 95)
        pool.append(encoded)
    return pool


def write_rec(folder: str, count: int, distinct: int = 2000, seed: int = 0,
              record_bytes: int = DEFAULT_RECORD_BYTES) -> None:
    """`count` records cycling over `distinct` rendered faces (rendering 2M would dominate)."""
    done = os.path.join(folder, f"_complete-{record_bytes}")  # a stopped write is redone
    if os.path.exists(done):
        return
    os.makedirs(folder, exist_ok=True)
    pool = face_jpegs(min(distinct, count), record_bytes, seed)
    writer = recordio.IndexedRecordWriter(open(os.path.join(folder, "train.rec"), "wb"),
                                          open(os.path.join(folder, "train.idx"), "wb"))
    identities = max(1, count // 60)
    writer.write(0, recordio.pack(recordio.RecordHeader(2, np.array([count + 1, count + 1 + identities])), b""))
    for key in range(1, count + 1):
        writer.write(key, recordio.pack(recordio.RecordHeader(0, float(key % identities)), pool[key % len(pool)]))
    for identity in range(identities):
        writer.write(count + 1 + identity, recordio.pack(recordio.RecordHeader(2, np.array([0.0, 0.0])), b""))
    writer.close()
    open(done, "w").close()


def drop_from_page_cache(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def unit_ranges(rec_folder: str, min_units: int) -> list[tuple[int, int]]:
    """The byte range of each unit the ingest will run (its first record to its last's end)."""
    plan = Ms1mv2Reader(rec_folder, min_units=min_units).plan()
    return [(int(unit.offsets[0]), int(unit.limits[-1])) for unit in plan.units]


def _read_range(path: str, start: int, end: int, out: str | None, chunk: int = 16 << 20) -> None:
    with open(path, "rb", buffering=0) as handle:
        handle.seek(start)
        sink = open(out, "wb", buffering=0) if out else None
        try:
            position = start
            while position < end:
                data = handle.read(min(chunk, end - position))
                if not data:
                    break
                position += len(data)
                if sink:
                    sink.write(data)
            if sink:
                os.fsync(sink.fileno())
        finally:
            if sink:
                sink.close()


def raw_seconds(path: str, ranges: list[tuple[int, int]], workers: int, out_folder: str | None) -> float:
    """Read (and, with `out_folder`, copy and fsync) each range, `workers` ranges at a time."""
    if out_folder:
        shutil.rmtree(out_folder, ignore_errors=True)
        os.makedirs(out_folder)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(_read_range, path, start, end,
                               os.path.join(out_folder, f"part-{index:03d}") if out_folder else None)
                   for index, (start, end) in enumerate(ranges)]
        for future in futures:
            future.result()
    seconds = time.perf_counter() - started
    if out_folder:
        shutil.rmtree(out_folder, ignore_errors=True)
    return seconds


class MemorySampler:
    """Peak summed PSS of this process and all its descendants (raylet, Ray workers...)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        root = psutil.Process()
        total = 0
        for process in [root, *root.children(recursive=True)]:
            try:
                total += process.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_ingest(rec_folder: str, out: str, executor, min_units: int) -> tuple[float, int, int]:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    manifest = ingest.ingest(Ms1mv2Reader(rec_folder, min_units=min_units), out, executor, progress=False)
    return time.perf_counter() - started, manifest.rows, len(manifest.files)


def median_range(values: list[float], digits: int = 0) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "low": round(min(values), digits),
            "high": round(max(values), digits)}


def cell(figure: dict[str, float], digits: int = 0) -> str:
    return (f"{figure['median']:,.{digits}f} ({figure['low']:,.{digits}f}-{figure['high']:,.{digits}f})")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, REAL_SUBSET_RECORDS])
    parser.add_argument("--work", default="/tmp/fer-bench")
    parser.add_argument("--cpus", type=int, default=2, help="the local Ray's CPUs = parallel units")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record-bytes", type=int, default=DEFAULT_RECORD_BYTES)
    parser.add_argument("--keep-output", action="store_true",
                        help="leave the last ingest of the largest size in <work>/out-<size>")
    parser.add_argument("--json", help="also write the results here")
    arguments = parser.parse_args()

    import ray

    warm_folder = os.path.join(arguments.work, "rec-warmup")
    write_rec(warm_folder, 4000, record_bytes=arguments.record_bytes)
    results = []
    for size in arguments.sizes:
        folder = os.path.join(arguments.work, f"rec-{size}")
        written = time.perf_counter()
        write_rec(folder, size, record_bytes=arguments.record_bytes)
        print(f"{size:,} records ready in {time.perf_counter() - written:.0f} s", flush=True)
        rec = os.path.join(folder, "train.rec")
        megabytes = os.path.getsize(rec) / 1e6
        ranges = unit_ranges(folder, arguments.cpus)
        out = os.path.join(arguments.work, f"out-{size}")
        # A fresh local Ray per size, warmed by a small ingest (worker processes started, modules
        # imported), so every size is measured over the same idle baseline.
        ray.shutdown()
        ensure_ray(num_cpus=arguments.cpus)
        executor = RayDataExecutor()
        run_ingest(warm_folder, os.path.join(arguments.work, "warmup"), executor, arguments.cpus)
        rounds = []
        for repeat in range(arguments.repeats):
            drop_from_page_cache(rec)
            read = raw_seconds(rec, ranges, arguments.cpus, None)
            drop_from_page_cache(rec)
            copy = raw_seconds(rec, ranges, arguments.cpus, os.path.join(arguments.work, "copy"))
            drop_from_page_cache(rec)
            seconds, rows, files = run_ingest(folder, out, executor, arguments.cpus)
            if rows != size:
                raise RuntimeError(f"ingest wrote {rows:,} rows of {size:,} records")
            drop_from_page_cache(rec)
            shutil.rmtree(out, ignore_errors=True)
            time.sleep(2)  # let the idle Ray settle before its baseline
            idle = MemorySampler.current()
            with MemorySampler(interval=0.25) as sampler:
                run_ingest(folder, out, executor, arguments.cpus)
            rounds.append({"raw_read_s": read, "raw_copy_s": copy, "ingest_s": seconds,
                           "idle_pss_mb": idle / 1e6, "peak_pss_mb": sampler.peak / 1e6,
                           "increase_mb": (sampler.peak - idle) / 1e6, "files": files})
            print(json.dumps({"records": size, "round": repeat, **{k: round(v, 2) for k, v in rounds[-1].items()}}),
                  flush=True)
        if not (arguments.keep_output and size == max(arguments.sizes)):
            shutil.rmtree(out, ignore_errors=True)
        results.append({
            "records": size, "rec_mb": round(megabytes, 1), "units": len(ranges),
            "bytes_per_record": round(megabytes * 1e6 / size),
            "raw_read_mb_s": median_range([megabytes / r["raw_read_s"] for r in rounds]),
            "raw_copy_mb_s": median_range([megabytes / r["raw_copy_s"] for r in rounds]),
            "ingest_mb_s": median_range([megabytes / r["ingest_s"] for r in rounds]),
            "ingest_records_s": median_range([size / r["ingest_s"] for r in rounds]),
            "ingest/raw_read": median_range([r["raw_read_s"] / r["ingest_s"] for r in rounds], 2),
            "ingest/raw_copy": median_range([r["raw_copy_s"] / r["ingest_s"] for r in rounds], 2),
            "idle_pss_mb": median_range([r["idle_pss_mb"] for r in rounds]),
            "increase_mb": median_range([r["increase_mb"] for r in rounds]),
            "files": rounds[-1]["files"], "rounds": rounds,
        })
    ray.shutdown()

    print("\n| records | .rec MB (B/record) | raw read MB/s | raw copy + fsync MB/s | ingest MB/s "
          "| ingest records/s | ingest / raw read | ingest / raw copy | PSS over idle Ray MB (idle) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['records']:,} | {r['rec_mb']:,.0f} ({r['bytes_per_record']:,}) | {cell(r['raw_read_mb_s'])} "
              f"| {cell(r['raw_copy_mb_s'])} | {cell(r['ingest_mb_s'])} | {cell(r['ingest_records_s'])} "
              f"| {cell(r['ingest/raw_read'], 2)} | {cell(r['ingest/raw_copy'], 2)} "
              f"| +{cell(r['increase_mb'])} ({r['idle_pss_mb']['median']:,.0f}) |")
    if len(results) >= 2:
        small, large = results[0], results[-1]
        print(f"\nmemory over idle, {large['records']:,} vs {small['records']:,} records: "
              f"{large['increase_mb']['median'] / max(small['increase_mb']['median'], 1):.2f}x")
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
