"""The training loop around any registered method: epochs of steps, the per-epoch threshold sync
over the whole labeled set, validation, metrics and checkpoints.

Pure PyTorch. The Ray Train adapter runs this same loop per worker, passing torch.distributed
`Collectives`, its rank and a `report` callback; nothing here knows about Ray. With several
workers the replicas stay identical: gradients are averaged before every optimizer step and rank
0's method state is broadcast once per epoch (BatchNorm buffers are per-worker running averages).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.core.pseudo_label_quality import add_counts, empty_counts, quality_report
from pipeline.core.thresholds import ClassStatistics
from pipeline.data import schema, storage
from pipeline.data.pseudo_labels import read_accepted
from pipeline.data.sampler import ClassBalancedSampler
from pipeline.methods.base import Collectives, Method, MethodContext, StepResult, TrainBatch
from pipeline.progress import format_seconds
from pipeline.training import checkpoint
from pipeline.training.config import TrainConfig, to_mapping
from pipeline.training.data import ImageTable, UnlabeledStream, read_labeled, read_validation
from pipeline.training.gradients import OverlappedGradientAverage, average_gradients, reduce_in_place
from pipeline.training.evaluate import REPORT, SELECTION, predict_table, prepared_batches, validation_report
from pipeline.training.inputs import DecodeGuard, DecodedStream, InputPipeline, UnlabeledSource
from pipeline.training.tensorboard import TensorBoardLog

METRICS_LINES = "metrics.jsonl"
FINAL_METRICS = "metrics.json"

Reporter = Callable[[dict[str, Any], str | None], None]

WORKER_STATE_KEYS = ("unlabeled", "rng", "input_rng", "view_generator", "history")
"""The parts of `Trainer.state()` that are each worker's own: its share of the unlabeled stream,
its random generators and its metrics history. The rest is identical on every worker."""
WORKER_METRICS_FOLDER = "workers"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device is cuda but no CUDA device is visible")
    return torch.device(name)


def sync_threshold_statistics(statistics: ClassStatistics, collectives: Collectives) -> ClassStatistics:
    """Sum one epoch's per-class sums and counts over every worker, so each applies the same update."""
    summed = collectives.all_reduce_sum(statistics.as_tensor())
    return ClassStatistics.from_tensor(summed)


def parameter_fingerprint(method: Method) -> list[float]:
    """Three float64 sums over every parameter the method's optimizers update (plain, squared, and
    weighted by position). Data-parallel replicas that averaged every gradient hold identical
    parameters, so their fingerprints are equal to the last bit; they are taken before the
    per-epoch broadcast, which would hide a replica that trained on its own."""
    values = torch.cat([parameter.detach().reshape(-1).double().cpu() for optimizer in _optimizers(method)
                        for group in optimizer.param_groups for parameter in group["params"]])
    weights = torch.linspace(1.0, 2.0, values.numel(), dtype=torch.float64)
    return [float(values.sum()), float((values * values).sum()), float((values * weights).sum())]


def synchronize_replicas(method: Method, collectives: Collectives, rank: int) -> None:
    """Give every worker rank 0's method state (networks, EMA, optimizers, thresholds): at the start,
    so replicas begin equal, and after each epoch, for the BatchNorm buffers each worker averaged
    over its own batches. A broadcast written as a sum to which only rank 0 contributes."""
    tensors: list[torch.Tensor] = []

    def collect(tensor: torch.Tensor) -> torch.Tensor:
        tensors.append(tensor)
        return tensor

    state = _map_tensors(method.state_dict(), collect)
    count = torch.tensor(float(sum(tensor.numel() for tensor in tensors)), dtype=torch.float64)
    if float(collectives.all_reduce_mean(count)) != float(count):
        raise RuntimeError("workers hold method states of different sizes; cannot synchronise them")
    values = [tensor.detach().clone() if rank == 0 else torch.zeros_like(tensor) for tensor in tensors]
    reduce_in_place(values, collectives.all_reduce_sum)
    replacements = iter(values)
    method.load_state_dict(_map_tensors(state, lambda tensor: next(replacements)))


def _map_tensors(value: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` with every tensor in its nested dicts, lists and tuples replaced by function(tensor),
    visited in a fixed order (the same on every worker)."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, dict):
        mapped = type(value)((key, _map_tensors(item, function)) for key, item in value.items())
        if hasattr(value, "_metadata"):  # nn.Module.state_dict's per-module versions
            mapped._metadata = value._metadata
        return mapped
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(item, function) for item in value)
    return value


class StepObserver:
    """Watches each training step without taking part: `Trainer` calls it on every worker just
    before and just after `method.train_step`, with the batch the method receives. For
    instrumentation (the data-parallel equivalence test records each worker's batch and parameters
    around a step); an observer must leave the trainer, its method and the batch unchanged."""

    def before_step(self, trainer: Trainer, batch: TrainBatch) -> None:
        """The method holds the state the step starts from; `trainer.global_step` is the step's number."""

    def after_step(self, trainer: Trainer, batch: TrainBatch, result: StepResult) -> None:
        """The step is done: gradients averaged over the workers and applied."""


@dataclass
class EpochTotals:
    steps: int = 0
    images: int = 0
    """Distinct images the steps trained on (a DTM step: B labeled + U unlabeled)."""
    forward_images: int = 0
    """Images through the networks' forward passes (a DTM step: B + 2U; `Method.forward_images`)."""
    undecodable: int = 0
    seconds: float = 0.0
    input_seconds: float = 0.0
    """Time the loop waited for its next batch (input not ready): where a slow input path shows."""

    def __post_init__(self) -> None:
        # Sums of the steps' values, float64 on the training device: adding a step's values never
        # waits for the step; `read_values` brings them to the host.
        self.sums: dict[str, torch.Tensor | float] = {}
        self.first_non_finite: torch.Tensor | None = None
        """The first step (global number) with a non-finite value, -1 while none; on the device."""
        # Every pseudo label of the epoch against the label the split hid (`core.pseudo_label_quality`),
        # counted on the training device so no step waits for the host; the acceptance rate and the
        # accepted-per-class histogram are sums of this table.
        self.pseudo_label_counts = empty_counts()

    def add_values(self, values: dict[str, torch.Tensor], step: int) -> None:
        """Add one step's `StepResult.values`, and remember `step` if one of them is not finite."""
        finite = None
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().to(torch.float64)
                finite = torch.isfinite(value) if finite is None else finite & torch.isfinite(value)
            elif not math.isfinite(value):
                raise FloatingPointError(f"non-finite {name} at step {step}: {value}")
            self.sums[name] = self.sums.get(name, 0.0) + value
        if finite is not None:
            if self.first_non_finite is None:
                self.first_non_finite = torch.full((), -1, dtype=torch.int64, device=finite.device)
            self.first_non_finite = torch.where(~finite & (self.first_non_finite < 0), step,
                                                self.first_non_finite)

    def read_values(self) -> dict[str, float]:
        """The sums so far, read to the host in one copy (the loop's one synchronisation per log
        interval); raises FloatingPointError naming the first step whose values were not finite."""
        tensors = [name for name, value in self.sums.items() if isinstance(value, torch.Tensor)]
        read = {name: float(value) for name, value in self.sums.items() if name not in tensors}
        if tensors:
            stacked = torch.stack([self.sums[name] for name in tensors]
                                  + [self.first_non_finite.to(torch.float64)]).cpu().tolist()
            read.update(zip(tensors, stacked))
            if stacked[-1] >= 0:
                raise FloatingPointError(f"non-finite loss at step {int(stacked[-1])}: sums so far {read}")
        return read


class Trainer:
    """Trains `config` in this process; `fit()` returns the final metrics."""

    def __init__(self, config: TrainConfig, collectives: Collectives | None = None, rank: int = 0,
                 world_size: int = 1, report: Reporter | None = None,
                 run_folder: str | None = None, save_checkpoints: bool = True,
                 unlabeled: UnlabeledSource | None = None,
                 step_observer: StepObserver | None = None, device: torch.device | None = None) -> None:
        """`save_checkpoints=False` leaves checkpoints to the caller (Ray Train saves them from the
        `report` callback and restores them with `load_state`); metrics still go to `run_folder`.
        `unlabeled` replaces the in-process stream over the pool (Ray Train passes its Ray Data
        stream); it is used only by methods that take unlabeled images. `step_observer` sees every
        step's batch (see StepObserver). `device` overrides `run.device` (the sync-free test
        trains on `meta`, a device without data)."""
        self.config = config
        self.collectives = collectives or Collectives()
        self.rank = rank
        self.world_size = world_size
        self.report = report
        self.run_folder = run_folder or storage.join(config.run.storage, config.run.name)
        self.save_checkpoints = save_checkpoints
        self.step_observer = step_observer
        self.device = device or resolve_device(config.run.device)
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        configure_backends(self.device, config.run)
        seed = config.run.seed
        torch.manual_seed(seed * 1000 + rank)
        self.numpy_generator = np.random.default_rng([seed, rank])

        if not config.data.split:
            raise ConfigError("data.split: set it to a jobs.split output folder "
                              "(--set data.split=<dir or s3://...>)")
        self.labeled: ImageTable = read_labeled(config.data.split)
        self.training_set = self.labeled  # what steps draw from: labeled (+ accepted pseudo labels)
        if config.data.labeled_pseudo_labels:
            pseudo = read_accepted(config.data.labeled_pseudo_labels, config.data.pseudo_labels_per_class, seed)
            self.training_set = self.labeled.concat(ImageTable.from_table(pseudo))
            print(f"[train] {len(pseudo)} pseudo-labeled rows join {len(self.labeled)} labeled rows", flush=True)
        self.validation: ImageTable = read_validation(config.data.split)
        self.steps_per_epoch = config.scaling.steps_per_worker(config.run.steps_per_epoch, world_size)
        method_class = config.method_class()
        context = MethodContext(model=config.model, optimizer=config.optimizer,
                                total_steps=config.run.epochs * self.steps_per_epoch, device=self.device,
                                precision=config.run.precision, collectives=self.collectives)
        self.method: Method = method_class(config.options(), context)
        scale_learning_rates(self.method, config.scaling.learning_rate_factor(world_size))
        if config.run.compile != "off":
            # In place (nn.Module.compile): the state dict keeps its keys, so checkpoints do not
            # change; after the method's constructor, so the EMA copies stay plain modules.
            for network in trained_networks(self.method):
                network.compile(backend=config.run.compile)
        needs = method_class.views
        self.unlabeled: UnlabeledSource | None = None
        if needs.unlabeled and config.data.use_unlabeled and config.data.unlabeled_ratio > 0:
            self.unlabeled = unlabeled or DecodedStream(UnlabeledStream(
                config.data.split, seed, config.data.shuffle_buffer, config.data.unlabeled_sources,
                rank, world_size))
        self.sampler = ClassBalancedSampler(self.training_set.labels,
                                            self.steps_per_epoch * config.data.labeled_batch,
                                            seed, rank=rank, world_size=world_size)
        self.inputs = InputPipeline(config.data, needs, self.training_set, self.unlabeled, self.device,
                                    seed * 1000 + rank)
        self.decode_guard = DecodeGuard(config.data.max_undecodable_fraction)
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.gradient_averages: list[OverlappedGradientAverage] = []
        if world_size > 1:
            optimizers = _optimizers(self.method)
            if not optimizers:
                raise RuntimeError(f"{config.method}: no optimizer attribute to average gradients for")
            bucket_megabytes = config.scaling.gradient_bucket_megabytes
            for optimizer in optimizers:
                if bucket_megabytes > 0:
                    self.gradient_averages.append(
                        OverlappedGradientAverage(optimizer, self.collectives, bucket_megabytes))
                else:
                    optimizer.register_step_pre_hook(self._average_gradients)

    def _average_gradients(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        average_gradients([parameter for group in optimizer.param_groups for parameter in group["params"]],
                          self.collectives)

    # --------------------------------------------------------------------------- checkpoints

    def state(self) -> dict[str, Any]:
        return {
            "method": self.method.state_dict(),
            "sampler": self.sampler.state_dict(),
            "unlabeled": self.unlabeled.state_dict() if self.unlabeled else {},
            "epoch": self.epoch,
            "global_step": self.global_step,
            "rng": checkpoint.rng_state(self.numpy_generator, self.device),
            "input_rng": checkpoint.rng_state(self.inputs.rng),
            "view_generator": self.inputs.generator.get_state(),
            "history": json.dumps(self.history),
            "config": json.dumps(to_mapping(self.config)),
        }

    def worker_state(self) -> dict[str, Any]:
        """This worker's own part of `state()` (see WORKER_STATE_KEYS)."""
        state = self.state()
        return {key: state[key] for key in WORKER_STATE_KEYS}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore `state()`. A state without the WORKER_STATE_KEYS (a worker whose own part was not
        saved) keeps this worker's fresh stream, generators and history."""
        self.method.load_state_dict(state["method"])
        self.sampler.load_state_dict(state["sampler"])
        if self.unlabeled and state.get("unlabeled"):
            self.unlabeled.load_state_dict(state["unlabeled"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        if "rng" in state:
            checkpoint.restore_rng_state(state["rng"], self.numpy_generator, self.device)
        if "input_rng" in state:
            checkpoint.restore_rng_state(state["input_rng"], self.inputs.rng)
        if "view_generator" in state:
            self.inputs.generator.set_state(state["view_generator"])
        if "history" in state:
            self.history = json.loads(state["history"])

    def resume_if_possible(self, uri: str | None = None) -> bool:
        """Load `uri`, or else the run folder's latest checkpoint when this trainer owns checkpoints
        (`save_checkpoints`) and `run.resume` is on."""
        owns_checkpoints = self.save_checkpoints and self.config.run.resume
        uri = uri or (checkpoint.latest(self.run_folder) if owns_checkpoints else None)
        if not uri:
            return False
        # Load on the CPU: RNG states must stay CPU tensors, and load_state_dict copies the
        # weights into the (possibly CUDA) parameters anyway.
        self.load_state(checkpoint.load(uri, map_location="cpu"))
        return True

    # --------------------------------------------------------------------------- one epoch

    def train_epoch(self) -> EpochTotals:
        totals = EpochTotals()
        totals.pseudo_label_counts = totals.pseudo_label_counts.to(self.device)
        batch_size = self.config.data.labeled_batch
        indices = self.sampler.indices(self.epoch)
        batches = [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
        batches = batches[:self.steps_per_epoch]
        started = time.perf_counter()
        self.inputs.prefetch(batches[0])
        every = self.config.run.log_every_steps
        every_seconds = self.config.run.log_every_seconds
        last_line = started
        for number, batch_indices in enumerate(batches):
            following = batches[number + 1] if number + 1 < len(batches) else None
            self.train_step(batch_indices, following, totals)
            now = time.perf_counter()
            due = ((every and totals.steps % every == 0)
                   or (every_seconds and now - last_line >= every_seconds))
            if due and totals.steps < len(batches):
                last_line = now
                values = totals.read_values()  # raises on a non-finite loss
                if self.rank == 0:
                    _log_progress(self.epoch, totals, len(batches), values, now - started)
        totals.seconds = time.perf_counter() - started
        self.decode_guard.check()  # at each epoch's end, however few images were drawn
        return totals

    def train_step(self, batch_indices: np.ndarray, following: np.ndarray | None, totals: EpochTotals) -> None:
        """One step on the labeled rows `batch_indices` (and the unlabeled rows the stream gives),
        counted into `totals`; starts preparing `following`. Nothing here reads a device value
        back to the host, so on a GPU the host queues the next step while this one runs (the
        sync-free test runs it on the `meta` device, where any such read fails)."""
        waited = time.perf_counter()
        batch, undecodable_ids, hidden = self.inputs.next(batch_indices, following)
        totals.input_seconds += time.perf_counter() - waited
        if self.step_observer:
            self.step_observer.before_step(self, batch)
        result = self.method.train_step(batch, self.global_step)
        if self.step_observer:
            self.step_observer.after_step(self, batch, result)
        if hidden is not None and result.accepted_mask is not None:
            add_counts(totals.pseudo_label_counts, hidden.labels, result.pseudo_labels,
                       result.accepted_mask, hidden.sources)
        totals.add_values(result.values, self.global_step)
        self.global_step += 1
        totals.steps += 1
        decoded = len(batch.labels) + (len(batch.unlabeled_weak) if batch.unlabeled_weak is not None else 0)
        totals.undecodable += len(undecodable_ids)
        totals.images += decoded
        self.decode_guard.add(decoded, undecodable_ids)
        totals.forward_images += self.method.forward_images(batch)

    @torch.no_grad()
    def update_thresholds(self) -> None:
        """Score the whole labeled set with the method's threshold network and apply one update.

        Every worker scores its own slice of the labeled set; the per-class sums and counts are
        summed over workers, so all of them apply the identical, whole-set update.
        """
        if self.method.thresholds() is None:
            return
        model = self.method.threshold_model()
        was_training = model.training
        model.eval()
        slice_indices = np.arange(self.rank, len(self.labeled), self.world_size)
        total: ClassStatistics | None = None
        batch_size = self.config.evaluation.batch_size
        for indices, images, ok in prepared_batches(self.labeled, slice_indices, batch_size,
                                                    self.inputs.evaluation_images):
            if not ok.any():
                continue
            keep = torch.from_numpy(ok).to(self.device)
            with self.method.autocast():
                probabilities = model(self.method.prepare(images[keep])).float().softmax(dim=1)
            labels = torch.from_numpy(self.labeled.labels[indices][ok]).to(self.device)
            statistics = self.method.threshold_statistics(probabilities, labels).to("cpu")
            total = statistics if total is None else total + statistics
        model.train(was_training)
        if total is None:
            total = ClassStatistics.zeros(schema.NUM_CLASSES)
        self.method.update_thresholds(sync_threshold_statistics(total, self.collectives), self.epoch)

    def evaluate(self) -> dict[str, Any] | None:
        """The validation report (on rank 0; None on the others). Every worker predicts its slice of
        the validation rows and the predictions are gathered, so all workers must call it."""
        probabilities = predict_table(self.validation, self.method.predict,
                                      self.inputs.evaluation_images, self.config.evaluation.batch_size,
                                      self.collectives, self.rank, self.world_size)
        if self.rank != 0:
            return None
        return validation_report(self.validation, probabilities, self.config.evaluation.windows,
                                 self.config.evaluation.mode, self.config.evaluation.halves_seed)

    # --------------------------------------------------------------------------- the run

    def epoch_metrics(self, totals: EpochTotals, validation: dict[str, Any] | None,
                      fingerprint: list[float] | None = None) -> dict[str, Any]:
        """The epoch's record. Pseudo-label counts and images/s total are summed over workers (two
        all-reduces); losses and images_per_second are this worker's."""
        thresholds = self.method.thresholds()
        losses = totals.read_values()  # raises on a non-finite loss
        images_per_second = totals.images / max(totals.seconds, 1e-9)
        images_per_second_total = float(self.collectives.all_reduce_sum(
            torch.tensor([images_per_second], dtype=torch.float64)).cpu()[0])
        pseudo_label_counts = self.collectives.all_reduce_sum(totals.pseudo_label_counts).cpu()
        accepted, candidates = _acceptance(pseudo_label_counts)
        return {
            "epoch": self.epoch,
            "step": self.global_step,
            "losses": {name: value / max(1, totals.steps) for name, value in losses.items()},
            "learning_rates": [group["lr"] for optimizer in _optimizers(self.method)
                               for group in optimizer.param_groups],
            "thresholds": thresholds.cpu().tolist() if thresholds is not None else None,
            "pseudo_label_acceptance_rate": float(accepted.sum() / candidates) if candidates else None,
            "pseudo_label_histogram": accepted.tolist() if candidates else None,
            # Of the unlabeled rows seen this epoch, against the labels the split hid: acceptance
            # rate, accuracy of the accepted pseudo labels, per class and per source.
            "pseudo_label_quality": (quality_report(pseudo_label_counts)
                                     if int(pseudo_label_counts.sum()) else None),
            "images_per_second": images_per_second,
            "images_per_second_total": images_per_second_total,
            # Through the networks: a DTM step trains on B + U distinct images but runs B + 2U.
            "forward_images_per_second": totals.forward_images / max(totals.seconds, 1e-9),
            "input_wait_fraction": totals.input_seconds / max(totals.seconds, 1e-9),
            "undecodable_images": totals.undecodable,
            "validation": validation,
            # With several workers: this replica's parameters before the broadcast; equal on
            # every rank when gradients were averaged (see parameter_fingerprint).
            "replica_fingerprint": fingerprint,
        }

    def write_metrics(self) -> None:
        """metrics.jsonl from rank 0; with several workers also workers/rank-NNNN.jsonl from each."""
        lines = "".join(json.dumps(record) + "\n" for record in self.history).encode()
        if self.rank == 0:
            storage.write_bytes_atomic(storage.join(self.run_folder, METRICS_LINES), lines)
        if self.world_size > 1:
            storage.write_bytes_atomic(worker_metrics_uri(self.run_folder, self.rank), lines)

    def fit(self) -> dict[str, Any]:
        self.resume_if_possible()
        config = self.config
        if self.world_size > 1:
            synchronize_replicas(self.method, self.collectives, self.rank)
        events = TensorBoardLog(self.run_folder) if self.rank == 0 and self.epoch < config.run.epochs else None
        try:
            while self.epoch < config.run.epochs:
                totals = self.train_epoch()
                self.epoch += 1
                fingerprint = None
                if self.world_size > 1:
                    fingerprint = parameter_fingerprint(self.method)
                    synchronize_replicas(self.method, self.collectives, self.rank)
                self.update_thresholds()
                validation = None
                due = self.epoch % config.evaluation.every_epochs == 0 or self.epoch == config.run.epochs
                if due:  # replicas are identical: each predicts a slice, rank 0 reports
                    validation = self.evaluate()
                record = self.epoch_metrics(totals, validation, fingerprint)
                self.history.append(record)
                self.write_metrics()
                if events:
                    events.write(record)
                saved = None
                if self.rank == 0 and self.save_checkpoints:
                    saved = checkpoint.save(self.run_folder, self.epoch, self.state(),
                                            config.run.checkpoints_to_keep)
                if self.report:
                    self.report(record, saved)
                _log(record)
        finally:
            self.inputs.close()
            if events:
                events.close()
        final = self.final_metrics()
        if self.rank == 0:
            storage.write_json_atomic(storage.join(self.run_folder, FINAL_METRICS), final)
        return final

    def final_metrics(self) -> dict[str, Any]:
        evaluated = [record for record in self.history if record["validation"]]
        last = evaluated[-1] if evaluated else None
        # The best epoch is chosen on the selection half; its report-half figure is the one to quote.
        best = max(evaluated, key=selection_score) if evaluated else None
        return {
            "method": self.config.method,
            "run": self.config.run.name,
            "epochs": self.epoch,
            "steps": self.global_step,
            "final": last,
            "best_epoch": best["epoch"] if best else None,
            "best_macro_f1": best["validation"]["macro_f1"] if best else None,
            "best_selection_macro_f1": selection_score(best) if best else None,
            "best_report_macro_f1": _half(best, REPORT) if best else None,
            "config": to_mapping(self.config),
        }


def _half(record: dict[str, Any], name: str) -> float:
    """A validated epoch record's raw macro-F1 on one half (the whole set for records written
    before the halves existed)."""
    halves = record["validation"].get("halves")
    return halves[name]["macro_f1"] if halves else record["validation"]["macro_f1"]


def selection_score(record: dict[str, Any]) -> float:
    return _half(record, SELECTION)


def worker_metrics_uri(run_folder: str, rank: int) -> str:
    return storage.join(run_folder, WORKER_METRICS_FOLDER, f"rank-{rank:04d}.jsonl")


def _optimizers(method: Method) -> list[torch.optim.Optimizer]:
    return [value for value in vars(method).values() if isinstance(value, torch.optim.Optimizer)]


def scale_learning_rates(method: Method, factor: float) -> None:
    """Multiply every learning rate of the method's optimizers, and the base rates its schedulers
    compute them from, by `factor` (the scaling.lr_rule); a checkpoint then carries the scaled rates."""
    if factor == 1.0:
        return
    for value in vars(method).values():
        if isinstance(value, torch.optim.Optimizer):
            for group in value.param_groups:
                group["lr"] *= factor
                if "initial_lr" in group:
                    group["initial_lr"] *= factor
        elif isinstance(value, torch.optim.lr_scheduler.LRScheduler):
            value.base_lrs = [rate * factor for rate in value.base_lrs]
            value._last_lr = [rate * factor for rate in value._last_lr]


def trained_networks(method: Method) -> list[torch.nn.Module]:
    """The method's module attributes that own parameters one of its optimizers updates (not its
    EMA or other frozen copies)."""
    trained = {id(parameter) for optimizer in _optimizers(method) for group in optimizer.param_groups
               for parameter in group["params"]}
    return [value for value in vars(method).values() if isinstance(value, torch.nn.Module)
            and any(id(parameter) in trained for parameter in value.parameters())]


def configure_backends(device: torch.device, run: Any) -> None:
    """The CUDA math settings of `run` (TF32, cuDNN autotuning); nothing changes off CUDA."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = run.tf32
    torch.backends.cudnn.allow_tf32 = run.tf32
    torch.backends.cudnn.benchmark = run.cudnn_benchmark


def _acceptance(pseudo_label_counts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(accepted rows per pseudo label, unlabeled rows seen) from a pseudo-label count table."""
    accepted = pseudo_label_counts[:, :, :schema.NUM_CLASSES].sum(dim=(0, 1))
    return accepted, int(pseudo_label_counts.sum())


def _log_progress(epoch: int, totals: EpochTotals, steps: int, values: dict[str, float], seconds: float) -> None:
    """A line within an epoch: where it is, the mean loss so far, the rate and the time left."""
    rate = totals.steps / max(seconds, 1e-9)
    left = (steps - totals.steps) / max(rate, 1e-9)
    accepted, candidates = _acceptance(totals.pseudo_label_counts)  # this worker's so far
    acceptance = f"  accepted {float(accepted.sum()) / candidates:.2f}" if candidates else ""
    print(f"[train] epoch {epoch + 1} step {totals.steps}/{steps}  "
          f"loss {values.get('loss', float('nan')) / max(1, totals.steps):.4f}  "
          f"{totals.images / max(seconds, 1e-9):.0f} img/s  epoch ETA {format_seconds(left)}{acceptance}",
          flush=True)


def _log(record: dict[str, Any]) -> None:
    validation = record["validation"] or {}
    smoothed = validation.get("smoothed") or {}
    parts = [f"epoch {record['epoch']}", f"step {record['step']}",
             f"loss {record['losses'].get('loss', float('nan')):.4f}",
             f"{record['images_per_second']:.0f} img/s"]
    if record["pseudo_label_acceptance_rate"] is not None:
        parts.append(f"accepted {record['pseudo_label_acceptance_rate']:.2f}")
    quality = record.get("pseudo_label_quality") or {}
    if quality.get("accuracy") is not None:
        parts.append(f"pseudo-label accuracy {quality['accuracy']:.2f}")
    if validation:
        parts.append(f"val macro-F1 {validation['macro_f1']:.4f}")
        if validation.get("undecodable_frames"):
            parts.append(f"({validation['undecodable_frames']} undecodable frames; counting them as the "
                         f"scorer does {validation['all_annotated']['macro_f1']:.4f})")
        parts += [f"smoothed@{window} {value['macro_f1']:.4f}" for window, value in smoothed.items()]
    print("[train] " + "  ".join(parts), flush=True)
