"""The ABAW6 ablation on the demo corpus: validation macro-F1 of the frame model, + smoothing, + the
temporal encoder, + both, over seeds (each seed: its own frame model and temporal seed).

    .venv/bin/python bench/temporal.py --frame-runs bench_out/runs/learning-warm-dtm_stop_gradient-seed{0,1,2} \
        --shards demo_run/shards/affwild2 [--set temporal.epochs=4 ...]

Each row is one `jobs.train_temporal` run (demo_temporal recipe, `temporal.seed` = the seed index,
run name temporal-<frame run>), so a row can be re-run alone with the command it prints. Also
reported, to tell where a temporal gain comes from: the same encoder trained on clips of length 1
(no temporal context, the same labels and features).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs import train_temporal  # noqa: E402
from pipeline.temporal.training import METRICS  # noqa: E402

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "recipes",
                      "demo_temporal.yaml")


def run(frame_run: str, shards: str, storage: str, name: str, seed: int, extra: list[str]) -> dict:
    features = os.path.join(storage, "features", os.path.basename(frame_run.rstrip("/")))
    settings = [f"frame_checkpoint={frame_run}", f"shards={shards}", f"run.storage={storage}",
                f"run.name={name}", f"temporal.seed={seed}", f"features={features}", *extra]
    argv = ["--config", RECIPE, *[item for setting in settings for item in ("--set", setting)]]
    print("python -m jobs.train_temporal " + " ".join(argv), flush=True)
    if train_temporal.main(argv) != 0:
        raise RuntimeError(f"{name} failed")
    with open(os.path.join(storage, name, METRICS)) as handle:
        return json.load(handle)["ablation"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frame-runs", nargs="+", required=True)
    parser.add_argument("--shards", default="demo_run/shards/affwild2")
    parser.add_argument("--storage", default="bench_out/temporal")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default="bench_out/temporal.json")
    parser.add_argument("--tag", default="", help="suffix of the run names (one per setting compared)")
    parser.add_argument("--no-control", action="store_true", help="skip the clip-length-1 control runs")
    arguments = parser.parse_args()
    storage = os.path.abspath(arguments.storage)
    rows: dict[str, list[dict]] = {"temporal": [], "clip 1 (no context)": []}
    for seed, frame_run in enumerate(arguments.frame_runs):
        base = os.path.basename(frame_run.rstrip("/"))
        rows["temporal"].append(run(frame_run, arguments.shards, storage, f"temporal{arguments.tag}-{base}", seed,
                                   arguments.overrides))
        if arguments.no_control:
            continue
        rows["clip 1 (no context)"].append(run(frame_run, arguments.shards, storage, f"frame-only{arguments.tag}-{base}", seed,
                                               [*arguments.overrides, "temporal.clip_length=1"]))
    table = {}
    for setting, results in rows.items():
        if not results:
            continue
        for name in results[0]:
            values = np.array([result[name] for result in results])
            table[f"{setting}: {name}"] = {"mean": float(values.mean()), "std": float(values.std(ddof=1))
                                           if len(values) > 1 else 0.0, "values": values.tolist()}
    print("\nrow                                   mean    std    per seed")
    for name, value in table.items():
        print(f"{name:36s} {value['mean']:.4f} {value['std']:.4f}  "
              + " ".join(f"{item:.4f}" for item in value["values"]))
    os.makedirs(os.path.dirname(arguments.out), exist_ok=True)
    with open(arguments.out, "w") as handle:
        json.dump({"table": table, "frame_runs": arguments.frame_runs, "overrides": arguments.overrides}, handle,
                  indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
