"""ABAW6 phase 2 around `pipeline.temporal.encoder`: the typed job config, the frozen frame model's
stored features read back as train/validation `FrameSequences`, the training run (one process
here; the Ray Train adapter is `pipeline.temporal.ray_train`), the ablation rows (frame model,
+ temporal, each with and without smoothing) and the encoder applied to a prediction table
(`apply_temporal`, for `jobs.infer --temporal`). No Ray here.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from pipeline import config as typed
from pipeline.core import metrics, smoothing
from pipeline.data import schema, storage
from pipeline.data.schema import CONFIDENCE, DECODED, FEATURES, PREDICTED, PROBABILITY_COLUMNS
from pipeline.inference.config import InferenceConfig
from pipeline.inference.predict import probabilities_of
from pipeline.methods.base import Collectives
from pipeline.temporal.encoder import (FrameSequences, TemporalConfig, TemporalEncoder, TemporalTrainer,
                                       predict_sequences)
from pipeline.training.config import ScalingConfig, recipe_mapping
from pipeline.training.evaluate import REPORT, SELECTION, validation_halves

CHECKPOINT = "temporal.pt"
METRICS = "metrics.json"
METRICS_LINES = "metrics.jsonl"
FEATURES_FOLDER = "features"


@dataclass
class TemporalRunConfig:
    name: str = "temporal"
    storage: str = "runs"
    """Folder (local or s3://) under which `<name>/` holds features/, temporal.pt and metrics."""
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        typed.check(self.device in ("auto", "cpu", "cuda"), "run.device", "auto, cpu or cuda")


@dataclass
class TemporalEvaluationConfig:
    window: int = 30
    """Sliding-window length for the smoothed rows (ABAW6: 30)."""
    mode: str = smoothing.CENTRED
    halves_seed: int = 0
    """The seed of the selection/report halves of the validation videos: the frame training's
    `evaluation.halves_seed`, so both stages split the same videos the same way."""

    def __post_init__(self) -> None:
        typed.check(self.window >= 1, "evaluation.window", "must be at least 1")
        typed.check(self.mode in smoothing.MODES, "evaluation.mode", "centred or block")


@dataclass
class TemporalJobConfig:
    frame_checkpoint: str = ""
    """The trained frame model (checkpoint file, run folder or Ray run): frozen, it gives features."""
    shards: str = ""
    """Aff-Wild2 shard folder: train videos to learn from, validation videos to evaluate on."""
    features: str | None = None
    """Where the extracted features go (default `<run>/features`). Runs over the same frame model
    and shards can share one folder: files already extracted by that model are not redone."""
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    evaluation: TemporalEvaluationConfig = field(default_factory=TemporalEvaluationConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    """The feature-extraction pass (Ray Data actor pool)."""
    run: TemporalRunConfig = field(default_factory=TemporalRunConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """The same settings as jobs.train's: 0 workers is one process, N runs N Ray Train workers
    (gradients averaged, replicas identical)."""

    def __post_init__(self) -> None:
        typed.check(bool(self.frame_checkpoint), "frame_checkpoint", "set it to a trained frame run")
        typed.check(bool(self.shards), "shards", "set it to the Aff-Wild2 shard folder")

    @property
    def folder(self) -> str:
        return storage.join(self.run.storage, self.run.name)

    @property
    def features_folder(self) -> str:
        return self.features or storage.join(self.folder, FEATURES_FOLDER)


def load_temporal_config(path: str | None = None, overrides: list[str] | None = None,
                         base: dict[str, Any] | None = None) -> TemporalJobConfig:
    return typed.from_mapping(TemporalJobConfig, recipe_mapping(path, overrides, base))


def to_mapping(config: TemporalJobConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


# ------------------------------------------------------------------ features

@dataclass
class FeatureSet:
    """One subset's stored frame-model outputs, in (video, frame) order."""

    features: np.ndarray
    labels: np.ndarray
    videos: np.ndarray
    frames: np.ndarray
    frame_probabilities: np.ndarray

    def sequences(self, clip_length: int) -> FrameSequences:
        return FrameSequences(self.features, self.labels, self.videos, self.frames, clip_length)


def read_features(uris: list[str], subset: str) -> FeatureSet:
    """The rows of `subset` (train/validation) from feature files written by the extraction pass;
    undecodable frames are dropped (they have no features), their count is the caller's to report."""
    columns = [schema.VIDEO, schema.FRAME, schema.LABEL, schema.SPLIT, PREDICTED, FEATURES,
               *[f"probability_{name.lower()}" for name in schema.CLASS_NAMES]]
    tables = [storage.read_parquet(uri, columns) for uri in uris]
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows == 0:
        raise ValueError("no extracted features to read")
    table = table.filter(pa.compute.and_(pa.compute.equal(table[schema.SPLIT], subset),
                                         pa.compute.greater_equal(table[PREDICTED], 0)))
    if table.num_rows == 0:
        raise ValueError(f"no decodable Aff-Wild2 {subset} frames among the extracted features")
    table = table.sort_by([(schema.VIDEO, "ascending"), (schema.FRAME, "ascending")])
    width = table.schema.field(FEATURES).type.list_size
    flat = table[FEATURES].combine_chunks().flatten().to_numpy()
    return FeatureSet(features=flat.reshape(table.num_rows, width).astype(np.float32),
                      labels=table[schema.LABEL].to_numpy().astype(np.int64),
                      videos=table[schema.VIDEO].to_numpy(zero_copy_only=False),
                      frames=table[schema.FRAME].to_numpy().astype(np.int64),
                      frame_probabilities=probabilities_of(table))


# ------------------------------------------------------------------ evaluation

def ablation(validation: FeatureSet, temporal_probabilities: np.ndarray | None,
             evaluation: TemporalEvaluationConfig, labels: np.ndarray | None = None) -> dict[str, float]:
    """Validation macro-F1 of the paper's rows: frame model, + smoothing, + temporal, + both;
    `labels` (default the validation labels) with -1 where a frame is not scored."""
    labels = validation.labels if labels is None else labels
    rows: dict[str, float] = {}
    candidates = [("frame", validation.frame_probabilities)]
    if temporal_probabilities is not None:
        candidates.append(("temporal", temporal_probabilities))
    for name, probabilities in candidates:
        predicted = probabilities.argmax(axis=1)
        smoothed = smoothing.smooth_by_video(validation.videos, validation.frames, predicted,
                                             evaluation.window, evaluation.mode)
        rows[name] = metrics.macro_f1(labels, predicted)
        rows[f"{name}+smoothing"] = metrics.macro_f1(labels, smoothed)
    return rows


def ablation_halves(validation: FeatureSet, temporal_probabilities: np.ndarray | None,
                    evaluation: TemporalEvaluationConfig) -> dict[str, dict[str, float]]:
    """The ablation rows on each half of the validation videos (`validation_halves`, as the frame
    training draws them): an epoch is chosen on the selection half and reported on the other.
    Smoothing runs over all videos and the other half's frames are left unscored; a window never
    crosses a video, so that equals smoothing a half alone."""
    selection = validation_halves(validation.videos, [""] * len(validation.videos), evaluation.halves_seed)
    halves: dict[str, dict[str, float]] = {}
    for name, mask in ((SELECTION, selection), (REPORT, ~selection)):
        labels = np.where(mask, validation.labels, schema.NO_LABEL)
        halves[name] = {"scored_frames": int((labels >= 0).sum()),
                        **ablation(validation, temporal_probabilities, evaluation, labels)}
    return halves


# ------------------------------------------------------------------ training

def save_checkpoint(folder: str, trainer: TemporalTrainer, config: TemporalJobConfig, epoch: int,
                    frame_run_id: str, history: list[dict[str, Any]] | None = None) -> str:
    buffer = io.BytesIO()
    torch.save({"trainer": trainer.state_dict(), "epoch": epoch, "feature_dim": trainer.sequences.feature_dim,
                "config": json.dumps(to_mapping(config)), "frame_run_id": frame_run_id,
                "history": json.dumps(history or [])}, buffer)
    uri = storage.join(folder, CHECKPOINT)
    storage.write_bytes_atomic(uri, buffer.getvalue())
    return uri


def load_checkpoint(uri: str) -> dict[str, Any]:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)


def load_temporal_model(uri: str, device: str = "cpu") -> tuple[TemporalEncoder, TemporalJobConfig, dict]:
    """The trained encoder of a temporal checkpoint (a file, or the run folder holding temporal.pt)."""
    if not uri.endswith(".pt"):
        uri = storage.join(uri, CHECKPOINT)
    state = load_checkpoint(uri)
    config = load_temporal_config(base=json.loads(state["config"]))
    model = TemporalEncoder(int(state["feature_dim"]), config.temporal).to(device)
    model.load_state_dict(state["trainer"]["model"])
    model.eval()
    return model, config, state


def fit(config: TemporalJobConfig, train: FeatureSet, validation: FeatureSet, frame_run_id: str,
        collectives: Collectives | None = None, rank: int = 0, world_size: int = 1,
        restored: dict[str, Any] | None = None,
        report: Callable[[dict[str, Any], TemporalTrainer, list[dict[str, Any]]], None] | None = None
        ) -> dict[str, Any]:
    """Train (resuming from `restored`, or from the run folder's temporal.pt in one process),
    evaluate the ablation each epoch, write metrics.jsonl/metrics.json from rank 0."""
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    device = "cuda" if config.run.device == "auto" and torch.cuda.is_available() else (
        "cpu" if config.run.device == "auto" else config.run.device)
    trainer = TemporalTrainer(config.temporal, train.sequences(config.temporal.clip_length),
                              collectives, rank, world_size, device)
    folder = config.folder
    checkpoint_uri = storage.join(folder, CHECKPOINT)
    history: list[dict[str, Any]] = []
    if restored is None and world_size == 1 and storage.exists(checkpoint_uri):
        restored = load_checkpoint(checkpoint_uri)
    if restored is not None:
        trainer.load_state_dict(restored["trainer"])  # rank 0's: networks and optimizer are shared
        history = json.loads(restored.get("history", "[]"))
        if rank != 0:  # clips must stay this rank's own, not a copy of rank 0's draws
            trainer.rng = np.random.default_rng([config.temporal.seed, rank, trainer.step])
    sequences = validation.sequences(config.temporal.clip_length)
    record: dict[str, Any] | None = None
    while trainer.step < config.temporal.total_steps:
        epoch = trainer.step // config.temporal.steps
        losses = trainer.train_steps((epoch + 1) * config.temporal.steps - trainer.step)
        loss = float(np.mean(losses))
        if world_size > 1 and collectives is not None:
            loss = float(collectives.all_reduce_mean(torch.tensor(loss, dtype=torch.float64)))
        probabilities = predict_sequences(trainer.model, sequences, config.temporal.batch_clips,
                                          config.temporal.inference_stride)
        record = {"epoch": epoch + 1, "step": trainer.step, "loss": loss,
                  "ablation": ablation(validation, probabilities, config.evaluation),
                  "halves": ablation_halves(validation, probabilities, config.evaluation)}
        history.append(record)
        if rank == 0:
            lines = "".join(json.dumps(item) + "\n" for item in history).encode()
            storage.write_bytes_atomic(storage.join(folder, METRICS_LINES), lines)
            if report is None:
                save_checkpoint(folder, trainer, config, epoch + 1, frame_run_id, history)
        if report is not None:  # Ray Train: the caller checkpoints (trainer and history so far)
            report(record, trainer, history)
        rows = record["ablation"]
        print(f"[temporal] epoch {epoch + 1} loss {loss:.4f}  " + "  ".join(
            f"{name} {value:.4f}" for name, value in rows.items()), flush=True)
    if record is None:  # already trained: evaluate what is there
        probabilities = predict_sequences(trainer.model, sequences, config.temporal.batch_clips,
                                          config.temporal.inference_stride)
        record = {"epoch": trainer.step // config.temporal.steps, "step": trainer.step,
                  "ablation": ablation(validation, probabilities, config.evaluation),
                  "halves": ablation_halves(validation, probabilities, config.evaluation)}
    final = {"run": config.run.name, "frame_run_id": frame_run_id, "steps": trainer.step,
             "validation_frames": int(len(validation.labels)),
             "scored_frames": int((validation.labels >= 0).sum()),
             "train_frames": int(len(train.labels)), "ablation": record["ablation"],
             "halves": record["halves"],
             "window": config.evaluation.window, "mode": config.evaluation.mode,
             "config": to_mapping(config)}
    if rank == 0:
        # The final model where jobs.infer --temporal looks for it (Ray keeps its own copies too).
        save_checkpoint(folder, trainer, config, record["epoch"], frame_run_id, history)
        storage.write_json_atomic(storage.join(folder, METRICS), final)
    return final


def apply_temporal(table: pa.Table, model: Any, config: Any) -> pa.Table:
    """Replace the frame model's probabilities and labels by the temporal encoder's over each video
    (frames in order, windows of `config.clip_length`); keeps the frame model's label as
    `frame_predicted` and drops the features. Undecodable frames (no features) stay -1."""
    decoded = table[DECODED].to_numpy(zero_copy_only=False)
    width = table.schema.field(FEATURES).type.list_size
    features = table[FEATURES].combine_chunks().flatten().to_numpy().reshape(table.num_rows, width)
    probabilities = np.zeros((table.num_rows, schema.NUM_CLASSES), np.float32)
    if decoded.any():
        rows = np.flatnonzero(decoded)
        sequences = FrameSequences(features[rows], np.full(rows.size, schema.NO_LABEL),
                                   table[schema.VIDEO].to_numpy(zero_copy_only=False)[rows],
                                   table[schema.FRAME].to_numpy()[rows], config.clip_length)
        probabilities[rows] = predict_sequences(model, sequences, config.batch_clips, config.inference_stride)
    predicted = np.where(decoded, probabilities.argmax(axis=1), schema.NO_LABEL)
    table = table.drop_columns([FEATURES]).rename_columns(
        [f"frame_{PREDICTED}" if name == PREDICTED else name for name in table.column_names if name != FEATURES])
    for index, name in enumerate(PROBABILITY_COLUMNS):
        table = table.set_column(table.column_names.index(name), name, pa.array(probabilities[:, index]))
    table = table.append_column(PREDICTED, pa.array(predicted.astype(np.int64)))
    return table.set_column(table.column_names.index(CONFIDENCE), CONFIDENCE, pa.array(probabilities.max(axis=1)))
