"""Ray Tune benchmarks on the demo split (`make demo` writes demo_run/split).

    # Tune's cost: the same N trainings as one Tune grid (2 at a time, 1 CPU each) and as plain
    # `jobs.train` processes, 2 at a time (the strongest fair baseline on 2 cores), interleaved.
    .venv/bin/python bench/tune.py overhead --repeats 3 --trials 4 --steps 50
    # A real search (demo_dtm.yaml's space, N trials, ASHA) and its report.
    .venv/bin/python bench/tune.py search --trials 20
    # Does the search's best config beat the recipe default? Both on seeds 0..K-1, paired; figures on
    # the report half (the search chose on the selection half).
    .venv/bin/python bench/tune.py confirm --experiment demo_run/tune/demo_dtm_search20 --seeds 5

Every command is printed before it runs and the figures go to bench_out/tune_<part>.json with the
date, commit and settings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.tuning.ablation import interval  # noqa: E402

PYTHON = sys.executable
RECIPE = "jobs/recipes/demo_abaw5_dtm.yaml"
SEARCH_FILE = "jobs/tune/demo_dtm.yaml"
COMMON = ["data.image_size=32", "run.threads=1"]


def run(command: list[str], log: str | None = None) -> float:
    """Runs `command` from the repository root; returns its wall time. Fails loudly."""
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    with open(log or os.devnull, "w") as handle:
        completed = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"failed ({completed.returncode}) after {elapsed:.0f} s: {' '.join(command)}"
                         + (f"\nlog: {log}" if log else ""))
    return elapsed


def sets(values: list[str]) -> list[str]:
    return [item for value in values for item in ("--set", value)]


def record(part: str, payload: dict) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    payload = {"part": part, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": commit, "machine": f"{platform.node()} {os.cpu_count()} CPUs", **payload}
    os.makedirs(os.path.join(ROOT, "bench_out"), exist_ok=True)
    path = os.path.join(ROOT, "bench_out", f"tune_{part}.json")
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=1)
    return path


# ------------------------------------------------------------------------------ overhead

def overhead(arguments: argparse.Namespace) -> None:
    seeds = list(range(arguments.trials))
    recipe = COMMON + [f"data.split={arguments.split}", "run.epochs=1", f"run.steps_per_epoch={arguments.steps}"]
    scratch = tempfile.mkdtemp(prefix="tune-overhead-", dir=os.path.join(ROOT, "bench_out"))
    times: dict[str, list[float]] = {"tune": [], "plain": []}
    for repeat in range(arguments.repeats):
        order = ["tune", "plain"] if repeat % 2 == 0 else ["plain", "tune"]
        for kind in order:
            folder = os.path.join(scratch, f"{kind}-{repeat}")
            if kind == "tune":
                command = [PYTHON, "-m", "jobs.tune", "--config", SEARCH_FILE, "--no-report",
                           "--set", f"storage={folder}", "--set", "name=grid", "--set", "searcher=grid",
                           "--set", f"trials={len(seeds)}", "--set", "epochs=1", "--set", "concurrency=2",
                           "--set", "scheduler.name=fifo",
                           "--set", "space=[{key: run.seed, distribution: grid, values: "
                                    f"[{', '.join(map(str, seeds))}]}}]",
                           *sets(f"base.{value}" for value in recipe)]
                times[kind].append(run(command, os.path.join(scratch, f"{kind}-{repeat}.log")))
            else:
                commands = [[PYTHON, "-m", "jobs.train", "--config", RECIPE,
                             *sets(recipe + [f"run.seed={seed}", f"run.storage={folder}", f"run.name=seed{seed}"])]
                            for seed in seeds]
                started = time.perf_counter()
                with ThreadPoolExecutor(max_workers=2) as pool:
                    list(pool.map(lambda item: run(item[1], os.path.join(scratch, f"{kind}-{repeat}-{item[0]}.log")),
                                  enumerate(commands)))
                times[kind].append(time.perf_counter() - started)
            print(f"repeat {repeat} {kind}: {times[kind][-1]:.1f} s", flush=True)
    ratios = [tune / plain for tune, plain in zip(times["tune"], times["plain"])]
    summary = {
        "settings": {"trials": len(seeds), "steps": arguments.steps, "epochs": 1, "concurrency": 2,
                     "recipe": RECIPE, "overrides": recipe, "repeats": arguments.repeats, "scratch": scratch},
        "seconds": times, "ratio_tune_over_plain": ratios,
        "median_ratio": statistics.median(ratios),
        "trials_per_hour": {kind: [3600 * len(seeds) / value for value in values] for kind, values in times.items()},
    }
    print(json.dumps(summary, indent=1))
    print("written", record("overhead", summary))


# ------------------------------------------------------------------------------ search

def search(arguments: argparse.Namespace) -> None:
    name = f"demo_dtm_search{arguments.trials}"
    command = [PYTHON, "-m", "jobs.tune", "--config", SEARCH_FILE, "--set", f"trials={arguments.trials}",
               "--set", f"name={name}", "--set", f"storage={arguments.storage}",
               *sets(f"base.{value}" for value in COMMON + [f"data.split={arguments.split}"])]
    log = os.path.join(ROOT, "bench_out", f"tune_search_{name}.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    elapsed = run(command, log)
    experiment = os.path.join(arguments.storage, name)
    import pyarrow.parquet as pq

    trials = pq.read_table(os.path.join(ROOT, experiment, "report", "trials.parquet")).to_pylist()
    epochs = sorted(int(row["epochs"] or 0) for row in trials)
    summary = {"settings": {"search_file": SEARCH_FILE, "trials": arguments.trials, "command": command},
               "experiment": experiment, "seconds": elapsed, "trials_per_hour": 3600 * len(trials) / elapsed,
               "epochs_per_trial": epochs}
    print(json.dumps(summary, indent=1))
    print("written", record("search", summary))


# ------------------------------------------------------------------------------ confirm

def confirm(arguments: argparse.Namespace) -> None:
    best_config = os.path.join(arguments.experiment, "report", "best_config.yaml")
    storage = os.path.join("bench_out", "runs", "tune-confirm")
    candidates = {"default": RECIPE, "best": best_config}
    commands = []
    for seed in range(arguments.seeds):
        for name, recipe in candidates.items():
            overrides = [f"data.split={arguments.split}", "run.threads=1", f"run.seed={seed}",
                         f"run.storage={storage}", f"run.name={name}-seed{seed}", "run.resume=true"]
            commands.append((name, seed, [PYTHON, "-m", "jobs.train", "--config", recipe, *sets(overrides)]))
    os.makedirs(os.path.join(ROOT, storage), exist_ok=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda item: run(item[2], os.path.join(ROOT, storage, f"{item[0]}-seed{item[1]}.log")),
                      commands))
    figures: dict[str, dict[str, list[float]]] = {}
    for name in candidates:
        for seed in range(arguments.seeds):
            with open(os.path.join(ROOT, storage, f"{name}-seed{seed}", "metrics.json")) as handle:
                final = json.load(handle)
            halves = final["final"]["validation"]["halves"]
            values = {"report_at_selection_epoch": final["best_report_macro_f1"],
                      "report_last_epoch": halves["report"]["macro_f1"],
                      "selection_last_epoch": halves["selection"]["macro_f1"],
                      "all_last_epoch": final["final"]["validation"]["macro_f1"]}
            for key, value in values.items():
                figures.setdefault(name, {}).setdefault(key, []).append(float(value))
    differences = {}
    for key in figures["best"]:
        paired = [best - default for best, default in zip(figures["best"][key], figures["default"][key])]
        mean, half_width = interval(paired)
        differences[key] = {"mean": mean, "ci95_half_width": half_width, "per_seed": paired}
    summary = {"settings": {"experiment": arguments.experiment, "best_config": best_config, "seeds": arguments.seeds,
                            "split": arguments.split},
               "figures": figures, "best_minus_default": differences}
    print(json.dumps(summary, indent=1))
    print("written", record("confirm", summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="demo_run/split")
    parts = parser.add_subparsers(dest="part", required=True)
    part = parts.add_parser("overhead")
    part.add_argument("--repeats", type=int, default=3)
    part.add_argument("--trials", type=int, default=4)
    part.add_argument("--steps", type=int, default=50)
    part = parts.add_parser("search")
    part.add_argument("--trials", type=int, default=20)
    part.add_argument("--storage", default="demo_run/tune")
    part = parts.add_parser("confirm")
    part.add_argument("--experiment", required=True)
    part.add_argument("--seeds", type=int, default=5)
    arguments = parser.parse_args()
    {"overhead": overhead, "search": search, "confirm": confirm}[arguments.part](arguments)


if __name__ == "__main__":
    main()
