"""The Ray Train adapter: `Trainer` once per Ray Train worker over torch.distributed (gloo on CPU,
NCCL on GPU), with Ray owning checkpoints, restarts after a failure and resume by run name.

Data: every worker holds the (small) labeled set and draws its own class-balanced sample
(`ClassBalancedSampler`, seeded by seed, epoch and rank); the unlabeled pool streams through Ray
Data (below: decode and crop in `map_batches`, split across workers with
`DataConfig(datasets_to_split=["unlabeled"])`, one long-lived iterator per worker across epochs),
or with `data.unlabeled_reader=in_process` each worker reads its own share of the pool's files.
Each rank takes the same number of steps per epoch (`scaling.epoch_rule`), so the per-step
collectives and the per-epoch reports pair up.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.data
import ray.train
import torch
from ray.data import FileShuffleConfig
from ray.train.torch import TorchTrainer

from pipeline.config import ConfigError
from pipeline.core.pseudo_label_quality import flat_quality
from pipeline.core.views import WeakView
from pipeline.data import schema, split, storage
from pipeline.training import checkpoint
from pipeline.training.distributed import TorchCollectives
from pipeline.training.config import DataConfig, TrainConfig, load_config, to_mapping
from pipeline.training.inputs import (PREPARED_HIDDEN_LABEL, PREPARED_OK, PREPARED_PIXELS, PREPARED_SAMPLE_ID,
                                      PREPARED_SOURCE, PoolViews, PreparedUnlabeled, UnlabeledSource)
from pipeline.training.loop import WORKER_STATE_KEYS, StepObserver, Trainer

WORKER_CHECKPOINT_FOLDER = "workers"
POOL_COLUMNS = [schema.SAMPLE_ID, schema.IMAGE, schema.SOURCE, schema.SPLIT, schema.LABEL]
DATASET_NAME = "unlabeled"


RAY_CHECKPOINT_LIST = "checkpoint_manager_snapshot.json"
"""Where Ray Train 2.60 lists the checkpoints its controller registered, in the run folder."""
RESUME_PASS_METRIC = "unlabeled_resume_pass"
"""Reported with every checkpoint: the pool pass a worker group restored from it starts at."""


def _checkpoint_list(folder: str) -> dict[str, Any]:
    uri = storage.join(folder, RAY_CHECKPOINT_LIST)
    try:
        return storage.read_json(uri) if storage.exists(uri) else {}
    except ValueError:  # caught mid-write
        return {}


def registered_epochs(folder: str) -> list[int]:
    """Epochs of the checkpoints Ray has registered for the run in `folder` (oldest first)."""
    results = _checkpoint_list(folder).get("checkpoint_results") or []
    return [int(result["metrics"]["epoch"]) for result in results if "epoch" in result.get("metrics", {})]


def resume_pass(folder: str) -> int:
    """The pool pass at which workers restored from the run's latest registered checkpoint start
    (0 for a run without one)."""
    latest = _checkpoint_list(folder).get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get(RESUME_PASS_METRIC, 0))


@dataclass
class WorkerKill:
    """Fault injection for tests: worker `rank` SIGKILLs its own process when it is about to report
    `epoch` (so that epoch's checkpoint is never registered), once per run: `marker` is created
    first and a later attempt that finds it carries on.

    It first waits until Ray has registered the previous epoch's checkpoint: the controller takes
    reports in when it next polls the workers (every 2 s by default), and a worker that dies
    before then loses that checkpoint too (its folder stays in storage, unlisted)."""

    rank: int
    epoch: int
    marker: str
    wait_seconds: float = 120.0

    def maybe_kill(self, rank: int, epoch: int, run_folder: str) -> None:
        if rank != self.rank or epoch != self.epoch or os.path.exists(self.marker):
            return
        deadline = time.monotonic() + self.wait_seconds
        while epoch - 1 not in registered_epochs(run_folder) and epoch > 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        with open(self.marker, "w") as handle:
            handle.write(f"killed rank {rank} before reporting epoch {epoch}, pid {os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------- the worker side

def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the library's Trainer, with Ray's rank, collectives,
    reports and checkpoints."""
    config = load_config(base=loop_config["config"])
    kill = WorkerKill(**loop_config["kill_worker"]) if loop_config.get("kill_worker") else None
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    reporter = RayReporter(rank, kill)
    unlabeled = None
    if uses_ray_data(config):
        unlabeled = streamed_unlabeled(
            config, ray.train.get_dataset_shard(DATASET_NAME), rank)
    trainer = Trainer(config, collectives=TorchCollectives(), rank=rank, world_size=world_size,
                      report=reporter, run_folder=run_folder(config), save_checkpoints=False,
                      unlabeled=unlabeled, step_observer=loop_config.get("step_observer"))
    reporter.trainer = trainer
    restored = ray.train.get_checkpoint()  # a restart after a failure, or a re-run of the same name
    if restored is not None:
        with restored.as_directory() as folder:
            trainer.load_state(read_checkpoint(folder, rank))
    trainer.fit()


class RayReporter:
    """The Trainer's per-epoch `report`: `ray.train.report` on every rank (it is a barrier), each
    with a checkpoint directory that Ray merges: rank 0 writes the full state as
    `checkpoints/epoch-NNNN.pt` (the single-process layout), every other rank its own part
    (`workers/rank-NNNN.pt`: stream position, random generators, history)."""

    def __init__(self, rank: int, kill: WorkerKill | None = None) -> None:
        self.rank = rank
        self.kill = kill
        self.trainer: Trainer | None = None

    def __call__(self, record: dict[str, Any], saved: str | None) -> None:
        assert self.trainer is not None, "RayReporter.trainer is set before fit()"
        with tempfile.TemporaryDirectory() as folder:
            if self.rank == 0:
                checkpoint.save(folder, record["epoch"], self.trainer.state(), keep=0)
            else:
                save_worker_state(folder, self.rank, self.trainer.worker_state())
            if self.kill:
                self.kill.maybe_kill(self.rank, record["epoch"], self.trainer.run_folder)
            metrics = flat_metrics(record)
            if isinstance(self.trainer.unlabeled, StreamedUnlabeled):
                # Every rank is at the same pass (equal split, equal batches): rank 0's stands.
                metrics[RESUME_PASS_METRIC] = self.trainer.unlabeled.resume_pass()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def save_worker_state(folder: str, rank: int, state: dict[str, Any]) -> None:
    path = os.path.join(folder, WORKER_CHECKPOINT_FOLDER, f"rank-{rank:04d}.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)


def read_checkpoint(folder: str, rank: int) -> dict[str, Any]:
    """The state for `rank` from a merged checkpoint directory: rank 0's full state with this rank's
    own part in place of rank 0's (a rank without one, after the worker count grew, keeps its fresh
    stream and generators). CPU first: the networks move to their device as they load."""
    uri = checkpoint.latest(folder)
    if uri is None:
        raise FileNotFoundError(f"{folder}: no checkpoints/epoch-NNNN.pt in the Ray checkpoint")
    state = checkpoint.load(uri, map_location="cpu")
    if rank != 0:
        for key in WORKER_STATE_KEYS:
            state.pop(key)
        own = os.path.join(folder, WORKER_CHECKPOINT_FOLDER, f"rank-{rank:04d}.pt")
        if os.path.exists(own):
            state.update(checkpoint.load(own, map_location="cpu"))
    return state


def flat_metrics(record: dict[str, Any]) -> dict[str, float | int]:
    """An epoch record as the flat scalars Ray and Tune read (None values are left out)."""
    metrics: dict[str, Any] = dict(record["losses"])  # "loss" and the method's own terms
    metrics.update(epoch=record["epoch"], step=record["step"],
                   images_per_second=record["images_per_second"],
                   images_per_second_total=record["images_per_second_total"],
                   input_wait_fraction=record["input_wait_fraction"],
                   pseudo_label_acceptance_rate=record["pseudo_label_acceptance_rate"])
    for name, value in zip(schema.CLASS_NAMES, record["thresholds"] or []):
        metrics[f"threshold_{name.lower()}"] = value
    if record.get("pseudo_label_quality"):
        metrics.update(flat_quality(record["pseudo_label_quality"]))
    validation = record["validation"]
    if validation:
        metrics["macro_f1"] = validation["macro_f1"]
        if validation.get("all_annotated"):
            metrics["macro_f1_all_annotated"] = validation["all_annotated"]["macro_f1"]
            metrics["undecodable_validation_frames"] = validation["undecodable_frames"]
        for name, value in zip(schema.CLASS_NAMES, validation["per_class_f1"]):
            metrics[f"f1_{name.lower()}"] = value
        for window, smoothed in (validation["smoothed"] or {}).items():
            metrics[f"macro_f1_smoothed_{window}"] = smoothed["macro_f1"]
        for half, figures in (validation.get("halves") or {}).items():
            metrics[f"macro_f1_{half}"] = figures["macro_f1"]
            for window, value in (figures.get("smoothed") or {}).items():
                metrics[f"macro_f1_smoothed_{window}_{half}"] = value
    return {name: value for name, value in metrics.items() if value is not None}


# ------------------------------------------------------------------------------- the driver side

def run_folder(config: TrainConfig) -> str:
    """`<run.storage>/<run.name>`: Ray's experiment folder (its checkpoint_* folders) and ours
    (metrics.jsonl, metrics.json, workers/rank-NNNN.jsonl)."""
    return storage.join(storage.absolute(config.run.storage), config.run.name)


def build_trainer(config: TrainConfig, kill_worker: WorkerKill | None = None,
                  step_observer: StepObserver | None = None) -> TorchTrainer:
    """A TorchTrainer for `config`: scaling, storage, failure and checkpoint settings from it.
    `step_observer` is pickled to every worker, whose Trainer calls its copy around each step (see
    StepObserver; it must be importable there).

    Calling `fit()` again with the same `run.name` and `run.storage` continues the run from its
    latest checkpoint (Ray restores its checkpoint list from the storage folder).
    """
    scaling = config.scaling
    if scaling.num_workers < 1:
        raise ConfigError("scaling.num_workers: must be at least 1 for Ray Train")
    if scaling.cpus_per_worker <= 0:
        raise ConfigError("scaling.cpus_per_worker: must be positive")
    if not config.run.resume:
        raise ConfigError("run.resume: Ray Train always continues a run of the same name (a restart "
                          "after a failure needs it); choose a new run.name to start over")
    config = dataclasses.replace(
        config,
        data=dataclasses.replace(
            config.data, split=storage.absolute(config.data.split),
            labeled_pseudo_labels=(storage.absolute(config.data.labeled_pseudo_labels)
                                   if config.data.labeled_pseudo_labels else None)),
        run=dataclasses.replace(config.run, storage=storage.absolute(config.run.storage)))
    keep = config.run.checkpoints_to_keep
    datasets = {}
    if uses_ray_data(config):
        # A callable: Ray Train builds the stream anew at every (re)start of the worker group.
        datasets[DATASET_NAME] = PoolStreamFactory(config)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_mapping(config),
                           "kill_worker": dataclasses.asdict(kill_worker) if kill_worker else None,
                           "step_observer": step_observer},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=config.run.name, storage_path=config.run.storage,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep if keep > 0 else None)),
        # Only the pool is split; the labeled set is small and every rank samples it itself.
        datasets=datasets or None,
        dataset_config=ray.train.DataConfig(datasets_to_split=list(datasets)),
    )


# ----------------------------------------------------------------- the unlabeled pool on Ray Data
# The unlabeled pool as a Ray Data stream: the pool's shard files read in a fresh order each pass,
# pool rows kept, decoded and cropped in `map_batches` (`PoolViews`), split across Ray Train workers;
# each worker consumes its split through one long-lived iterator (`StreamedUnlabeled`).
#
# A pass over a 1.94M pool spans many epochs, so the iterator is never restarted at an epoch: it
# runs to the end of its pass, and only then does the next pass begin (on every rank at the same
# step, because the split is `equal` and every batch has the same size).


def uses_ray_data(config: TrainConfig) -> bool:
    """Whether the unlabeled pool streams through Ray Data for this config ("auto": on Ray Train)."""
    reader = config.data.unlabeled_reader
    if reader == "auto":
        reader = "ray_data" if config.scaling.num_workers > 0 else "in_process"
    method = config.method_class()
    return (reader == "ray_data" and method.views.unlabeled and config.data.use_unlabeled
            and config.data.unlabeled_ratio > 0)


def unlabeled_per_step(config: TrainConfig) -> int:
    return config.data.labeled_batch * config.data.unlabeled_ratio


def unlabeled_dataset(config: TrainConfig, first_pass: int = 0) -> ray.data.Dataset:
    """The lazily executed pool stream of `config`'s split: uint8 `pixels` (N, S, S, 3) after the
    weak geometry and a `decoded` flag per row; its first execution is pass `first_pass`."""
    pool = split.load_unlabeled_pool(config.data.split)
    if not pool.file_uris:
        raise ConfigError(f"data.split: {config.data.split} has an empty unlabeled pool")
    return pool_dataset(pool.file_uris, pool.excluded_ids, config.data, config.run.seed, first_pass)


class PoolStreamFactory:
    """The pool stream for Ray Train, built each time it starts a worker group (Ray Train calls a
    dataset given as a callable then). Ray Data numbers a stream's executions from zero in every new
    worker group, and the file order of a pass is drawn from (seed, execution number): without
    this, the first pass after a restart or a re-run would replay the first pass's file order.
    The stream is seeded from the pass the restored workers start at (`resume_pass`) instead."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def __call__(self) -> ray.data.Dataset:
        return unlabeled_dataset(self.config, resume_pass(run_folder(self.config)))


def stream_seed(seed: int, first_pass: int) -> int:
    """The file-order seed of a stream whose first execution is pass `first_pass` (the run's own
    seed for a stream that starts at pass 0)."""
    return seed if first_pass == 0 else (seed * 1_000_003 + first_pass) % 2**31


def pool_dataset(file_uris: list[str], excluded_ids: Any, data: DataConfig, seed: int,
                 first_pass: int = 0) -> ray.data.Dataset:
    """Shard files (local or s3://, one filesystem) -> the stream of `PoolViews` batches."""
    filesystem, _ = storage.filesystem(file_uris[0])
    paths = [storage.filesystem(uri)[1] for uri in file_uris]
    dataset = ray.data.read_parquet(
        paths, filesystem=filesystem,
        # A new file order every pass, streamed: randomize_block_order would hold the whole pool.
        shuffle=FileShuffleConfig(seed=stream_seed(seed, first_pass), reseed_after_execution=True)
    ).select_columns(POOL_COLUMNS)
    views = PoolViews(data, excluded_ids, seed)
    return dataset.map_batches(views, batch_format="pyarrow", batch_size=data.decode_batch,
                               num_cpus=data.decode_cpus)


class StreamedUnlabeled(UnlabeledSource):
    """One worker's share of the pool stream, `batch_size` rows at a time, across epochs.

    Rows are shuffled within `shuffle_buffer` on top of the per-pass file order. Resume is at a
    pass boundary: Ray Data cannot seek inside a pass, so a restored worker starts the pass after
    the one it was in (the single-process reader resumes exactly; see `UnlabeledStream`)."""

    def __init__(self, shard: Any, batch_size: int, shuffle_buffer: int, seed: int, rank: int,
                 prefetch_batches: int = 2) -> None:
        # A ray.data.DataIterator (a Ray Train split, or dataset.iterator()), or a callable that
        # builds one given the pass it starts at, called when the first pass starts (after a
        # checkpoint's state is loaded): a single-process run resumed at pass P draws P's file order.
        self.shard = shard
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.prefetch_batches = prefetch_batches
        self.pass_number = 0
        self.batches = 0  # taken in this pass
        self._iterator = None

    def _start_pass(self) -> None:
        if callable(self.shard):
            self.shard = self.shard(self.pass_number)
        shuffle = max(self.shuffle_buffer, self.batch_size) if self.shuffle_buffer else None
        self._iterator = iter(self.shard.iter_batches(
            batch_size=self.batch_size, batch_format="numpy", drop_last=True,
            prefetch_batches=self.prefetch_batches, local_shuffle_buffer_size=shuffle,
            local_shuffle_seed=(self.seed * 1_000_003 + self.pass_number) * 1_009 + self.rank
            if shuffle else None))
        self.batches = 0

    def next_batch(self) -> dict[str, np.ndarray]:
        while True:
            if self._iterator is None:
                self._start_pass()
            try:
                batch = next(self._iterator)
            except StopIteration:
                if self.batches == 0:
                    raise ValueError(f"rank {self.rank}: its share of the unlabeled pool holds fewer "
                                     f"than {self.batch_size} rows (one step's worth); use fewer "
                                     "workers or a smaller data.unlabeled_ratio") from None
                self.pass_number += 1
                self._iterator = None
                continue
            self.batches += 1
            return batch

    def take_prepared(self, count: int, weak_view: WeakView, rng: np.random.Generator
                      ) -> PreparedUnlabeled:
        if count != self.batch_size:
            raise ValueError(f"the stream was built for {self.batch_size} images a step, asked for {count}")
        batch = self.next_batch()
        decoded = batch[PREPARED_OK].astype(bool)
        sample_ids = batch[PREPARED_SAMPLE_ID]
        return PreparedUnlabeled(batch[PREPARED_PIXELS][decoded], batch[PREPARED_HIDDEN_LABEL][decoded],
                                 batch[PREPARED_SOURCE][decoded],
                                 [str(sample_id) for sample_id in sample_ids[~decoded]],
                                 [str(sample_id) for sample_id in sample_ids[decoded]], self.pass_number)

    def state_dict(self) -> dict[str, int]:
        return {"pass_number": self.pass_number, "batches": self.batches}

    def resume_pass(self, state: dict[str, int] | None = None) -> int:
        """The pass a stream restored from `state` (default: this stream's own) starts at: the
        next one once a pass has been started, since a pass cannot be continued."""
        state = self.state_dict() if state is None else state
        started = int(state.get("batches", state.get("emitted", 0))) > 0
        return int(state["pass_number"]) + int(started)

    def close(self) -> None:
        # A pass left half-read keeps Ray Data's prefetch thread (a daemon) alive; closing the
        # generator runs its clean-up. A daemon thread still running at interpreter exit can crash it.
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()
        self._iterator = None

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pass_number = self.resume_pass(state)
        self.batches = 0
        self.close()


def streamed_unlabeled(config: TrainConfig, shard: Any, rank: int) -> StreamedUnlabeled:
    return StreamedUnlabeled(shard, unlabeled_per_step(config), config.data.shuffle_buffer,
                             config.run.seed, rank)
