"""Search a recipe's hyper-parameters with Ray Tune, and write the search's report.

    python -m jobs.tune --config jobs/tune/demo_dtm.yaml [--set key=value ...]   # a search
    python -m jobs.tune --config jobs/tune/abaw5_dtm.yaml --set base.data.split=s3://bucket/split \
        --set storage=s3://bucket/tune
    python -m jobs.tune --report <experiment folder or s3:// URI>                 # (re)write the report

The search file (jobs/tune/*.yaml, see pipeline/tuning/search.py) names the base recipe, the keys to
search and their distributions, the budget (trials, epochs per trial, concurrency, resources per
trial), the objective (best selection-half validation macro-F1 so far) and the searcher (optuna,
random or grid); `--set` overrides any of its keys, `--set base.<path>=...` any key of the recipe.
Everything is validated before a trial starts.

Writes `<storage>/<name>/`: search.yaml (the resolved search), one `trial_<id>/` per trial (Tune's
result.json, progress.csv, checkpoint_*; the Trainer's metrics.jsonl) and, at the end, `report/`:
report.html (self-contained), PNGs, trials.parquet, trials.csv and best_config.yaml (a recipe
`jobs.train --config` accepts). Re-running the same command after an interruption restores the
experiment: finished trials are kept, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import ConfigError


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.tune", description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="search file (jobs/tune/*.yaml)")
    what.add_argument("--report", metavar="EXPERIMENT", help="(re)write the report of a search folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a search key (trials=4) or a recipe key (base.run.steps_per_epoch=5)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved search and exit")
    parser.add_argument("--no-report", action="store_true", help="do not write the report after the search")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.report:
        from pipeline.tuning import report

        summary = report.write_report(arguments.report)
        print(json.dumps(summary))
        return 0
    from pipeline.tuning.search import dump_yaml, load_search

    try:
        search = load_search(arguments.config, arguments.overrides)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if arguments.print_config:
        print(dump_yaml(search.manifest()), end="")
        return 0
    from pipeline.tuning import ray_tune

    try:
        results = ray_tune.run_search(search)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    errors = [str(result.error) for result in results if result.error]
    summary: dict = {"experiment": search.experiment, "trials": len(results), "errored": len(errors)}
    if not arguments.no_report:
        from pipeline.tuning import report

        summary.update(report.write_report(search.experiment))
    print(json.dumps(summary))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
