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
import json
import os
import sys
import time

from pipeline import config
from pipeline.data import ingest, schema, storage
from pipeline.data.ray_ingest import RayDataExecutor, cluster_cpus
from pipeline.data.readers import make_reader
from pipeline.data.split import make_split
from pipeline.demo.corpus import PRESETS, DemoCorpusConfig, write_demo_corpus
from pipeline.training.config import load_config
from pipeline.training.loop import Trainer

CORPUS_STAMP = "_demo_corpus.json"
RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


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
    print("\n== temporal refine (frozen frame model -> Transformer over 64-frame clips) ==")
    recipe = os.path.join(RECIPES, "demo_temporal.yaml")
    settings = [f"frame_checkpoint={run}", f"shards={affwild2}", f"run.storage={run_storage}", *temporal_set]
    if train_temporal.main(["--config", recipe, *[item for setting in settings for item in ("--set", setting)]]) != 0:
        raise RuntimeError("jobs.train_temporal failed")
    return (f", {inference} (per-video predictions, submission.txt), {pseudo} (pseudo labels), "
            f"{storage.join(run_storage, 'demo_temporal')} (temporal run)")


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
                        help="override for the training recipe (as jobs.train --set)")
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
        recipe = os.path.join(RECIPES, f"{arguments.train_recipe}.yaml")
        config = load_config(recipe, [f"data.split={split_folder}", f"run.storage={run_storage}",
                                      *arguments.train_set])
        print(f"\n== train {arguments.train_recipe} ({config.method}) ==")
        final = Trainer(config).fit()
        validation = (final["final"] or {}).get("validation") or {}
        smoothed = ", ".join(f"window {window}: {value['macro_f1']:.3f}"
                             for window, value in (validation.get("smoothed") or {}).items())
        print(f"validation macro-F1 {validation.get('macro_f1', float('nan')):.3f} raw; smoothed {smoothed}")
        if final["best_epoch"] is not None:
            print(f"best epoch {final['best_epoch']} (chosen on the selection half of the validation "
                  f"videos: {final['best_selection_macro_f1']:.3f}); report half {final['best_report_macro_f1']:.3f}")
        print(pseudo_label_lines((final["final"] or {}).get("pseudo_label_quality")))
        run = storage.join(run_storage, config.run.name)
        outputs += f", {run} (run)"
        if not arguments.skip_downstream:
            outputs += downstream(arguments.out, run, shard_folder, split_folder, run_storage,
                                  arguments.temporal_set)
    print(f"\noutputs: {outputs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
