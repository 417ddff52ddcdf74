"""The embedded default, end to end on a generated corpus: generate -> ingest (Ray Data) -> split
-> train -> infer -> pseudolabel -> temporal refine, then the ablation summary.

    python -m jobs.demo [--out demo_run] [--per-class 20] [--seed 0] [--corpus-size default|tiny]
                        [--train-recipe demo_abaw5_dtm|none] [--train-set key=value ...]

Starts a local Ray in-process (or joins RAY_ADDRESS under `ray job submit`), writes the demo corpus
in the four real on-disk formats under `<out>/corpus`, ingests each through the real readers into
`<out>/shards`, splits into `<out>/split`, prints the manifests' summary, trains the chosen demo
recipe on the split (`<out>/runs/<recipe>`), runs batch inference with smoothing on the Aff-Wild2
validation videos (`<out>/inference`, with an ABAW submission file), exports pseudo labels for the
unlabeled pool (`<out>/pseudolabels`), trains the temporal encoder on the frozen model's features
(`<out>/runs/demo_temporal`) and prints the ablation: frame model / + temporal / + smoothing.
Re-running reuses an identical existing corpus, rewrites the data outputs in place and resumes
(here: finds finished) the training runs; inference and export skip files already done.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import sys
import time

import torch

from pipeline import config
from pipeline.data import ingest, schema, storage
from pipeline.data.ray_ingest import RayDataExecutor, cluster_cpus
from pipeline.data.readers import make_reader
from pipeline.data.split import make_split
from pipeline.demo.corpus import PRESETS, DemoCorpusConfig, write_demo_corpus
from pipeline.training import checkpoint
from pipeline.training.config import TrainConfig, load_config, to_mapping
from pipeline.training.loop import Trainer

CORPUS_STAMP = "_demo_corpus.json"
DOWNSTREAM_STAMP = "_downstream_source.json"
RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
WARMUP_RECIPE = "demo_seed002_supervised"
WARMUP_RUN = "demo_warmup_supervised"
WARMUP_STEPS = 400
"""The supervised warm-up's budget on the default demo split (BENCHMARKS.md, learning section)."""
CONTROL_OVERRIDES: dict[str, list[str]] = {
    # The same recipe without the unlabeled pool: labeled loss, same network, EMA, optimizer, steps.
    "dtm": ["data.use_unlabeled=false"],
    "mutexmatch": ["data.use_unlabeled=false"],
    # feedback's student learns from unlabeled images alone (it refuses use_unlabeled=false): its
    # control keeps them and switches off the feedback term.
    "feedback": ["method_options.feedback_weight=0"],
    # noise_aware takes no unlabeled data: its machinery is the clean/noisy split and the CAM term.
    "noise_aware": ["method_options.clean_split=false", "method_options.consistency_weight=0"],
}
"""Per method, the overrides that turn a recipe into its control (what the method adds, off)."""


def prepare_corpus(folder: str, corpus_config: DemoCorpusConfig) -> None:
    """Write the corpus unless one made with the same config is already complete there."""
    stamp = os.path.join(folder, CORPUS_STAMP)
    wanted = config.to_mapping(corpus_config)
    if os.path.exists(stamp):
        with open(stamp) as handle:
            if json.load(handle) == json.loads(json.dumps(wanted)):
                print(f"[demo] reusing corpus in {folder}")
                return
        os.remove(stamp)
    started = time.perf_counter()
    corpus = write_demo_corpus(folder, corpus_config)
    with open(stamp, "w") as handle:
        json.dump(wanted, handle)
    print(f"[demo] wrote corpus {corpus.counts} in {time.perf_counter() - started:.1f} s")


def clear_stale_downstream(out: str, run: str, run_storage: str) -> tuple[str, dict]:
    """Inference, the pseudo-label export and the temporal run skip work already done for the same
    checkpoint path, but the demo retrains a run in place when its settings change: outputs made from
    another network (told by the digest of the run's latest checkpoint) are removed first. Returns the
    stamp to write once downstream has finished."""
    uri = checkpoint.latest(run)
    source = {"run": run, "checkpoint_sha256": hashlib.sha256(storage.read_bytes(uri)).hexdigest()[:16]}
    stamp = storage.join(out, DOWNSTREAM_STAMP)
    if not storage.exists(stamp) or storage.read_json(stamp) != source:
        for folder in (storage.join(out, "inference"), storage.join(out, "pseudolabels"),
                       storage.join(run_storage, "demo_temporal")):
            if storage.exists(folder):
                print(f"[demo] removing {folder}: not made from the current {run}")
                fs, path = storage.filesystem(folder)
                fs.rm(path, recursive=True)
        storage.remove(stamp)
    return stamp, source


def downstream(out: str, run: str, shard_folder: str, split_folder: str, run_storage: str,
               temporal_set: list[str]) -> str:
    """infer -> pseudolabel -> temporal refine on the trained run; returns the outputs' line part."""
    from jobs import infer, pseudolabel, train_temporal

    affwild2 = storage.join(shard_folder, schema.AFFWILD2)
    annotations = storage.join(out, "corpus", schema.AFFWILD2, "EXPR_Classification_Challenge",
                               "Validation_Set")
    inference = storage.join(out, "inference")
    print("\n== infer (Aff-Wild2 validation, window 30) ==")
    if infer.main(["--checkpoint", run, "--shards", affwild2, "--subset", schema.VALIDATION,
                   "--out", inference, "--window", "30", "--submission", annotations]) != 0:
        raise RuntimeError("jobs.infer failed")
    pseudo = storage.join(out, "pseudolabels")
    print("\n== pseudolabel (the unlabeled pool) ==")
    from pipeline.inference.predict import load_frame_model

    # Methods without class thresholds (supervised, noise-aware) export at a fixed confidence.
    fixed = [] if load_frame_model(run).thresholds() is not None else ["--confidence", "0.95"]
    if pseudolabel.main(["--checkpoint", run, "--split", split_folder, "--out", pseudo, *fixed]) != 0:
        raise RuntimeError("jobs.pseudolabel failed")
    print("\n== temporal refine (frozen frame model -> Transformer over clips, demo_temporal.yaml) ==")
    recipe = os.path.join(RECIPES, "demo_temporal.yaml")
    settings = [f"frame_checkpoint={run}", f"shards={affwild2}", f"run.storage={run_storage}", *temporal_set]
    if train_temporal.main(["--config", recipe, *[item for setting in settings for item in ("--set", setting)]]) != 0:
        raise RuntimeError("jobs.train_temporal failed")
    return (f", {inference} (per-video predictions, submission.txt), {pseudo} (pseudo labels), "
            f"{storage.join(run_storage, 'demo_temporal')} (temporal run)")


def export_warm_start(run_folder: str) -> str:
    """The finished run's final network (head included) as a plain weight file for
    `model.pretrained_path`, beside the run and named by the digest of the checkpoint it came
    from: a re-trained or changed source run gets a new file (and so a new path in every config
    that starts from it), never a stale one. Reuses the file when the checkpoint is unchanged."""
    uri = checkpoint.latest(run_folder)
    if uri is None:
        raise RuntimeError(f"{run_folder}: no checkpoint to warm-start from")
    data = storage.read_bytes(uri)
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = storage.join(run_folder, f"warm_start-{digest}.pt")
    if not storage.exists(path):
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        buffer = io.BytesIO()
        torch.save({"state_dict": state["method"]["model"], "source": uri, "source_sha256": digest}, buffer)
        storage.write_bytes_atomic(path, buffer.getvalue())
    return path


def train_fresh_or_resume(config: TrainConfig) -> dict:
    """`Trainer(config).fit()`, resuming (or finding finished) a run of the same name only when it
    was started with the same settings (run.threads aside); a run started with other settings is
    removed and trained afresh, so a re-run with new flags never continues or reports a stale run."""
    folder = storage.join(config.run.storage, config.run.name)
    uri = checkpoint.latest(folder)
    if uri is not None:
        saved = json.loads(checkpoint.load(uri, map_location="cpu")["config"])
        wanted = json.loads(json.dumps(to_mapping(config)))
        for mapping in (saved, wanted):
            mapping["run"].pop("threads", None)
        if saved != wanted:
            print(f"[demo] {folder} was trained with other settings: training it afresh")
            fs, path = storage.filesystem(folder)
            fs.rm(path, recursive=True)
    return Trainer(config).fit()


def run_summary(final: dict) -> dict:
    """The figures of a finished run that the demo's comparison prints."""
    validation = (final["final"] or {}).get("validation") or {}
    halves = validation.get("halves") or {}
    smoothed = validation.get("smoothed") or {}
    return {"raw": validation.get("macro_f1"),
            "smoothed": {window: value["macro_f1"] for window, value in smoothed.items()},
            "selection": (halves.get("selection") or {}).get("macro_f1"),
            "report": (halves.get("report") or {}).get("macro_f1"),
            "best_epoch": final["best_epoch"], "best_selection": final["best_selection_macro_f1"],
            "best_report": final["best_report_macro_f1"],
            "pseudo_label_quality": (final["final"] or {}).get("pseudo_label_quality")}


def print_run(final: dict) -> None:
    summary = run_summary(final)
    smoothed = ", ".join(f"window {window}: {value:.3f}" for window, value in summary["smoothed"].items())
    print(f"validation macro-F1 {summary['raw'] if summary['raw'] is not None else float('nan'):.3f} raw; "
          f"smoothed {smoothed}")
    if final["best_epoch"] is not None:
        print(f"best epoch {final['best_epoch']} (chosen on the selection half of the validation "
              f"videos: {final['best_selection_macro_f1']:.3f}); report half {final['best_report_macro_f1']:.3f}")


def comparison_lines(rows: list[tuple[str, dict]]) -> str:
    """Side by side: macro-F1 after the last step on all validation videos (raw, smoothed) and on
    the selection / report halves."""
    windows = sorted({window for _, row in rows for window in row["smoothed"]}, key=int)
    header = (f"  {'run':<40} {'raw':>6} " + " ".join(f"{'w=' + window:>6}" for window in windows)
              + f" {'select':>7} {'report':>7}   best epoch on select: report")
    lines = [header]
    for label, row in rows:
        cells = [row["raw"], *[row["smoothed"].get(window) for window in windows], row["selection"], row["report"]]
        widths = [6, *[6] * len(windows), 7, 7]
        best = ("" if row["best_epoch"] is None
                else f"   epoch {row['best_epoch']}: {row['best_report']:.3f}")
        lines.append(f"  {label:<40} " + " ".join(
            f"{'-' if value is None else f'{value:.3f}':>{width}}" for value, width in zip(cells, widths)) + best)
    return "\n".join(lines)


def train_and_compare(arguments: argparse.Namespace, split_folder: str, run_storage: str) -> tuple[str, str]:
    """Phase 1: a short supervised warm-up. Phase 2, from that network on the same budget and seed:
    the SSL recipe and its control (the same recipe with what the method adds switched off). Prints
    both side by side, then the SSL run's pseudo labels against the labels the split hid. Returns
    the SSL run's folder and the outputs' line part."""
    common = [f"data.split={split_folder}", f"run.storage={run_storage}"]
    recipe = os.path.join(RECIPES, f"{arguments.train_recipe}.yaml")
    ssl_config = load_config(recipe, [*common, *arguments.train_set])
    rows: list[tuple[str, dict]] = []
    warm_overrides: list[str] = []
    outputs = ""
    if arguments.warmup_recipe != "none":
        epochs = max(1, ssl_config.run.epochs)
        warmup_config = load_config(os.path.join(RECIPES, f"{arguments.warmup_recipe}.yaml"), [
            *common, f"run.name={WARMUP_RUN}", f"run.epochs={epochs}",
            f"run.steps_per_epoch={max(1, arguments.warmup_steps // epochs)}", *arguments.train_set])
        print(f"\n== warm-up: train {arguments.warmup_recipe} ({warmup_config.method}, "
              f"{warmup_config.total_steps} steps) ==")
        final = train_fresh_or_resume(warmup_config)
        print_run(final)
        rows.append((f"warm-up: {warmup_config.method}, {warmup_config.total_steps} steps", run_summary(final)))
        warm_folder = storage.join(run_storage, WARMUP_RUN)
        weights = export_warm_start(warm_folder)
        warm_overrides = [f"model.pretrained_path={weights}", "model.pretrained_head=true"]
        outputs += f", {warm_folder} (warm-up run, {os.path.basename(weights)})"
        ssl_config = load_config(recipe, [*common, *warm_overrides, *arguments.train_set])
    start = "from the warm-up" if warm_overrides else "from scratch"
    control_overrides = CONTROL_OVERRIDES.get(ssl_config.method)
    finals = {}
    if control_overrides is not None:
        control_config = load_config(recipe, [*common, *warm_overrides, *control_overrides,
                                              f"run.name={ssl_config.run.name}_control", *arguments.train_set])
        print(f"\n== control: train {arguments.train_recipe} with {', '.join(control_overrides)} "
              f"({control_config.total_steps} steps {start}) ==")
        finals["control"] = train_fresh_or_resume(control_config)
        print_run(finals["control"])
        rows.append((f"control: {ssl_config.method}, {' '.join(item.split('.')[-1] for item in control_overrides)}",
                     run_summary(finals["control"])))
    print(f"\n== train {arguments.train_recipe} ({ssl_config.method}) ==")
    final = train_fresh_or_resume(ssl_config)
    print_run(final)
    rows.append((f"{ssl_config.method} ({arguments.train_recipe})", run_summary(final)))
    print(f"\n== comparison: validation macro-F1 after the last step ({ssl_config.total_steps} steps "
          f"{start}, seed {ssl_config.run.seed}; select/report: the two halves of the validation videos; "
          f"last column: the epoch chosen on the selection half, scored on the report half) ==")
    print(comparison_lines(rows))
    print("  (one seed: at this budget macro-F1 moves by up to 0.1 between seeds, and even between epochs;\n"
          "   over 5 seeds neither DTM form is distinguishable from its control: BENCHMARKS.md, learning section)")
    print(pseudo_label_lines((final["final"] or {}).get("pseudo_label_quality")))
    ssl_run = storage.join(run_storage, ssl_config.run.name)
    outputs += f", {ssl_run} (run)"
    if "control" in finals:
        outputs += f", {ssl_run}_control (control run)"
    return ssl_run, outputs


def pseudo_label_lines(quality: dict | None) -> str:
    """The last epoch's pseudo labels against the labels the split hid, for a person to read."""
    if not quality or quality["accuracy"] is None:
        return "pseudo labels (last epoch): none accepted among rows with a hidden label"
    lines = [f"pseudo labels (last epoch): {quality['accepted']:,} of {quality['rows_with_hidden_label']:,} "
             f"rows with a hidden label accepted ({quality['acceptance_rate']:.1%}), "
             f"accuracy {quality['accuracy']:.1%}; {quality['unknown']['accepted']:,} of "
             f"{quality['unknown']['rows']:,} rows without a label accepted",
             f"  {'class':<10} {'accepted':>8} {'precision':>9} {'coverage':>8}"]
    for name, figures in quality["per_class"].items():
        precision = "-" if figures["precision"] is None else f"{figures['precision']:.2f}"
        coverage = "-" if figures["coverage"] is None else f"{figures['coverage']:.2f}"
        lines.append(f"  {name:<10} {figures['accepted_as']:>8,} {precision:>9} {coverage:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_run")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus-seed", type=int, default=0)
    parser.add_argument("--corpus-size", choices=sorted(PRESETS), default="default")
    parser.add_argument("--train-recipe", default="demo_abaw5_dtm",
                        help="a recipe in jobs/recipes to train on the split, or 'none'")
    parser.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every training run of the demo: the warm-up, the recipe "
                             "and its control (as jobs.train --set)")
    parser.add_argument("--warmup-recipe", default=WARMUP_RECIPE,
                        help="the supervised recipe of the warm-up phase, or 'none' (both compared "
                             "runs then start from scratch)")
    parser.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS,
                        help="steps of the warm-up phase (before --train-set)")
    parser.add_argument("--skip-downstream", action="store_true",
                        help="stop after training (no inference, pseudo labels or temporal refine)")
    parser.add_argument("--temporal-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for the temporal recipe (as jobs.train_temporal --set)")
    arguments = parser.parse_args(argv)

    corpus_folder = storage.join(arguments.out, "corpus")
    shard_folder = storage.join(arguments.out, "shards")
    split_folder = storage.join(arguments.out, "split")
    corpus_config = dataclasses.replace(PRESETS[arguments.corpus_size], seed=arguments.corpus_seed)
    prepare_corpus(corpus_folder, corpus_config)

    parallelism = cluster_cpus()
    executor = RayDataExecutor()
    started = time.perf_counter()
    manifests = []
    for source in schema.SOURCES:
        reader = make_reader(source, storage.join(corpus_folder, source), min_units=parallelism)
        manifests.append(ingest.ingest(reader, shard_folder, executor, progress=True))
    ingest_seconds = time.perf_counter() - started
    split = make_split(shard_folder, split_folder, arguments.per_class, arguments.seed)

    print("\n== shards ==")
    for manifest in manifests:
        print(manifest.summary())
    print(f"(ingest of all four sources: {ingest_seconds:.1f} s)")
    print("\n== split ==")
    print(split.summary())
    outputs = f"{shard_folder} (shards), {split_folder} (split)"
    if arguments.train_recipe != "none":
        run_storage = storage.join(arguments.out, "runs")
        ssl_run, summary = train_and_compare(arguments, split_folder, run_storage)
        outputs += summary
        if not arguments.skip_downstream:
            stamp, source = clear_stale_downstream(arguments.out, ssl_run, run_storage)
            outputs += downstream(arguments.out, ssl_run, shard_folder, split_folder, run_storage,
                                  arguments.temporal_set)
            storage.write_json_atomic(stamp, source)
    print(f"\noutputs: {outputs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
