"""The embedded default, end to end on a generated corpus: generate -> ingest (Ray Data) -> split
-> train.

    python -m jobs.demo [--out demo_run] [--per-class 20] [--seed 0] [--corpus-size default|tiny]
                        [--train-recipe demo_abaw5_dtm|none] [--train-set key=value ...]

Starts a local Ray in-process (or joins RAY_ADDRESS under `ray job submit`), writes the demo corpus
in the four real on-disk formats under `<out>/corpus`, ingests each through the real readers into
`<out>/shards`, splits into `<out>/split`, prints the manifests' summary, then trains the chosen
demo recipe on the split (`<out>/runs/<recipe>`). Re-running reuses an identical existing corpus,
rewrites the data outputs in place and resumes (here: finds finished) the training run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from pipeline import config, ingest, schema, storage
from pipeline.demo.corpus import PRESETS, DemoCorpusConfig, write_demo_corpus
from pipeline.raydata import RayDataExecutor, cluster_cpus
from pipeline.readers import make_reader
from pipeline.split import make_split
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
        outputs += f", {storage.join(run_storage, config.run.name)} (run)"
    print(f"\noutputs: {outputs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
