"""The papers' scale on this machine: a 1,940,884-record MS1MV2 `.rec` through the jobs a user runs
(ingest, split with the FER corpora beside it, one full pass of the unlabeled pool through the path
Ray Train workers consume, a pseudo-label export of the whole pool with a small model), each stage
timed, its peak memory taken over an idle local Ray, its disk use measured, and every record
accounted for (rows in = rows out + skipped).

    .venv/bin/python bench/papers_scale.py --checkpoint demo_run/runs/demo_abaw5_dtm \
        --fer-shards demo_run/shards [--records 1940884] [--work /tmp/fer-scale] [--keep]

Each job runs as its own process (`python -m jobs.<name>`, starting its own local Ray on every
CPU, as `make demo` does); memory is the summed PSS of that process and all its descendants (the
raylet, GCS, Ray workers), sampled once a second (a sample walks every process's page tables,
~80 ms of one core for a local Ray: sampled faster, the sampler would slow the stage it measures),
minus the same sum for a process that only starts a local Ray and waits. The `.rec` comes from bench/ingest_ms1mv2.py's writer (and is reused from
its folder when that run left one). Everything under `--work` is deleted at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from ingest_ms1mv2 import (DEFAULT_RECORD_BYTES, REAL_SUBSET_RECORDS, MemorySampler,  # noqa: E402
                           write_rec)

FER_SOURCES = ("affwild2", "affectnet", "expw")


def disk_bytes(folder: str) -> int:
    """Bytes the folder takes on disk (allocated blocks, as `du`)."""
    total = 0
    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                total += os.lstat(path).st_blocks * 512
    return total


def idle_ray_pss(cpus: int, settle_seconds: float = 20.0) -> float:
    """PSS (bytes) of a process that starts a local Ray like the jobs do and then waits."""
    code = (f"import ray, time; ray.init(num_cpus={cpus}, include_dashboard=False); "
            "print('up', flush=True); time.sleep(3600)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        process.stdout.readline()
        time.sleep(settle_seconds)
        return min(MemorySampler.current() for _ in range(5))
    finally:
        process.terminate()
        process.wait(timeout=60)
        time.sleep(5)


def run_stage(name: str, command: list[str], log_folder: str) -> dict:
    """Run one job to completion under the memory sampler; its output goes to a log file."""
    print(f"== {name}: {' '.join(command)}", flush=True)
    log = os.path.join(log_folder, f"{name}.log")
    before = MemorySampler.current()
    with open(log, "w") as handle, MemorySampler(interval=1.0) as sampler:
        started = time.perf_counter()
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
        seconds = time.perf_counter() - started
    if code != 0:
        with open(log) as handle:
            tail = handle.read()[-3000:]
        raise RuntimeError(f"{name} exited {code}; the end of {log}:\n{tail}")
    return {"seconds": seconds, "peak_pss": sampler.peak - before, "log": log}


def stream_pass(split_folder: str, batch: int, image_size: int) -> dict:
    """One full pass of the split's pool through what a Ray Train worker consumes (run in its
    own process by `main`): `pool_dataset` -> `streaming_split(1, equal=True)` -> StreamedUnlabeled
    with the default shuffle buffer, until the pass ends."""
    import numpy as np
    import ray

    from pipeline.data import split
    from pipeline.data.ray_ingest import ensure_ray
    from pipeline.training.config import DataConfig
    from pipeline.training.inputs import PREPARED_OK
    from pipeline.training.ray_train import StreamedUnlabeled, pool_dataset

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ensure_ray()
    pool = split.load_unlabeled_pool(split_folder)
    data = DataConfig(image_size=image_size)
    dataset = pool_dataset(pool.file_uris, pool.excluded_ids, data, seed=0)
    (shard,) = dataset.streaming_split(1, equal=True)
    stream = StreamedUnlabeled(shard, batch, data.shuffle_buffer, seed=0, rank=0)
    started = time.perf_counter()
    first = None
    last = started
    seen = decoded = 0
    while stream.pass_number == 0:
        output = stream.next_batch()
        if stream.pass_number:  # this batch already belongs to the second pass: not timed
            break
        last = time.perf_counter()
        first = first or last - started
        seen += len(output[PREPARED_OK])
        decoded += int(np.count_nonzero(output[PREPARED_OK]))
        if stream.batches % 2000 == 0:
            print(f"{seen:,} of {pool.rows:,} rows, {seen / (time.perf_counter() - started):,.0f} rows/s",
                  flush=True)
    seconds = last - started
    stream.close()
    ray.shutdown()
    return {"pool_rows": pool.rows, "rows_seen": seen, "decoded": decoded, "batch": batch,
            "not_delivered": pool.rows - seen, "seconds": seconds, "first_batch_s": first,
            "rows_per_second": seen / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="the small model for the pseudo-label export")
    parser.add_argument("--fer-shards", help="a jobs.ingest output with the FER sources (the demo's)")
    parser.add_argument("--records", type=int, default=REAL_SUBSET_RECORDS)
    parser.add_argument("--record-bytes", type=int, default=DEFAULT_RECORD_BYTES)
    parser.add_argument("--work", default="/tmp/fer-scale")
    parser.add_argument("--rec-cache", default="/tmp/fer-bench", help="where ingest_ms1mv2.py keeps .rec files")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=128, help="unlabeled images a step in the pass")
    parser.add_argument("--image-size", type=int, default=112, help="the pass's output size")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--inference-batch", type=int, default=512)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--stream-pass", metavar="SPLIT", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench_out/papers_scale.json")
    arguments = parser.parse_args()
    if arguments.stream_pass:  # the child process of the streaming stage
        print("RESULT " + json.dumps(stream_pass(arguments.stream_pass, arguments.batch, arguments.image_size)))
        return 0
    if not (arguments.checkpoint and arguments.fer_shards):
        parser.error("--checkpoint and --fer-shards are required")

    work = arguments.work
    os.makedirs(work, exist_ok=True)
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    rec = os.path.join(arguments.rec_cache, f"rec-{arguments.records}")
    started = time.perf_counter()
    write_rec(rec, arguments.records, record_bytes=arguments.record_bytes)
    report: dict = {"records": arguments.records, "rec_bytes": os.path.getsize(os.path.join(rec, "train.rec")),
                    "rec_write_s": time.perf_counter() - started, "cpus": arguments.cpus}
    report["bytes_per_record"] = report["rec_bytes"] / arguments.records
    print(json.dumps(report), flush=True)
    idle = idle_ray_pss(arguments.cpus)
    report["idle_ray_pss_mb"] = idle / 1e6

    shards = os.path.join(work, "shards")
    shutil.rmtree(shards, ignore_errors=True)
    os.makedirs(shards)
    for source in FER_SOURCES:  # the FER corpora beside MS1MV2, as a user's shard root holds them
        shutil.copytree(os.path.join(arguments.fer_shards, source), os.path.join(shards, source))
    python = sys.executable
    stages: dict[str, dict] = {}

    def stage(name: str, command: list[str]) -> dict:
        result = run_stage(name, command, logs)
        peak = result.pop("peak_pss")
        # Over the idle Ray for the stages that start one; the split starts none (absolute only).
        result["peak_pss_mb"] = peak / 1e6
        result["peak_pss_over_idle_mb"] = (peak - idle) / 1e6 if name != "split" else None
        stages[name] = result
        print(json.dumps({name: result}), flush=True)
        return result

    stage("ingest", [python, "-m", "jobs.ingest", "ms1mv2", "--root", rec, "--out", shards])
    from pipeline.data import shards as shard_folders
    from pipeline.data import split as splits

    manifest = shard_folders.Manifest.load(os.path.join(shards, "ms1mv2"))
    stages["ingest"].update({
        "rows": manifest.rows, "skipped_records": manifest.skipped_records, "files": len(manifest.files),
        "accounted": manifest.rows + manifest.skipped_records == arguments.records,
        "disk_bytes": disk_bytes(os.path.join(shards, "ms1mv2")),
        "records_per_second": arguments.records / stages["ingest"]["seconds"]})

    split_folder = os.path.join(work, "split")
    shutil.rmtree(split_folder, ignore_errors=True)
    stage("split", [python, "-m", "jobs.split", "--shards", shards, "--out", split_folder])
    pool = splits.load_unlabeled_pool(split_folder)
    shard_rows = sum(shard_folders.Manifest.load(os.path.join(shards, source)).rows
                     for source in ("ms1mv2", *FER_SOURCES))
    stages["split"].update({"pool_rows": pool.rows, "pool_files": len(pool.file_uris),
                            "shard_rows_all_sources": shard_rows,
                            "outside_pool": shard_rows - pool.rows,
                            "disk_bytes": disk_bytes(split_folder)})

    result = stage("stream_pass", [python, os.path.abspath(__file__), "--stream-pass", split_folder,
                                   "--batch", str(arguments.batch), "--image-size", str(arguments.image_size)])
    with open(result["log"], errors="replace") as handle:  # progress bars share its lines
        found = re.findall(r"RESULT (\{.*?\})\s*$", handle.read(), re.MULTILINE)
    result.update(json.loads(found[-1]))
    # equal=True and drop_last leave fewer than one batch of the pass undelivered
    result["accounted"] = 0 <= result["not_delivered"] < arguments.batch

    pseudo = os.path.join(work, "pseudolabels")
    shutil.rmtree(pseudo, ignore_errors=True)
    stage("pseudolabel", [python, "-m", "jobs.pseudolabel", "--checkpoint", arguments.checkpoint,
                          "--split", split_folder, "--out", pseudo, "--actors", str(arguments.actors),
                          "--cpus-per-actor", str((arguments.cpus - 1) / arguments.actors), "--threads", "1",
                          "--batch-size", str(arguments.inference_batch)])
    with open(os.path.join(pseudo, "_manifest.json")) as handle:
        exported = json.load(handle)
    stages["pseudolabel"].update({
        "rows": exported["rows"], "undecodable": exported["undecodable"], "accepted": exported["accepted"],
        "accounted": exported["rows"] == pool.rows, "disk_bytes": disk_bytes(pseudo),
        "rows_per_second": exported["rows"] / stages["pseudolabel"]["seconds"]})
    report["stages"] = stages
    report["disk_bytes_total"] = disk_bytes(work) + report["rec_bytes"]
    report["total_s"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(arguments.out), exist_ok=True)
    with open(arguments.out, "w") as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps(report, indent=1))
    if not arguments.keep:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(rec, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
