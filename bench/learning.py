"""Learning benchmark: each SSL method against its own control (the same recipe with the unlabeled
data, or the method's own extra machinery, switched off), with the supervised recipe as a second
reference; same backbone, image size, optimizer, steps and seeds; from scratch or warm-started
from a supervised run of the same seed.

    .venv/bin/python bench/learning.py --start warm --seeds 0 1 2 3 4 \
        --only supervised dtm_off dtm_average dtm_stop_gradient --out bench_out/learning_warm.json

Every run is a demo recipe plus the overrides the script prints, so one row can be re-run alone with
`python -m jobs.train --config jobs/recipes/<recipe>.yaml --set ...`. Figures per run (final epoch,
validation of the Aff-Wild2 videos): macro-F1 raw and smoothed, on all videos and on the two
halves (`evaluation.halves_seed`): defaults are chosen on the selection half and reported on the
report half. Per configuration: mean and sample standard deviation over seeds; per SSL method: the
paired per-seed difference against its control with a 95% t interval (significant when the interval
excludes 0), and the pseudo-label acceptance rate and accuracy against the labels the split hid.

The output records the settings; the script refuses to add runs to an output made with other
settings. Warm starts come from the script's own supervised runs, named by the settings that made
them (`learning-init-<key>-seed<N>`), exported to a file named by the checkpoint's digest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jobs.demo import CONTROL_OVERRIDES, export_warm_start  # noqa: E402
from pipeline.training.config import load_config  # noqa: E402
from pipeline.training.loop import Trainer  # noqa: E402
from pipeline.tuning.ablation import interval  # noqa: E402

RECIPES = os.path.join(ROOT, "jobs", "recipes")
FORMAT_VERSION = 2

# name -> (recipe, extra overrides, control). A control is the same recipe with the unlabeled data
# (or, where the method cannot run without it, the method's own extra terms) switched off: the
# overrides `make demo` uses for its control (jobs.demo.CONTROL_OVERRIDES).
CONFIGURATIONS: dict[str, tuple[str, list[str], str | None]] = {
    "supervised": ("demo_seed002_supervised", [], None),
    # DTM without the unlabeled pool: labeled CE, the same EMA network B evaluated, same optimizer.
    "dtm_off": ("demo_abaw5_dtm", CONTROL_OVERRIDES["dtm"], None),
    # The paper's literal loss CE(y_hat, (P_w + P_s) / 2), gradient through both views ...
    "dtm_average": ("demo_abaw5_dtm", ["method_options.unlabeled_loss=average"], "dtm_off"),
    # ... and the FixMatch-style alternative: detached target, CE on the strong view.
    "dtm_stop_gradient": ("demo_abaw5_dtm", ["method_options.unlabeled_loss=stop_gradient"], "dtm_off"),
    # feedback raises without unlabeled views (its student learns only from the teacher's pseudo
    # labels), so its control switches off the feedback term: the student still learns from the
    # teacher's pseudo labels, the teacher from labels and consistency only.
    "feedback_off": ("demo_abaw6_feedback", CONTROL_OVERRIDES["feedback"], None),
    "feedback": ("demo_abaw6_feedback", [], "feedback_off"),
    # mutexmatch without the unlabeled pool: labeled CE and the TNC's labeled complementary term.
    "mutexmatch_off": ("demo_seed002_mutexmatch", CONTROL_OVERRIDES["mutexmatch"], None),
    "mutexmatch": ("demo_seed002_mutexmatch", [], "mutexmatch_off"),
    # noise_aware takes no unlabeled data; its control switches off its own machinery: the
    # clean/noisy split and the CAM consistency term (SCN weighting and rank regularisation stay).
    "noise_aware_off": ("demo_seed002_noise_aware", CONTROL_OVERRIDES["noise_aware"], None),
    "noise_aware": ("demo_seed002_noise_aware", [], "noise_aware_off"),
}
SUPERVISED = "supervised"
WARMUP_RECIPE = "demo_seed002_supervised"


def split_identity(split: str) -> dict:
    """What identifies the split's content (not when it was written: `make demo` rewrites the same
    split on every run): its path, seed, counts, the checksums of its labeled and validation
    shards and the digest of the unlabeled pool's exclusion list."""
    from pipeline.data import shards

    with open(os.path.join(split, "_split.json")) as handle:
        manifest = json.load(handle)
    checksums = {part: [entry.checksum for entry in shards.Manifest.load(os.path.join(split, part)).files]
                 for part in ("labeled", "validation")}
    with open(os.path.join(split, "unlabeled", "excluded_ids.parquet"), "rb") as handle:
        checksums["unlabeled_excluded_ids"] = hashlib.sha256(handle.read()).hexdigest()[:16]
    return {"path": os.path.abspath(split), "seed": manifest.get("seed"),
            "per_class": manifest.get("per_class"), "labeled": manifest.get("labeled"),
            "unlabeled": manifest.get("unlabeled"), "checksums": checksums}


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def common_overrides(arguments: argparse.Namespace, steps: int) -> list[str]:
    return [f"data.split={arguments.split}", f"model.backbone={arguments.backbone}",
            f"data.image_size={arguments.image_size}", f"data.unlabeled_ratio={arguments.unlabeled_ratio}",
            f"run.epochs={arguments.epochs}", f"run.steps_per_epoch={steps // arguments.epochs}",
            f"evaluation.halves_seed={arguments.halves_seed}", "evaluation.windows=[10,30]",
            f"run.threads={arguments.threads}", f"run.storage={arguments.storage}"]


def warm_start_name(settings: dict, seed: int) -> str:
    defining = {key: settings[key] for key in ("split", "backbone", "image_size", "epochs", "warm_steps",
                                                "halves_seed")}
    return f"learning-init-{settings_key(defining)}-seed{seed}"


def start_point_rows(results: dict, storage: str) -> dict[int, dict]:
    """The warm-start runs' own figures (the supervised network every warm run starts from)."""
    settings = results["settings"]
    if settings.get("start") != "warm":
        return {}
    seeds = sorted({entry["seed"] for entries in results["runs"].values() for entry in entries})
    rows = {}
    for seed in seeds:
        path = os.path.join(storage, warm_start_name(settings, seed), "metrics.json")
        if os.path.exists(path):
            with open(path) as handle:
                rows[seed] = summarise_run(json.load(handle), float("nan"))
    return rows


def warm_start(arguments: argparse.Namespace, settings: dict, seed: int) -> str:
    """This seed's supervised start point, trained (or resumed, or found finished) under a name
    made from the settings that define it, then exported by checkpoint digest."""
    name = warm_start_name(settings, seed)
    overrides = [*common_overrides(arguments, arguments.warm_steps), f"run.seed={seed}",
                 f"run.name={name}", "run.resume=true"]
    print(f"== warm start, seed {seed}: python -m jobs.train --config jobs/recipes/{WARMUP_RECIPE}.yaml "
          + " ".join(f"--set {item}" for item in overrides), flush=True)
    config = load_config(os.path.join(RECIPES, f"{WARMUP_RECIPE}.yaml"), overrides)
    Trainer(config).fit()
    return export_warm_start(os.path.join(arguments.storage, name))


def summarise_run(final: dict, seconds: float) -> dict:
    validation = final["final"]["validation"]
    halves = validation["halves"]
    quality = final["final"].get("pseudo_label_quality")
    return {
        "macro_f1": validation["macro_f1"],
        "smoothed": {window: value["macro_f1"] for window, value in validation["smoothed"].items()},
        "selection": halves["selection"]["macro_f1"],
        "report": halves["report"]["macro_f1"],
        "best_epoch": final["best_epoch"],
        "best_selection_macro_f1": final["best_selection_macro_f1"],
        "best_report_macro_f1": final["best_report_macro_f1"],
        "pseudo_labels": None if not quality else {
            "acceptance_rate": quality["acceptance_rate"], "accuracy": quality["accuracy"],
            "per_class": {name: {"accepted_as": figures["accepted_as"], "precision": figures["precision"]}
                          for name, figures in quality["per_class"].items()}},
        "seconds": seconds,
    }


def mean_std(values: list[float]) -> str:
    array = np.asarray(values, dtype=float)
    spread = array.std(ddof=1) if len(array) > 1 else float("nan")
    return f"{array.mean():.3f} ± {spread:.3f}"


def paired(values: list[float], controls: list[float]) -> tuple[float, float, float]:
    """Mean per-seed difference and its 95% t interval."""
    mean, half = interval([value - control for value, control in zip(values, controls)])
    if half is None:
        return mean, float("nan"), float("nan")
    return mean, mean - half, mean + half


def difference_text(values: list[float], controls: list[float]) -> str:
    mean, low, high = paired(values, controls)
    significant = low > 0 or high < 0
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]{' *' if significant else ''}"


def by_seed(entries: list[dict]) -> dict[int, dict]:
    return {entry["seed"]: entry for entry in entries}


def print_tables(results: dict, storage: str) -> None:
    runs = dict(results["runs"])
    starts = start_point_rows(results, storage)
    if starts:
        runs = {"(warm start: supervised, warm_steps)": [{**row, "seed": seed} for seed, row in starts.items()],
                **runs}
    print("\n| configuration | macro-F1 raw | smoothed w=10 | smoothed w=30 | selection half | report half "
          "| report half, epoch chosen on selection | accepted | pseudo-label accuracy | per seed (raw) | s/run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, entries in runs.items():
        entries = sorted(entries, key=lambda entry: entry["seed"])
        accepted = [entry["pseudo_labels"]["acceptance_rate"] for entry in entries if entry["pseudo_labels"]]
        accuracy = [entry["pseudo_labels"]["accuracy"] for entry in entries
                    if entry["pseudo_labels"] and entry["pseudo_labels"]["accuracy"] is not None]
        seconds = [entry["seconds"] for entry in entries if np.isfinite(entry["seconds"])]
        cells = [f"{name} (n={len(entries)})"]
        cells += [mean_std([pick(entry) for entry in entries]) for pick in (
            lambda entry: entry["macro_f1"], lambda entry: entry["smoothed"]["10"],
            lambda entry: entry["smoothed"]["30"], lambda entry: entry["selection"],
            lambda entry: entry["report"], lambda entry: entry["best_report_macro_f1"])]
        cells.append(f"{np.mean(accepted):.1%}" if accepted else "-")
        cells.append(f"{np.mean(accuracy):.1%}" if accuracy else "-")
        cells.append(", ".join(f"{entry['macro_f1']:.3f}" for entry in entries))
        print("| " + " | ".join(cells)
              + " | " + (f"{np.mean(seconds):.0f}" if seconds else "-") + " |")

    print("\nPaired per-seed difference, mean [95% t interval] (* : the interval excludes 0)")
    print("\n| configuration | against | seeds | raw, all videos | smoothed w=30 | selection half | report half "
          "| report half, epoch chosen on selection |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (_, _, control) in CONFIGURATIONS.items():
        if name not in runs or name in starts:
            continue
        for reference in (control, SUPERVISED):
            if reference is None or reference == name or reference not in runs:
                continue
            mine, theirs = by_seed(runs[name]), by_seed(runs[reference])
            seeds = sorted(set(mine) & set(theirs))
            if not seeds:
                continue
            columns = []
            for pick in (lambda entry: entry["macro_f1"], lambda entry: entry["smoothed"]["30"],
                         lambda entry: entry["selection"], lambda entry: entry["report"],
                         lambda entry: entry["best_report_macro_f1"]):
                columns.append(difference_text([pick(mine[seed]) for seed in seeds],
                                               [pick(theirs[seed]) for seed in seeds]))
            print(f"| {name} | {reference} | {len(seeds)} | " + " | ".join(columns) + " |")

    if "dtm_average" in runs and "dtm_stop_gradient" in runs:
        average, gradient = by_seed(runs["dtm_average"]), by_seed(runs["dtm_stop_gradient"])
        seeds = sorted(set(average) & set(gradient))
        selection = {name: np.mean([table[seed]["selection"] for seed in seeds])
                     for name, table in (("average", average), ("stop_gradient", gradient))}
        chosen = max(selection, key=selection.get)
        table = gradient if chosen == "stop_gradient" else average
        other = average if chosen == "stop_gradient" else gradient
        print(f"\nDTM unlabeled_loss on the selection half ({len(seeds)} seeds): average "
              f"{selection['average']:.3f}, stop_gradient {selection['stop_gradient']:.3f} -> {chosen}; "
              f"selection-half difference {chosen} - other "
              + difference_text([table[seed]["selection"] for seed in seeds],
                                [other[seed]["selection"] for seed in seeds])
              + f"; report half of {chosen}: {mean_std([table[seed]['report'] for seed in seeds])}, "
              f"difference {chosen} - other on the report half "
              + difference_text([table[seed]["report"] for seed in seeds],
                                [other[seed]["report"] for seed in seeds]))

    print("\nPseudo labels of the last epoch, per class: accepted count / precision (mean over seeds)")
    for name, entries in runs.items():
        with_labels = [entry["pseudo_labels"] for entry in entries if entry["pseudo_labels"]]
        if not with_labels:
            continue
        classes = list(with_labels[0]["per_class"])
        parts = []
        for cls in classes:
            accepted = sum(item["per_class"][cls]["accepted_as"] for item in with_labels)
            precision = [item["per_class"][cls]["precision"] for item in with_labels
                         if item["per_class"][cls]["precision"] is not None]
            parts.append(f"{cls} {accepted / len(with_labels):.0f}/"
                         + (f"{np.mean(precision):.2f}" if precision else "-"))
        print(f"  {name}: " + ", ".join(parts))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--split", default="demo_run/split")
    parser.add_argument("--start", choices=("scratch", "warm"), required=True,
                        help="random initialisation, or every run starts from the supervised "
                             "warm-start run of its seed (head included)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--warm-steps", type=int, default=400,
                        help="steps of the supervised warm-start run (--start warm)")
    parser.add_argument("--steps", type=int, default=200, help="steps of every compared run")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--unlabeled-ratio", type=int, default=1)
    parser.add_argument("--halves-seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--storage", default="bench_out/runs")
    parser.add_argument("--out", default="bench_out/learning.json")
    parser.add_argument("--report-only", action="store_true", help="print the tables of --out and stop")
    arguments = parser.parse_args()

    if arguments.report_only:
        with open(arguments.out) as handle:
            print_tables(json.load(handle), arguments.storage)
        return 0
    settings = {"format": FORMAT_VERSION, "split": split_identity(arguments.split), "start": arguments.start,
                "warm_steps": arguments.warm_steps if arguments.start == "warm" else None,
                "steps": arguments.steps, "epochs": arguments.epochs, "backbone": arguments.backbone,
                "image_size": arguments.image_size, "unlabeled_ratio": arguments.unlabeled_ratio,
                "halves_seed": arguments.halves_seed,
                "recipes": {name: [recipe, extra] for name, (recipe, extra, _) in CONFIGURATIONS.items()}}
    results = {"settings": settings, "runs": {}}
    if os.path.exists(arguments.out):  # resume a long benchmark where it stopped
        with open(arguments.out) as handle:
            existing = json.load(handle)
        if existing.get("settings") != json.loads(json.dumps(settings)):
            print(f"{arguments.out} holds runs made with other settings; refusing to mix them "
                  f"(use another --out). Stored: {json.dumps(existing.get('settings'))}", file=sys.stderr)
            return 2
        results = existing
    recipe_text = {}
    for recipe in {recipe for recipe, _, _ in CONFIGURATIONS.values()} | {WARMUP_RECIPE}:
        with open(os.path.join(RECIPES, f"{recipe}.yaml")) as handle:
            recipe_text[recipe] = hashlib.sha256(handle.read().encode()).hexdigest()[:12]
    if results.setdefault("recipe_digests", recipe_text) != recipe_text:
        print(f"{arguments.out}: a recipe changed since these runs were made; refusing to mix them",
              file=sys.stderr)
        return 2
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    results.setdefault("commits", [])
    if commit and commit not in results["commits"]:
        results["commits"].append(commit)
    key = settings_key(settings)
    os.makedirs(os.path.dirname(arguments.out) or ".", exist_ok=True)
    for seed in arguments.seeds:
        weights = None
        for name, (recipe, extra, _) in CONFIGURATIONS.items():
            if arguments.only and name not in arguments.only:
                continue
            if any(entry["seed"] == seed for entry in results["runs"].get(name, [])):
                continue
            if arguments.start == "warm" and weights is None:
                weights = warm_start(arguments, settings, seed)
            overrides = [*common_overrides(arguments, arguments.steps), f"run.seed={seed}", "run.resume=false",
                         f"run.name=learning-{key}-{name}-seed{seed}", *extra]
            if weights:
                overrides += [f"model.pretrained_path={weights}", "model.pretrained_head=true"]
            print(f"== {name} seed {seed}: python -m jobs.train --config jobs/recipes/{recipe}.yaml "
                  + " ".join(f"--set {item}" for item in overrides), flush=True)
            started = time.perf_counter()
            final = Trainer(load_config(os.path.join(RECIPES, f"{recipe}.yaml"), overrides)).fit()
            outcome = summarise_run(final, time.perf_counter() - started)
            outcome["seed"] = seed
            outcome["start_weights"] = weights
            results["runs"].setdefault(name, []).append(outcome)
            with open(arguments.out + ".tmp", "w") as handle:
                json.dump(results, handle, indent=1)
            os.replace(arguments.out + ".tmp", arguments.out)
    print_tables(results, arguments.storage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
