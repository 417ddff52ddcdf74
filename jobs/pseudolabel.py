"""Export pseudo labels: a trained checkpoint applied to the whole unlabeled pool (Ray Data actors),
written as shards with the predicted label, confidence, the class threshold in force, an accepted
flag and the producing run; `_manifest.json` (written last) has per-class accepted counts.

    python -m jobs.pseudolabel --checkpoint runs/demo_abaw5_dtm --split demo_run/split \
        --out demo_run/pseudolabels [--confidence 0.95] [--actors 2] [--batch-size 128]
    python -m jobs.pseudolabel --checkpoint s3://bucket/runs/abaw5_dtm --shards s3://bucket/shards/ms1mv2 \
        --out s3://bucket/pseudolabels --actors 8 --gpus-per-actor 0.5
    ray job submit --address http://<head>:8265 --working-dir . -- python -m jobs.pseudolabel ...

`--split` reads the split's unlabeled pool (MS1MV2 + the FER remainder, minus labeled and
validation rows); `--shards` reads whole shard folders. Thresholds are the checkpoint's own class
thresholds (DTM, adaptive, class-mean) unless `--confidence` fixes one for every class. Resumable by
shard: a re-run skips input files already exported by the same checkpoint and thresholds. Feed the
result back with `jobs.train ... --set data.labeled_pseudo_labels=<out>`.
"""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.config import ConfigError
from pipeline.data import storage
from pipeline.data.pseudo_labels import MANIFEST
from pipeline.inference.config import InferenceConfig
from pipeline.inference.predict import load_frame_model, output_identity
from pipeline.inference.prediction_files import RowFilter, input_files_from_folders, input_files_from_pool
from pipeline.inference.pseudo_labels import class_thresholds, mark_accepted, summarise
from pipeline.inference.ray_inference import connect, run_predictions


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--actors", type=int, default=1, help="actor pool size (one model each)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per actor")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: GPU actors (one GPU each unless --gpus-per-actor) when the cluster "
                             "has GPUs; cuda: GPU actors even on GPU nodes scaled to zero")
    parser.add_argument("--resource-wait-seconds", type=float, default=900.0,
                        help="on a cluster, how long to wait for the autoscaler to fit the pool")


def inference_config(arguments: argparse.Namespace) -> InferenceConfig:
    return InferenceConfig(batch_size=arguments.batch_size, actors=arguments.actors,
                           cpus_per_actor=arguments.cpus_per_actor, gpus_per_actor=arguments.gpus_per_actor,
                           threads=arguments.threads, device=arguments.device,
                           resource_wait_seconds=arguments.resource_wait_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.pseudolabel", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint file, run folder or Ray run")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", help="a jobs.split folder: export its unlabeled pool")
    source.add_argument("--shards", nargs="+", help="shard folders (all rows)")
    parser.add_argument("--sources", nargs="*", default=[], help="only these sources")
    parser.add_argument("--out", required=True)
    parser.add_argument("--confidence", type=float, default=None,
                        help="fixed threshold for every class (default: the checkpoint's thresholds)")
    add_inference_arguments(parser)
    arguments = parser.parse_args(argv)
    try:
        settings = inference_config(arguments)
        model = load_frame_model(arguments.checkpoint, "cpu")
        thresholds, threshold_source = class_thresholds(model.thresholds(), arguments.confidence)
        settings = connect(settings)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    extra = RowFilter(sources=list(arguments.sources))
    if arguments.split:
        inputs, row_filter = input_files_from_pool(arguments.split, extra)
    else:
        row_filter = extra
        inputs = input_files_from_folders(arguments.shards, row_filter)
    if not inputs:
        print("error: no input files", file=sys.stderr)
        return 2
    # A manifest means "complete": take it away before anything changes.
    storage.remove(storage.join(arguments.out, MANIFEST))
    identity = output_identity(model, thresholds=[round(float(value), 9) for value in thresholds],
                               inclusive=model.acceptance_inclusive)
    counts = run_predictions(
        inputs, row_filter, model.checkpoint, arguments.out, settings, identity,
        finish=lambda table: mark_accepted(table, thresholds, model.run_id, model.acceptance_inclusive))
    written = [item for item in inputs if item.rows > 0]
    tables = [storage.read_parquet(storage.join(arguments.out, item.relative)) for item in written]
    summary = summarise(tables)
    manifest = {
        "checkpoint": model.checkpoint, "run_id": model.run_id, "method": model.config.method,
        "threshold_source": threshold_source, "thresholds": thresholds.tolist(),
        "acceptance_rule": "confidence >= threshold" if model.acceptance_inclusive else "confidence > threshold",
        "inputs": arguments.split or arguments.shards, **summary, **counts,
        "seconds": time.perf_counter() - started,
        "files": [{"path": item.relative, "input": item.uri, "rows": item.rows} for item in written],
    }
    storage.write_json_atomic(storage.join(arguments.out, MANIFEST), manifest)
    rate = summary["acceptance_rate"]
    print(f"[pseudolabel] {summary['rows']:,} rows, {summary['accepted']:,} accepted "
          f"({rate:.1%}) by {model.run_id}; per class {summary['accepted_per_class']}"
          if rate is not None else "[pseudolabel] no rows")
    quality = summary["quality"]
    if quality["accuracy"] is not None:
        print(f"[pseudolabel] against the labels the split hid: {quality['accepted']:,} of "
              f"{quality['rows_with_hidden_label']:,} rows accepted, accuracy {quality['accuracy']:.1%}; "
              f"{quality['unknown']['accepted']:,} of {quality['unknown']['rows']:,} rows without a "
              "label accepted")
    print(f"[pseudolabel] wrote {storage.join(arguments.out, MANIFEST)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
