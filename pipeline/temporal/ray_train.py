"""The Ray edge of the temporal refine stage: `extract_and_fit` (the whole stage, as
`jobs.train_temporal` and `jobs.ablate`'s temporal row run it: features through Ray Data, then
the encoder in one process or on Ray Train), and the Ray Train adapter, which runs the library's
`fit` once per worker over torch.distributed, rank 0 reporting each epoch with the checkpoint; Ray
owns checkpoints, restarts and resume by run name.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer

from pipeline.config import ConfigError
from pipeline.data import schema, storage
from pipeline.temporal import training as temporal_training
from pipeline.training.distributed import TorchCollectives


def extract_and_fit(config: Any) -> dict[str, Any]:
    """The stage for one `TemporalJobConfig`: the frozen frame model's features and probabilities
    of the Aff-Wild2 train and validation frames (Ray Data; files done before by the same model are
    kept), then the encoder trained on them (resuming its run). Ray must be up (`connect`).
    Returns the run's metrics.json."""
    from pipeline.inference.predict import load_frame_model, output_identity
    from pipeline.inference.prediction_files import RowFilter, input_files_from_folders
    from pipeline.inference.ray_inference import run_predictions

    frame_model = load_frame_model(config.frame_checkpoint, "cpu")
    row_filter = RowFilter(sources=[schema.AFFWILD2], splits=[schema.TRAIN, schema.VALIDATION])
    inputs = input_files_from_folders([config.shards], row_filter)
    features_out = storage.absolute(config.features_folder)
    identity = output_identity(frame_model, features=True)
    run_predictions(inputs, row_filter, frame_model.checkpoint, features_out, config.inference, identity,
                    with_features=True)
    uris = [storage.join(features_out, item.relative) for item in inputs if item.rows > 0]
    if config.scaling.num_workers > 0:
        build_temporal_trainer(config, uris, frame_model.run_id).fit()
        return storage.read_json(storage.join(storage.absolute(config.folder), temporal_training.METRICS))
    train = temporal_training.read_features(uris, schema.TRAIN)
    validation = temporal_training.read_features(uris, schema.VALIDATION)
    return temporal_training.fit(config, train, validation, frame_model.run_id)


def temporal_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Each Ray Train worker of `jobs.train_temporal`: the library's `temporal_training.fit` with
    Ray's rank and collectives; rank 0 reports each epoch with the checkpoint."""
    config = temporal_training.load_temporal_config(base=loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    train = temporal_training.read_features(loop_config["feature_uris"], schema.TRAIN)
    validation = temporal_training.read_features(loop_config["feature_uris"], schema.VALIDATION)
    restored = None
    saved = ray.train.get_checkpoint()
    if saved is not None:
        with saved.as_directory() as folder:
            restored = temporal_training.load_checkpoint(os.path.join(folder, temporal_training.CHECKPOINT))
    def report(record: dict[str, Any], trainer: Any, history: list[dict[str, Any]]) -> None:
        metrics = {"epoch": record["epoch"], "step": record["step"], "loss": record["loss"],
                   **{f"macro_f1_{name.replace('+', '_')}": value for name, value in record["ablation"].items()}}
        with tempfile.TemporaryDirectory() as folder:
            checkpoint_object = None
            if rank == 0:
                temporal_training.save_checkpoint(folder, trainer, config, record["epoch"],
                                                  loop_config["frame_run_id"], history)
                checkpoint_object = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint_object)

    temporal_training.fit(config, train, validation, loop_config["frame_run_id"], TorchCollectives(),
                          rank, world_size, restored, report)


def build_temporal_trainer(config: Any, feature_uris: list[str], frame_run_id: str) -> TorchTrainer:
    """A TorchTrainer for a `TemporalJobConfig` over extracted feature files."""
    scaling = config.scaling
    if scaling.num_workers < 1:
        raise ConfigError("scaling.num_workers: must be at least 1 for Ray Train")
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, storage=storage.absolute(config.run.storage)))
    return TorchTrainer(
        temporal_loop_per_worker,
        train_loop_config={"config": temporal_training.to_mapping(config), "feature_uris": feature_uris,
                           "frame_run_id": frame_run_id},
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=config.run.name, storage_path=config.run.storage,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
