"""MS1MV2 ingest benchmark: ingest rate vs raw sequential read of the same .rec, and peak memory
at two sizes, side by side in one run (ratios: this machine is shared and noisy).

    .venv/bin/python bench/ingest_ms1mv2.py [--sizes 20000 200000] [--work /tmp/fer-bench]

Writes InsightFace-style .rec files of demo faces (112 px JPEG, like MS1MV2), then for each size:
raw read (page cache dropped for the file, then warm), ingest through Ray Data (cold file, then
warm), sampling the proportional memory (PSS) of the driver and every Ray process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def write_rec(folder: str, count: int, distinct: int = 400, seed: int = 0) -> None:
    """`count` records cycling over `distinct` rendered faces (rendering 200k would dominate)."""
    if os.path.exists(os.path.join(folder, "train.idx")):
        return
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = []
    for index in range(distinct):
        weights = faces.expression_weights(int(rng.integers(0, 8)), float(rng.uniform(0.3, 1)))
        image = faces.render_face(weights, faces.Identity.sample(rng), faces.Conditions.sample(rng))
        pool.append(_jpeg_bytes(image, 92))
    writer = recordio.IndexedRecordWriter(open(os.path.join(folder, "train.rec"), "wb"),
                                          open(os.path.join(folder, "train.idx"), "wb"))
    identities = max(1, count // 60)
    writer.write(0, recordio.pack(recordio.RecordHeader(2, np.array([count + 1, count + 1 + identities])), b""))
    for key in range(1, count + 1):
        writer.write(key, recordio.pack(recordio.RecordHeader(0, float(key % identities)), pool[key % distinct]))
    for identity in range(identities):
        writer.write(count + 1 + identity, recordio.pack(recordio.RecordHeader(2, np.array([0.0, 0.0])), b""))
    writer.close()


def drop_from_page_cache(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def raw_read_seconds(path: str, chunk: int = 16 << 20) -> float:
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while handle.read(chunk):
            pass
    return time.perf_counter() - started


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


def run_ingest(rec_folder: str, out: str, executor) -> tuple[float, int, int]:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    manifest = ingest.ingest(Ms1mv2Reader(rec_folder, min_units=2), out, executor, progress=False)
    return time.perf_counter() - started, manifest.rows, len(manifest.files)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--work", default="/tmp/fer-bench")
    parser.add_argument("--json", help="also write the results here")
    arguments = parser.parse_args()

    import ray

    results = []
    for size in arguments.sizes:
        folder = os.path.join(arguments.work, f"rec-{size}")
        write_rec(folder, size)
        rec = os.path.join(folder, "train.rec")
        megabytes = os.path.getsize(rec) / 1e6
        # A fresh local Ray per size, warmed by one ingest, so both sizes are measured from the
        # same idle baseline (a reused Ray accumulates worker processes between runs).
        ray.shutdown()
        ensure_ray(num_cpus=2)
        executor = RayDataExecutor()
        run_ingest(folder, os.path.join(arguments.work, "warmup"), executor)

        drop_from_page_cache(rec)
        raw_cold = raw_read_seconds(rec)
        raw_warm = min(raw_read_seconds(rec) for _ in range(3))
        drop_from_page_cache(rec)
        ingest_cold, rows, files = run_ingest(folder, os.path.join(arguments.work, "out"), executor)
        idle = MemorySampler.current()
        # Three warm ingests under one sampler: a short run can end between two samples.
        with MemorySampler() as sampler:
            ingest_warm = min(run_ingest(folder, os.path.join(arguments.work, "out"), executor)[0]
                              for _ in range(3))
        results.append({
            "records": size, "rows": rows, "files": files, "rec_mb": round(megabytes, 1),
            "raw_cold_mb_s": round(megabytes / raw_cold), "raw_warm_mb_s": round(megabytes / raw_warm),
            "ingest_cold_mb_s": round(megabytes / ingest_cold), "ingest_warm_mb_s": round(megabytes / ingest_warm),
            "ingest_cold_records_s": round(size / ingest_cold), "ingest_warm_records_s": round(size / ingest_warm),
            "ratio_cold": round(raw_cold / ingest_cold, 3), "ratio_warm": round(raw_warm / ingest_warm, 3),
            "idle_pss_mb": round(idle / 1e6), "peak_pss_mb": round(sampler.peak / 1e6),
            "peak_increase_mb": round((sampler.peak - idle) / 1e6),
        })
        print(json.dumps(results[-1]), flush=True)
    ray.shutdown()

    print("\n| records | .rec MB | raw read cold / warm MB/s | ingest cold / warm MB/s | ingest records/s (warm) "
          "| ratio cold / warm | peak PSS MB (increase over idle) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['records']:,} | {r['rec_mb']:,} | {r['raw_cold_mb_s']:,} / {r['raw_warm_mb_s']:,} "
              f"| {r['ingest_cold_mb_s']:,} / {r['ingest_warm_mb_s']:,} | {r['ingest_warm_records_s']:,} "
              f"| {r['ratio_cold']} / {r['ratio_warm']} | {r['peak_pss_mb']:,} (+{r['peak_increase_mb']:,}) |")
    if len(results) >= 2:
        small, large = results[0], results[-1]
        print(f"\npeak memory {large['records']:,} vs {small['records']:,} records: "
              f"{large['peak_pss_mb'] / small['peak_pss_mb']:.2f}x total, "
              f"{max(large['peak_increase_mb'], 1) / max(small['peak_increase_mb'], 1):.2f}x increase over idle")
        rate = large["ingest_warm_records_s"]
        bytes_per_record = large["rec_mb"] * 1e6 / large["records"]
        shard_bytes = 192 << 20
        print(f"estimate for the real {REAL_SUBSET_RECORDS:,}-record subset on this 2-core machine "
              f"at {rate:,} records/s: {REAL_SUBSET_RECORDS / rate / 60:.1f} min; at "
              f"{bytes_per_record / 1e3:.1f} kB/record: {REAL_SUBSET_RECORDS * bytes_per_record / 1e9:.1f} GB, "
              f"~{int(np.ceil(REAL_SUBSET_RECORDS * bytes_per_record / (0.9 * shard_bytes)))} shard files")
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
