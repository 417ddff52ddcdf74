"""Reproduce a paper's table: its rows x seeds as a grid of Ray Tune trials on your split, then the
table (report-half macro-F1, mean ± 95% t-interval over seeds, beside the paper's number).

    python -m jobs.ablate --paper abaw5 --split <split> --seeds 5 [--set key=value ...]
    python -m jobs.ablate --paper seed002 --split demo_run/split --scale demo --seeds 2 \
        --set run.steps_per_epoch=20
    python -m jobs.ablate --paper abaw5 --table <experiment folder or s3:// URI>   # (re)write the table

Papers: abaw5 (baseline; SSL+DTM on FER data; + MS1MV2 in the pool; + post-processing), abaw6
(baseline; teacher/student with feedback; + temporal; + post-processing of the temporal encoder's
output), seed002 (the third paper: VGG baseline; supervised; MutexMatch; noise-aware). The rows'
recipes are jobs/recipes/<name>.yaml (`--scale demo`: the demo ones where they exist); `--set` sets
a recipe key in every trained row (run.steps_per_epoch=50, model.pretrained=false, ...),
`--set-temporal` a key of the temporal recipe (temporal.steps=20, scaling.num_workers=2, ...).
Post-processing rows train nothing: they smooth the predictions of the row they post-process. The
temporal row runs after the grid, once per trial of the feedback row, on the frozen features of
that trial's model (Aff-Wild2 shards from the split's recorded root, or `--shards`).

Writes `<storage>/<name>/` (default runs/ablate/<paper>): the Tune experiment (search.yaml,
trial_<id>/ ...), refine/<row>/<trial>/ (temporal runs) and ablation.md / ablation.csv.
Re-running the same command resumes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from pipeline.config import ConfigError

RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.ablate", description=__doc__.splitlines()[0])
    parser.add_argument("--paper", required=True, help="abaw5 | abaw6 | seed002")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--split", help="a jobs.split output folder (local or s3://)")
    what.add_argument("--table", metavar="EXPERIMENT", help="(re)write the table of an ablation folder")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per row (run.seed 0..N-1)")
    parser.add_argument("--rows", default=None,
                        help="comma-separated row names to run (default: the whole table), e.g. "
                             "feedback,temporal,postprocess")
    parser.add_argument("--scale", choices=("full", "demo"), default="full",
                        help="the papers' recipes, or the demo_ ones (small, CPU)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per trial (default: the longest of the rows' recipes)")
    parser.add_argument("--storage", default="runs/ablate")
    parser.add_argument("--name", default=None, help="experiment folder name (default: the paper)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--gpus-per-trial", type=float, default=0.0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="set a recipe key in every trained row")
    parser.add_argument("--set-temporal", dest="temporal_overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="set a key of the temporal row's recipe")
    parser.add_argument("--shards", default=None,
                        help="shards root for the temporal row (default: the one the split records)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved search and exit")
    return parser.parse_args(argv)


def recipe_file(row, scale: str) -> str:
    if scale == "demo":
        demo = os.path.join(RECIPES, f"demo_{row.demo_recipe or row.recipe}.yaml")
        if os.path.exists(demo):
            return demo
    return os.path.join(RECIPES, f"{row.recipe}.yaml")


def temporal_recipes(arguments: argparse.Namespace, table) -> dict:
    """The temporal rows' recipe mappings with `--set-temporal` applied, validated now (before any
    trial) with placeholder inputs, which the temporal phase replaces per trial."""
    from pipeline.temporal.training import load_temporal_config
    from pipeline.training.config import parse_override
    from pipeline.tuning.search import set_path

    recipes = {}
    for row in table.refined():
        with open(recipe_file(row, arguments.scale)) as handle:
            mapping = yaml.safe_load(handle)
        for override in arguments.temporal_overrides:
            keys, value = parse_override(override)
            set_path(mapping, keys, value, override)
        load_temporal_config(base={**mapping, "frame_checkpoint": "-", "shards": "-"})
        recipes[row.name] = mapping
    return recipes


def build_search(arguments: argparse.Namespace, table):
    from pipeline.training.config import parse_override
    from pipeline.tuning import ablation
    from pipeline.tuning.search import load_search

    recipes = {}
    for row in table.trained():
        with open(recipe_file(row, arguments.scale)) as handle:
            recipes[row.recipe] = yaml.safe_load(handle)
    overrides = [parse_override(override) for override in arguments.overrides]
    epochs = arguments.epochs
    if epochs is None:
        epochs = max(int((recipe.get("run") or {}).get("epochs", 1)) for recipe in recipes.values())
        for keys, value in overrides:
            if keys == ["run", "epochs"]:
                epochs = int(value)
    mapping = ablation.search_mapping(
        table, recipes, split=arguments.split, seeds=arguments.seeds, name=arguments.name or table.name,
        storage_path=arguments.storage, epochs=epochs, concurrency=arguments.concurrency,
        cpu=arguments.cpus_per_trial, gpu=arguments.gpus_per_trial, overrides=overrides)
    return load_search(mapping=mapping)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    from pipeline.tuning import ablation

    try:
        table = ablation.paper(arguments.paper)
        if arguments.rows:
            table = table.only([name.strip() for name in arguments.rows.split(",") if name.strip()])
    except KeyError as error:
        print(f"error: {error.args[0]}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if arguments.table:
        summary = ablation.write_table(arguments.table, table)
        print(json.dumps({key: value for key, value in summary.items() if key != "rows"}))
        return 0
    try:
        search = build_search(arguments, table)
        refine_recipes = temporal_recipes(arguments, table)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if arguments.print_config:
        from pipeline.tuning.search import dump_yaml

        print(dump_yaml(search.manifest()), end="")
        return 0
    from pipeline.tuning import ray_tune

    results = ray_tune.run_search(search)
    errors = [str(result.error) for result in results if result.error]
    refined = []
    if table.refined():
        refined = ray_tune.run_refined_rows(search, table, refine_recipes, arguments.shards)
    summary = ablation.write_table(search.experiment, table)
    print(open_text(summary["table"]), end="")
    print(json.dumps({"experiment": search.experiment, "trials": len(results), "errored": len(errors),
                      "refined": len(refined), "refine_errors": sum(1 for item in refined if item.error),
                      "table": summary["table"], "csv": summary["csv"]}))
    return 0 if not errors and not any(item.error for item in refined) else 1


def open_text(uri: str) -> str:
    from pipeline.data import storage

    return storage.read_text(uri)


if __name__ == "__main__":
    sys.exit(main())
