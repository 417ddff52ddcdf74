"""Ingest one corpus, as distributed, into Parquet shards plus `_manifest.json`.

    python -m jobs.ingest affwild2  --root <dir or s3://...> --out <dir or s3://...>
    python -m jobs.ingest affectnet --root ... --out ...
    python -m jobs.ingest expw      --root ... --out ...
    python -m jobs.ingest ms1mv2    --root ... --out ... --fraction 0.3333 --seed 0

On a cluster: `ray job submit --address http://<head>:8265 --working-dir . -- python -m jobs.ingest ...`.
Shards land in `<out>/<source>/`; re-running the same command rewrites them in place.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.data import ingest, schema, shards
from pipeline.data.readers import make_reader
from pipeline.data.readers.base import SourceUnusable


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("source", choices=schema.SOURCES)
    parser.add_argument("--root", required=True, help="corpus folder as distributed (local or s3://)")
    parser.add_argument("--out", required=True, help="shard output folder (local or s3://)")
    parser.add_argument("--fraction", type=float, default=1.0, help="ms1mv2: uniform subset fraction")
    parser.add_argument("--seed", type=int, default=0, help="ms1mv2: subset seed")
    parser.add_argument("--max-file-mb", type=int, default=shards.DEFAULT_MAX_FILE_BYTES >> 20,
                        help="start a new shard file past this size")
    parser.add_argument("--full-decode", action="store_true",
                        help="decode every image instead of checking its header (slower, stricter)")
    parser.add_argument("--executor", choices=("ray", "local"), default="ray",
                        help="ray: Ray Data tasks (default); local: one process, for debugging")
    parser.add_argument("--cpus-per-task", type=float, default=1.0)
    parser.add_argument("--min-units", type=int, default=None,
                        help="cut ms1mv2 into at least this many tasks (default: the cluster's CPUs "
                             "now; set it on an autoscaling cluster that starts with few nodes)")
    parser.add_argument("--max-skipped-fraction", type=float, default=0.5,
                        help="fail (writing no manifest) when more records than this are skipped")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    max_file_bytes = arguments.max_file_mb << 20
    if arguments.executor == "ray":
        from pipeline.data.ray_ingest import RayDataExecutor, cluster_cpus

        executor = RayDataExecutor(arguments.cpus_per_task)
        parallelism = int(cluster_cpus() / arguments.cpus_per_task)
    else:
        executor, parallelism = ingest.run_sequentially, 1
    reader = make_reader(arguments.source, arguments.root, fraction=arguments.fraction,
                         seed=arguments.seed, full_decode=arguments.full_decode,
                         unit_bytes=int(max_file_bytes * 0.9),  # room for Parquet overhead
                         min_units=arguments.min_units or parallelism)
    try:
        manifest = ingest.ingest(reader, arguments.out, executor, max_file_bytes=max_file_bytes,
                                 max_skipped_fraction=arguments.max_skipped_fraction)
    except SourceUnusable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(manifest.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
