"""The embedded default, end to end on a generated corpus: generate -> ingest (Ray Data) -> split.

    python -m jobs.demo [--out demo_run] [--per-class 20] [--seed 0] [--corpus-size default|tiny]

Starts a local Ray in-process (or joins RAY_ADDRESS under `ray job submit`), writes the demo corpus
in the four real on-disk formats under `<out>/corpus`, ingests each through the real readers into
`<out>/shards`, splits into `<out>/split`, and prints the manifests' summary. Re-running reuses an
identical existing corpus and rewrites the outputs in place.
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

CORPUS_STAMP = "_demo_corpus.json"


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
    print(f"\noutputs: {shard_folder} (shards), {split_folder} (split)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
