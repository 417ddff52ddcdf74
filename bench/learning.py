"""Learning benchmark: supervised vs each SSL method on the demo split, same backbone, steps and
seeds; validation macro-F1 raw and smoothed, mean ± spread over seeds.

    .venv/bin/python bench/learning.py --split demo_run/split --seeds 0 1 2 --steps 300

Each configuration is a demo recipe plus the overrides below, so a row can be re-run alone with
`python -m jobs.train --config jobs/recipes/<recipe>.yaml --set ...` (the script prints them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.training import checkpoint  # noqa: E402
from pipeline.training.config import load_config  # noqa: E402
from pipeline.training.loop import Trainer  # noqa: E402

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "recipes")

# name -> (recipe, extra overrides)
CONFIGURATIONS = {
    "supervised": ("demo_seed002_supervised", []),
    # The paper's literal loss CE(y_hat, (P_w + P_s) / 2), gradient through both views ...
    "dtm_average": ("demo_abaw5_dtm", ["method_options.unlabeled_loss=average"]),
    # ... and the FixMatch-style alternative: detached target, CE on the strong view.
    "dtm_stop_gradient": ("demo_abaw5_dtm", ["method_options.unlabeled_loss=stop_gradient"]),
    "feedback": ("demo_abaw6_feedback", []),
    "mutexmatch": ("demo_seed002_mutexmatch", []),
    "noise_aware": ("demo_seed002_noise_aware", []),
}


def run_one(recipe: str, overrides: list[str]) -> dict:
    config = load_config(os.path.join(RECIPES, f"{recipe}.yaml"), overrides)
    started = time.perf_counter()
    final = Trainer(config).fit()
    validation = final["final"]["validation"]
    return {
        "macro_f1": validation["macro_f1"],
        "smoothed": {window: value["macro_f1"] for window, value in validation["smoothed"].items()},
        "seconds": time.perf_counter() - started,
        "acceptance": final["final"]["pseudo_label_acceptance_rate"],
    }


def export_supervised_backbone(run_folder: str, path: str) -> str:
    """The supervised run's final network as a plain state dict, for `model.pretrained_path`:
    every method then starts from the same trained network, head included (the papers all start
    from pretrained backbones; from scratch, few labels leave SSL targets mostly noise)."""
    if not os.path.exists(path):
        state = checkpoint.load(checkpoint.latest(run_folder))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(state["method"]["model"], path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--split", default="demo_run/split")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--unlabeled-ratio", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    parser.add_argument("--init-from-supervised", action="store_true",
                        help="start every method from the backbone of this script's supervised run "
                             "of the same seed (run without this flag first)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (run two of these scripts side by side on 2 cores)")
    parser.add_argument("--out", default="bench_out/learning.json")
    arguments = parser.parse_args()

    results: dict[str, list[dict]] = {}
    if os.path.exists(arguments.out):  # resume a long benchmark where it stopped
        with open(arguments.out) as handle:
            results = json.load(handle)
    os.makedirs(os.path.dirname(arguments.out) or ".", exist_ok=True)
    for name, (recipe, extra) in CONFIGURATIONS.items():
        if arguments.only and name not in arguments.only:
            continue
        for seed in arguments.seeds:
            if any(entry["seed"] == seed for entry in results.get(name, [])):
                continue
            overrides = [
                f"data.split={arguments.split}", f"model.backbone={arguments.backbone}",
                f"data.image_size={arguments.image_size}",
                f"data.unlabeled_ratio={arguments.unlabeled_ratio}",
                f"run.epochs={arguments.epochs}",
                f"run.steps_per_epoch={arguments.steps // arguments.epochs}",
                f"run.seed={seed}", "run.resume=false", "run.storage=bench_out/runs",
                f"run.name=learning-{name}-seed{seed}",
                "evaluation.windows=[10,30]", f"run.threads={arguments.threads}", *extra,
            ]
            if arguments.init_from_supervised:
                weights = export_supervised_backbone(
                    f"bench_out/runs/learning-supervised-seed{seed}", f"bench_out/init/supervised-seed{seed}.pt")
                overrides += [f"model.pretrained_path={weights}", "model.pretrained_head=true",
                              f"run.name=learning-warm-{name}-seed{seed}"]
            print(f"== {name} seed {seed}: python -m jobs.train --config jobs/recipes/{recipe}.yaml "
                  + " ".join(f"--set {item}" for item in overrides), flush=True)
            outcome = run_one(recipe, overrides)
            outcome["seed"] = seed
            results.setdefault(name, []).append(outcome)
            with open(arguments.out, "w") as handle:
                json.dump(results, handle, indent=1)

    print("\n| method | macro-F1 raw | smoothed w=10 | smoothed w=30 | per seed (raw) | s/run |")
    print("|---|---|---|---|---|---|")
    for name, entries in results.items():
        raw = np.array([entry["macro_f1"] for entry in entries])
        ten = np.array([entry["smoothed"]["10"] for entry in entries])
        thirty = np.array([entry["smoothed"]["30"] for entry in entries])
        seconds = np.mean([entry["seconds"] for entry in entries])
        print(f"| {name} | {raw.mean():.3f} ± {raw.std():.3f} | {ten.mean():.3f} ± {ten.std():.3f} "
              f"| {thirty.mean():.3f} ± {thirty.std():.3f} | "
              + ", ".join(f"{value:.3f}" for value in raw) + f" | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
