"""Train any registered method from a recipe, in one process or on Ray Train.

    python -m jobs.train --config jobs/recipes/demo_supervised.yaml [--set key=value ...]
    python -m jobs.train --config jobs/recipes/abaw5_dtm.yaml --set data.split=s3://bucket/split \
        --set run.storage=s3://bucket/runs

Writes `<run.storage>/<run.name>/`: checkpoints/epoch-NNNN.pt, metrics.jsonl (one line per
epoch: validation macro-F1 raw and smoothed, per-class F1, confusion matrix, thresholds,
pseudo-label acceptance and histogram, images/s) and metrics.json at the end. Re-running the same
command with the same run name resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import ConfigError
from pipeline.training.config import load_config


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe YAML (jobs/recipes/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value, e.g. run.epochs=3")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        config = load_config(arguments.config, arguments.overrides)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if arguments.print_config:
        from pipeline.training.config import to_mapping

        print(json.dumps(to_mapping(config), indent=1))
        return 0
    if config.scaling.num_workers > 0:
        print("error: scaling.num_workers > 0 needs the Ray Train adapter (distributed training)",
              file=sys.stderr)
        return 2
    from pipeline.training.loop import Trainer

    final = Trainer(config).fit()
    print(json.dumps({key: final[key] for key in ("method", "run", "epochs", "best_epoch",
                                                    "best_macro_f1")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
