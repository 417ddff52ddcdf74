"""ABAW6 phase 2: freeze a trained frame model, extract per-frame features of the Aff-Wild2 train and
validation videos (Ray Data, the batch-inference machinery), train a Transformer encoder over
64-frame clips, and write the ablation rows: frame model, + temporal, each with and without
smoothing (validation macro-F1).

    python -m jobs.train_temporal --config jobs/recipes/demo_temporal.yaml \
        --set frame_checkpoint=demo_run/runs/demo_abaw5_dtm --set shards=demo_run/shards/affwild2
    python -m jobs.train_temporal --config jobs/recipes/abaw6_temporal.yaml \
        --set frame_checkpoint=s3://bucket/runs/abaw6 --set shards=s3://bucket/shards/affwild2 \
        --set run.storage=s3://bucket/runs --set scaling.num_workers=4 --set scaling.use_gpu=true
    ray job submit --address http://<head>:8265 --working-dir . -- python -m jobs.train_temporal ...

Writes `<run.storage>/<run.name>/`: features/ (per input shard file: features, the frame model's
probabilities; resumable), temporal.pt (the encoder; `jobs.infer --temporal` takes it),
metrics.jsonl (per epoch) and metrics.json (the final ablation). Re-running resumes.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import ConfigError
from pipeline.data import schema, storage
from pipeline.inference.predict import load_frame_model
from pipeline.inference.prediction_files import RowFilter, input_files_from_folders
from pipeline.inference.ray_inference import connect, run_predictions
from pipeline.temporal.training import METRICS, fit, load_temporal_config, read_features, to_mapping


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train_temporal", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe YAML (jobs/recipes/*temporal.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--print-config", action="store_true")
    arguments = parser.parse_args(argv)
    try:
        config = load_temporal_config(arguments.config, arguments.overrides)
        if arguments.print_config:
            print(json.dumps(to_mapping(config), indent=1))
            return 0
        frame_model = load_frame_model(config.frame_checkpoint, "cpu")
        connect(config.inference, dashboard=config.scaling.num_workers > 0)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    row_filter = RowFilter(sources=[schema.AFFWILD2], splits=[schema.TRAIN, schema.VALIDATION])
    inputs = input_files_from_folders([config.shards], row_filter)
    features_out = storage.absolute(config.features_folder)
    identity = {"checkpoint": frame_model.checkpoint, "run_id": frame_model.run_id, "features": True}
    run_predictions(inputs, row_filter, frame_model.checkpoint, features_out, config.inference, identity,
                    with_features=True)
    uris = [storage.join(features_out, item.relative) for item in inputs if item.rows > 0]
    if config.scaling.num_workers > 0:
        from pipeline.temporal import ray_train

        ray_train.build_temporal_trainer(config, uris, frame_model.run_id).fit()
        final = storage.read_json(storage.join(storage.absolute(config.folder), METRICS))
    else:
        train, validation = read_features(uris, schema.TRAIN), read_features(uris, schema.VALIDATION)
        final = fit(config, train, validation, frame_model.run_id)
    print(f"\n== ablation (validation macro-F1, {final['scored_frames']} scored frames, "
          f"window {final['window']}) ==")
    for name, value in final["ablation"].items():
        print(f"{name:20s} {value:.4f}")
    print(json.dumps({"run": final["run"], "frame_run_id": final["frame_run_id"], "ablation": final["ablation"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
