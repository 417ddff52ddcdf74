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
from pipeline.inference.ray_inference import connect
from pipeline.temporal.training import load_temporal_config, to_mapping


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
        connect(config.inference, dashboard=config.scaling.num_workers > 0)
        from pipeline.temporal.ray_train import extract_and_fit

        final = extract_and_fit(config)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\n== ablation (validation macro-F1, {final['scored_frames']} scored frames, "
          f"window {final['window']}) ==")
    for name, value in final["ablation"].items():
        print(f"{name:20s} {value:.4f}")
    print(json.dumps({"run": final["run"], "frame_run_id": final["frame_run_id"], "ablation": final["ablation"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
