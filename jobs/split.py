"""Apply the data recipe to ingested shards: labeled (N per class), validation, unlabeled pool.

    python -m jobs.split --shards <ingest out> --per-class 8000 --seed 0 --out <split dir>

On a cluster: `ray job submit --working-dir . -- python -m jobs.split ...` (runs in the driver;
it reads only metadata columns to decide and copies only the labeled and validation images).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.data import shards
from pipeline.data.split import make_split


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.split", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="the --out folder of jobs.ingest")
    parser.add_argument("--out", required=True, help="split output folder (local or s3://)")
    parser.add_argument("--per-class", type=int, default=8000,
                        help="labeled images per class from Aff-Wild2 and from AffectNet+ExpW each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-file-mb", type=int, default=shards.DEFAULT_MAX_FILE_BYTES >> 20)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.per_class < 1:
        print("error: --per-class must be at least 1", file=sys.stderr)
        return 2
    try:
        summary = make_split(arguments.shards, arguments.out, arguments.per_class, arguments.seed,
                             max_file_bytes=arguments.max_file_mb << 20)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
