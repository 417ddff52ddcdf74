"""Train any registered method from a recipe, in one process or on Ray Train.

    python -m jobs.train --config jobs/recipes/demo_seed002_supervised.yaml [--set key=value ...]
    python -m jobs.train --config jobs/recipes/abaw5_dtm.yaml --set data.split=s3://bucket/split \
        --set run.storage=s3://bucket/runs
    python -m jobs.train --config jobs/recipes/demo_abaw5_dtm.yaml --set scaling.num_workers=2 \
        --set scaling.cpus_per_worker=0.5      # Ray Train on a local Ray (the embedded default)
    ray job submit --address http://<head>:8265 --working-dir . -- python -m jobs.train \
        --config jobs/recipes/abaw5_dtm.yaml --set scaling.num_workers=8 --set run.storage=s3://...

Writes `<run.storage>/<run.name>/`: metrics.jsonl (one line per epoch: validation macro-F1 raw and
smoothed, per-class F1, confusion matrix, thresholds, pseudo-label acceptance and histogram,
images/s) and metrics.json at the end; checkpoints/epoch-NNNN.pt in one process, Ray Train's
checkpoint_* folders (plus workers/rank-NNNN.jsonl) with `scaling.num_workers > 0`. Re-running the
same command with the same run name resumes from the latest checkpoint.
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
    if not config.data.split:
        print("error: data.split: set it to a jobs.split output folder (--set data.split=...)",
              file=sys.stderr)
        return 2
    summary_keys = ("method", "run", "epochs", "best_epoch", "best_macro_f1", "best_selection_macro_f1",
                    "best_report_macro_f1")
    if config.scaling.num_workers > 0:
        from pipeline.data import storage
        from pipeline.data.ray_ingest import ensure_ray
        from pipeline.training import ray_train
        from pipeline.training.loop import FINAL_METRICS

        ensure_ray(dashboard=True)  # before the trainer: its Ray Data pool stream reads metadata
        try:
            trainer = ray_train.build_trainer(config)
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        result = trainer.fit()
        final = storage.read_json(storage.join(ray_train.run_folder(config), FINAL_METRICS))
        summary = {key: final[key] for key in summary_keys}
        summary["checkpoint"] = result.checkpoint.path if result.checkpoint else None
        print(json.dumps(summary))
        return 0
    from pipeline.training.loop import Trainer

    unlabeled = None
    if config.data.unlabeled_reader == "ray_data":  # one process fed by Ray Data (measured in bench/)
        from pipeline.data.ray_ingest import ensure_ray
        from pipeline.training import ray_train

        if ray_train.uses_ray_data(config):
            ensure_ray()
            unlabeled = ray_train.streamed_unlabeled(
                config, lambda first_pass: ray_train.unlabeled_dataset(config, first_pass).iterator(),
                rank=0)
    final = Trainer(config, unlabeled=unlabeled).fit()
    print(json.dumps({key: final[key] for key in summary_keys}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
