"""Batch inference on Aff-Wild2 frames: per-frame probabilities from a trained checkpoint (Ray Data
actor pool), the sliding-window vote per video, one Parquet file per video, macro-F1 raw and
smoothed when the frames are labeled, and optionally the ABAW submission file.

    python -m jobs.infer --checkpoint demo_run/runs/demo_abaw5_dtm --shards demo_run/shards/affwild2 \
        --subset validation --out demo_run/inference [--window 30 --mode centred] \
        [--submission <frame list> [--submission-out <file>]] [--actors 2 --cpus-per-actor 0.5] \
        [--temporal demo_run/runs/demo_temporal]
    ray job submit --address http://<head>:8265 --working-dir . -- python -m jobs.infer \
        --checkpoint s3://bucket/runs/abaw6 --shards s3://bucket/shards/affwild2 --out s3://bucket/infer \
        --actors 8 --gpus-per-actor 0.5

Outputs under `--out`: frames/<input file> (per-frame predictions, one file per input shard file,
resumable: a re-run skips files already predicted by the same checkpoint), videos/<video>.parquet
(sample_id, video, frame, the 8 probabilities, predicted (raw) and smoothed labels, run_id),
metrics.json, submission.txt when asked, and `_manifest.json` last (its presence means complete).
A re-run of the same command rewrites the same files; nothing is appended.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from jobs.pseudolabel import add_inference_arguments, inference_config
from pipeline.config import ConfigError
from pipeline.core import frame_filling, smoothing
from pipeline.data import schema, storage
from pipeline.inference import submission
from pipeline.inference.predict import load_frame_model, output_identity
from pipeline.inference.prediction_files import RowFilter, input_files_from_folders
from pipeline.inference.ray_inference import connect, run_predictions
from pipeline.inference.videos import add_smoothed, in_frame_order, scores, write_videos
from pipeline.temporal.training import apply_temporal, load_temporal_model

MANIFEST = "_manifest.json"
FRAMES_FOLDER = "frames"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.infer", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint file, run folder or Ray run")
    parser.add_argument("--shards", nargs="+", required=True, help="Aff-Wild2 shard folder(s)")
    parser.add_argument("--subset", nargs="*", default=[],
                        help="only rows of these split values (train, validation); default all")
    parser.add_argument("--out", required=True)
    parser.add_argument("--window", type=int, default=30, help="sliding-window length in frames")
    parser.add_argument("--mode", default=smoothing.CENTRED, choices=list(smoothing.MODES))
    parser.add_argument("--submission", default=None,
                        help="frame list (video/00001.jpg per line) or Aff-Wild2 annotation folder")
    parser.add_argument("--submission-out", default=None, help="default: <out>/submission.txt")
    parser.add_argument("--temporal", default=None,
                        help="a jobs.train_temporal run (or its temporal.pt): frame features -> the "
                             "temporal encoder -> smoothing; --checkpoint must be its frame model")
    add_inference_arguments(parser)
    arguments = parser.parse_args(argv)
    try:
        settings = inference_config(arguments)
        if arguments.window < 1:
            raise ConfigError("--window: must be at least 1")
        model = load_frame_model(arguments.checkpoint, "cpu")
        temporal = load_temporal_model(arguments.temporal) if arguments.temporal else None
        if temporal and temporal[2]["frame_run_id"] != model.run_id:
            raise ValueError(f"--temporal was trained on features of {temporal[2]['frame_run_id']}, "
                             f"--checkpoint is {model.run_id}")
        wanted = None
        if arguments.submission:
            wanted = (submission.frame_list_from_annotations(arguments.submission)
                      if storage.is_dir(arguments.submission) else submission.read_frame_list(arguments.submission))
        settings = connect(settings)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    row_filter = RowFilter(splits=list(arguments.subset), sources=[schema.AFFWILD2])
    inputs = input_files_from_folders(arguments.shards, row_filter)
    frames_out = storage.join(arguments.out, FRAMES_FOLDER)
    storage.remove(storage.join(arguments.out, MANIFEST))  # "complete" is only ever said last
    identity = output_identity(model, features=temporal is not None)
    counts = run_predictions(inputs, row_filter, model.checkpoint, frames_out, settings, identity,
                             with_features=temporal is not None)
    first_output = time.perf_counter() - started

    used = [item for item in inputs if item.rows > 0]
    if not used:
        print("error: no Aff-Wild2 frames selected in the inputs", file=sys.stderr)
        return 2
    smoothing_started = time.perf_counter()
    table = in_frame_order([storage.read_parquet(storage.join(frames_out, item.relative)) for item in used])
    run_id = model.run_id
    if temporal is not None:
        table = apply_temporal(table, temporal[0], temporal[1].temporal)
        run_id = f"{model.run_id}+{temporal[1].run.name}"
    table = add_smoothed(table, arguments.window, arguments.mode)
    smoothing_seconds = time.perf_counter() - smoothing_started
    files = write_videos(arguments.out, table, run_id)
    result = scores(table)
    report = {"checkpoint": model.checkpoint, "temporal": arguments.temporal, "run_id": run_id,
              "window": arguments.window,
              "mode": arguments.mode, "tie_rule": smoothing.TIE_RULE, "frames": table.num_rows,
              "videos": len(files), "undecodable": int((table["decoded"].to_numpy(zero_copy_only=False) == 0).sum()),
              "scores": result, **counts}
    storage.write_json_atomic(storage.join(arguments.out, "metrics.json"), report)
    if wanted is not None:
        target = arguments.submission_out or storage.join(arguments.out, "submission.txt")
        labels, fill = frame_filling.fill_labels(
            table[schema.VIDEO].to_numpy(zero_copy_only=False), table[schema.FRAME].to_numpy(),
            table["smoothed"].to_numpy(), wanted)
        submission.write_submission(target, wanted, labels)
        report["submission"] = {"path": target, "frames": len(wanted), **dataclasses.asdict(fill)}
    report.update(seconds=time.perf_counter() - started, smoothing_seconds=smoothing_seconds,
                  seconds_to_frame_predictions=first_output,
                  files=[f"{FRAMES_FOLDER}/{item.relative}" for item in used] + files)
    storage.write_json_atomic(storage.join(arguments.out, MANIFEST), report)
    line = f"[infer] {table.num_rows:,} frames in {len(files)} videos by {run_id}"
    if result:
        line += (f"; macro-F1 raw {result['raw']['macro_f1']:.4f}, smoothed (window {arguments.window}) "
                 f"{result['smoothed']['macro_f1']:.4f}")
    print(line)
    if wanted is not None:
        print(f"[infer] submission: {report['submission']['path']} ({len(wanted):,} frames)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
