"""Ray Train on this machine's CPUs: 1 vs 2 workers (and one process without Ray), the same demo
recipe, steps and seed; images/s per worker and in total at the last epoch, and where each
worker's epoch went (the fraction spent waiting for input vs computing).

    .venv/bin/python bench/train_scaling.py [--recipe demo_abaw5_dtm] [--steps 20] [--epochs 2]

Each row is one `jobs.train` run whose command is printed (run names scaling-<row>).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(recipe: str, name: str, storage: str, split: str, extra: list[str]) -> tuple[float, list[dict]]:
    shutil.rmtree(os.path.join(storage, name), ignore_errors=True)
    command = [sys.executable, "-m", "jobs.train", "--config", f"jobs/recipes/{recipe}.yaml",
               "--set", f"data.split={split}", "--set", f"run.storage={storage}", "--set", f"run.name={name}",
               "--set", "run.threads=1", "--set", "evaluation.every_epochs=1000", *extra]
    print(" ".join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1"))
    seconds = time.perf_counter() - started
    workers = os.path.join(storage, name, "workers")
    files = sorted(os.listdir(workers)) if os.path.isdir(workers) else []
    paths = [os.path.join(workers, file) for file in files if file.endswith(".jsonl")] or \
        [os.path.join(storage, name, "metrics.jsonl")]
    records = []
    for path in paths:
        with open(path) as handle:
            records.append([json.loads(line) for line in handle.read().splitlines()][-1])
    return seconds, records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo_abaw5_dtm")
    parser.add_argument("--split", default=os.path.abspath("demo_run/split"))
    parser.add_argument("--storage", default=os.path.abspath("bench_out/scaling"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default="bench_out/train_scaling.json")
    arguments = parser.parse_args()
    common = ["--set", f"run.steps_per_epoch={arguments.steps}", "--set", f"run.epochs={arguments.epochs}"]
    rows = {
        "one process, in_process reader": ["--set", "data.unlabeled_reader=in_process"],
        "1 worker (cpus 1), ray_data": ["--set", "scaling.num_workers=1", "--set", "scaling.cpus_per_worker=1"],
        "2 workers (cpus 0.5 each), ray_data": ["--set", "scaling.num_workers=2",
                                                "--set", "scaling.cpus_per_worker=0.5"],
        "2 workers (cpus 0.5 each), in_process": ["--set", "scaling.num_workers=2",
                                                  "--set", "scaling.cpus_per_worker=0.5",
                                                  "--set", "data.unlabeled_reader=in_process"],
    }
    results = {}
    for index, (row, extra) in enumerate(rows.items()):
        seconds, records = train(arguments.recipe, f"scaling-{index}", arguments.storage, arguments.split,
                                 [*common, *extra])
        results[row] = {
            "wall_seconds": seconds,
            "images_per_second_total": records[0]["images_per_second_total"],
            "images_per_second_per_worker": [record["images_per_second"] for record in records],
            "input_wait_fraction": [record["input_wait_fraction"] for record in records],
        }
        print(f"{row:40s} total {results[row]['images_per_second_total']:7.1f} img/s, per worker "
              + ", ".join(f"{value:.1f}" for value in results[row]["images_per_second_per_worker"])
              + "; input wait " + ", ".join(f"{value:.2f}" for value in results[row]["input_wait_fraction"])
              + f"; wall {seconds:.0f} s", flush=True)
    one = results["1 worker (cpus 1), ray_data"]["images_per_second_total"]
    two = results["2 workers (cpus 0.5 each), ray_data"]["images_per_second_total"]
    summary = {"rows": results, "ratio_2_workers_over_1": two / one, "settings": vars(arguments)}
    os.makedirs(os.path.dirname(arguments.out), exist_ok=True)
    with open(arguments.out, "w") as handle:
        json.dump(summary, handle, indent=1)
    print(f"2 workers / 1 worker (ray_data): {two / one:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
