"""Ray Data batch inference: shard files -> filter (tasks) -> `Predictor` actors (model built once
per actor, `num_gpus` on GPU clusters) -> the driver's `FileCollector`, which writes one output
file per input file. Inputs already done by an earlier run with the same model are skipped.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import pyarrow as pa
import ray.data
from ray.data import ActorPoolStrategy

from pipeline.config import ConfigError
from pipeline.data import schema, storage
from pipeline.inference.config import InferenceConfig, pool_shortfall, with_accelerators
from pipeline.inference.predict import FrameModel, load_frame_model, predict_rows
from pipeline.inference.prediction_files import PATH_COLUMN, FileCollector, InputFile, RowFilter, is_done
from pipeline.progress import Progress

READ_COLUMNS = [schema.SAMPLE_ID, schema.IMAGE, schema.SOURCE, schema.SPLIT, schema.VIDEO,
                schema.FRAME, schema.LABEL]


class Predictor:
    """The map_batches callable class: the model is loaded once per actor."""

    def __init__(self, checkpoint: str, with_features: bool, device: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model: FrameModel = load_frame_model(checkpoint, device)
        self.with_features = with_features

    def __call__(self, table: pa.Table) -> pa.Table:
        return predict_rows(self.model, table, self.with_features).append_column(PATH_COLUMN, table[PATH_COLUMN])


def check_pool_fits(settings: InferenceConfig, resources: dict[str, float]) -> None:
    """Refuse a pool the cluster cannot run now (see `pool_shortfall`): it would wait forever."""
    shortfall = pool_shortfall(settings, resources)
    if shortfall:
        raise ConfigError(f"inference: the actor pool does not fit: {shortfall} (fewer actors, or "
                          "--cpus-per-actor below 1 with --threads to match)")


def wait_for_pool(settings: InferenceConfig, can_grow: bool,
                  resources: Callable[[], dict[str, float]] = lambda: ray.cluster_resources(),
                  request: Callable[[list[dict[str, float]]], None] | None = None,
                  poll_seconds: float = 5.0, clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> InferenceConfig:
    """The pool's settings once the cluster can run it. A cluster that can grow is asked for the
    pool's resources (`ray.autoscaler.sdk.request_resources`) and polled until they are there or
    `settings.resource_wait_seconds` have passed; a local Ray (no autoscaler) is checked once.
    The device is decided (`with_accelerators`) from the GPUs present when the pool fits."""
    current = resources()
    resolved = with_accelerators(settings, current.get("GPU", 0.0))
    if not can_grow or pool_shortfall(resolved, current) is None:
        check_pool_fits(resolved, current)
        return resolved
    bundles = ([{"CPU": resolved.cpus_per_actor, "GPU": resolved.gpus_per_actor}
                if resolved.gpus_per_actor else {"CPU": resolved.cpus_per_actor}] * resolved.actors
               + [{"CPU": 1.0}])
    request = request or _request_resources
    request(bundles)
    deadline = clock() + resolved.resource_wait_seconds
    announced = 0.0
    try:
        while (shortfall := pool_shortfall(resolved, current)) is not None:
            if clock() >= deadline:
                raise ConfigError(
                    f"inference: waited {resolved.resource_wait_seconds:g} s for the autoscaler and the "
                    f"actor pool still does not fit: {shortfall}. Check the cluster's worker types and "
                    "limits (or raise --resource-wait-seconds)")
            if clock() >= announced:
                print(f"[predict] waiting for the autoscaler: {shortfall}", flush=True)
                announced = clock() + 60.0
            sleep(poll_seconds)
            # The autoscaler keeps one request per cluster, the latest: another job that has its
            # nodes clears it (as this one does below), so it is renewed at every poll.
            request(bundles)
            current = resources()
    finally:
        request([])  # the pool's actors hold the nodes from here on
    return resolved


def _request_resources(bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def connect(settings: InferenceConfig, dashboard: bool = False) -> InferenceConfig:
    """Join (or start) Ray and wait until the actor pool fits it (on a cluster, asking the
    autoscaler): jobs call this before changing any output, so a pool that cannot run fails with
    a message instead of waiting forever. Returns the settings with the device decided."""
    from pipeline.data.ray_ingest import ensure_ray

    ensure_ray(dashboard=dashboard)
    return wait_for_pool(settings, can_grow=bool(os.environ.get("RAY_ADDRESS")))


def prediction_dataset(inputs: list[InputFile], row_filter: RowFilter, checkpoint: str,
                       settings: InferenceConfig, with_features: bool = False) -> ray.data.Dataset:
    """The lazily executed stream of `predict_rows` tables (plus the input `path`) for `inputs`."""
    resources = ray.cluster_resources()
    settings = with_accelerators(settings, resources.get("GPU", 0.0))
    check_pool_fits(settings, resources)  # callers may skip connect()
    filesystem, _ = storage.filesystem(inputs[0].uri)
    dataset = ray.data.read_parquet([item.path for item in inputs], filesystem=filesystem,
                                    include_paths=True)
    # Parquet reads pack small files into one block, and one block feeds one actor: cut the
    # stream into blocks of a few batches (streaming, no shuffle) so every actor gets work.
    dataset = dataset.repartition(target_num_rows_per_block=settings.batch_size * 4)
    available = set(READ_COLUMNS)  # missing optional columns (video/frame on crops) stay absent
    dataset = dataset.map_batches(_FilterColumns(row_filter, available), batch_format="pyarrow",
                                  batch_size=None)
    return dataset.map_batches(
        Predictor, fn_constructor_kwargs={"checkpoint": checkpoint, "with_features": with_features,
                                          "device": settings.device, "threads": settings.threads},
        batch_format="pyarrow", batch_size=settings.batch_size,
        compute=ActorPoolStrategy(size=settings.actors), num_cpus=settings.cpus_per_actor,
        num_gpus=settings.gpus_per_actor or None)


class _FilterColumns:
    """Keep the rows `row_filter` selects and the columns inference needs (plus `path`)."""

    def __init__(self, row_filter: RowFilter, columns: set[str]) -> None:
        self.row_filter = row_filter
        self.columns = columns

    def __call__(self, table: pa.Table) -> pa.Table:
        table = self.row_filter(table)
        keep = [name for name in table.column_names if name in self.columns or name == PATH_COLUMN]
        return table.select(keep)


def run_predictions(inputs: list[InputFile], row_filter: RowFilter, checkpoint: str, out: str,
                    settings: InferenceConfig, identity: dict[str, Any],
                    finish: Callable[[pa.Table], pa.Table] | None = None, with_features: bool = False,
                    sort_by: list[str] | None = None, progress: bool = True) -> dict[str, int]:
    """Predict every input not already done into `<out>/<relative>`; returns counts of inputs done
    now, skipped as done before, and empty."""
    empty = [item for item in inputs if item.rows == 0]  # no rows selected: no output file
    pending = [item for item in inputs if item.rows > 0 and not is_done(out, item, identity)]
    skipped = len(inputs) - len(pending) - len(empty)
    collector = FileCollector(out, pending, identity, finish, sort_by)
    streaming = pending
    if progress:
        print(f"[predict] {len(streaming)} input files to predict, {skipped} done before, "
              f"{len(empty)} without rows", flush=True)
    if streaming:
        dataset = prediction_dataset(streaming, row_filter, checkpoint, settings, with_features)
        tracker = Progress("predict", sum(item.rows for item in streaming), "rows") if progress else None
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2):
            collector.add(batch)
            if tracker:
                tracker.advance(batch.num_rows, files=f"{len(collector.written)}/{len(streaming)}")
        if tracker:
            tracker.close()
    collector.check_complete(pending)
    return {"predicted_files": len(streaming), "skipped_done_files": skipped, "empty_files": len(empty)}
