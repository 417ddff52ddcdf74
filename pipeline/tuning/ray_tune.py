"""The Ray edge of the search: a Tune function trainable around the library's `Trainer`, the Tuner
(Optuna TPE, random or grid search; ASHA on an explicit `epoch` clock) and restore.

A trial runs in one process: the Trainer with a `report` callback that calls `tune.report` once per
epoch with the flat trial metrics and a Tune checkpoint of the full state (networks, EMA, optimizer,
thresholds, sampler, stream position, generators, history); a restored trial loads it through
`tune.get_checkpoint()`. A trial with Ray Train workers (`scaling.num_workers > 0`) is the same Tune
function launching a `TorchTrainer` (`ray_train.build_trainer`) whose rank-0 reports reach Tune
through a `TuneReportCallback`; its Train run is named after the trial, so it resumes by name.

The experiment lives at `<storage>/<name>/` (no timestamps): each trial in `trial_<id>/` with Tune's
result.json / progress.csv / checkpoint_* and the Trainer's metrics.jsonl / metrics.json /
tensorboard/. Re-running the same search restores it (`Tuner.can_restore` / `Tuner.restore`):
finished trials are kept, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from typing import Any

# Optuna first and explicitly: OptunaSearch's "Optuna must be installed" hides other import errors.
import optuna  # noqa: F401
import ray
import torch
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from pipeline.config import ConfigError
from pipeline.data import storage
from pipeline.data.ray_ingest import ensure_ray
from pipeline.training import checkpoint, ray_train
from pipeline.training.loop import METRICS_LINES, Trainer
from pipeline.tuning import report
from pipeline.tuning import search as search_file
from pipeline.tuning.metrics import SELECTION_SCORE, trial_metrics
from pipeline.tuning.search import MANIFEST, TIME_ATTRIBUTE, Search, SearchEntry

# ------------------------------------------------------------------------------ the trial side

def run_trial(params: dict[str, Any], manifest: dict[str, Any]) -> None:
    """One trial: the Trainer on this trial's recipe, reporting every epoch. In this process with a
    Tune checkpoint per epoch, or (`scaling.num_workers > 0`) on a Ray Train run launched from here
    whose rank-0 reports reach Tune through `TrialReportCallback`."""
    search = search_from_manifest(manifest)
    trial_folder = search_file.trial_dirname(tune.get_context().get_trial_id())
    if search.trial_config(params).scaling.num_workers > 0:  # the trial's own recipe (a variant's)
        run_train_trial(search, params, trial_folder)
        return
    config = search.trial_config(params, run_storage=search.experiment, run_name=trial_folder)
    if not config.run.threads:  # Ray sets OMP_NUM_THREADS; torch's own default ignores the trial's CPUs
        torch.set_num_threads(max(1, int(search.config.resources_per_trial.cpu)))
    reporter = TuneReporter()
    trainer = Trainer(config, report=reporter, save_checkpoints=False)
    reporter.trainer = trainer
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            uri = checkpoint.latest(folder)
            if uri is None:
                raise FileNotFoundError(f"{folder}: no checkpoints/epoch-NNNN.pt in the Tune checkpoint")
            trainer.load_state(checkpoint.load(uri, map_location="cpu"))
    trainer.fit()


TRAIN_RUN_NAME = report.TRAIN_RUN
"""The Ray Train run of a trial with workers: `<experiment>/trial_<id>/train/`, named after the
trial (no timestamp), so a restored trial's TorchTrainer continues that run from its checkpoint."""


def run_train_trial(search: Search, params: dict[str, Any], trial_folder: str) -> None:
    """The trial on Ray Train: `ray_train.build_trainer` with the trial's run folder, plus the
    callback that forwards rank 0's epochs to Tune. Train owns the checkpoints (Tune gets the
    checkpoint path as a metric); a re-run of the same trial resumes the Train run by its name."""
    config = search.trial_config(params, run_storage=storage.join(search.experiment, trial_folder),
                                 run_name=TRAIN_RUN_NAME)
    trainer = ray_train.build_trainer(config)
    trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []),
                                    TrialReportCallback(ray_train.run_folder(config))]
    trainer.fit()


class TrialReportCallback(TuneReportCallback):
    """TuneReportCallback with the trial metrics of the one-process path: built from the rank-0
    Trainer's metrics.jsonl (written before each report) up to the reported epoch, so the objective
    is the same best-so-far figure and survives a restart of the Train run."""

    def __init__(self, run_folder: str) -> None:
        super().__init__()
        self.run_folder = run_folder

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        epoch = int(metrics[0]["epoch"])
        text = storage.read_text(storage.join(self.run_folder, METRICS_LINES))
        history = [record for record in (json.loads(line) for line in text.splitlines() if line.strip())
                   if int(record["epoch"]) <= epoch]
        forwarded: dict[str, Any] = dict(trial_metrics(history))
        if checkpoint:
            forwarded[CHECKPOINT_PATH_KEY] = checkpoint_uri(checkpoint)
        self._training_actor_item_queue.put(forwarded)


REMOTE_SCHEMES = {"s3": "s3", "gcs": "gs"}
"""pyarrow filesystem type -> the URI scheme `storage` opens."""


def checkpoint_uri(checkpoint: Any) -> str:
    """A Ray checkpoint's location as a URI `storage` opens: Ray gives the path inside its
    filesystem, which for S3 or GCS lacks the scheme (`bucket/...`), and read as a local path it
    would find nothing (the report and the temporal refine would miss the trial's checkpoints)."""
    scheme = REMOTE_SCHEMES.get(checkpoint.filesystem.type_name)
    path = checkpoint.path
    return f"{scheme}://{path}" if scheme and "://" not in path else path


class TuneReporter:
    """The Trainer's per-epoch `report`: the flat trial metrics and the full state as a Tune
    checkpoint (`checkpoints/epoch-NNNN.pt`, the single-process layout)."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None

    def __call__(self, record: dict[str, Any], saved: str | None) -> None:
        assert self.trainer is not None, "TuneReporter.trainer is set before fit()"
        metrics = trial_metrics(self.trainer.history)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint.save(folder, record["epoch"], self.trainer.state(), keep=0)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def search_from_manifest(manifest: dict[str, Any]) -> Search:
    return search_file.load_search(mapping=manifest)


# ------------------------------------------------------------------------------ the driver side

def param_space(search: Search) -> dict[str, Any]:
    """Tune domains by searched variable name (one_minus_loguniform samples 1 - x)."""
    return {entry.name: domain(entry, entry.key in search.integer_keys) for entry in search.config.space}


def domain(entry: SearchEntry, integer: bool) -> Any:
    kind = entry.distribution
    if kind == "choice":
        return tune.choice(list(entry.values or []))
    if kind == "grid":
        return tune.grid_search(list(entry.values or []))
    low, high = entry.sampled_bounds()
    if integer:  # randint's upper bound is exclusive
        return tune.randint(int(low), int(high) + 1) if kind == "uniform" else \
            tune.lograndint(int(low), int(high) + 1)
    if kind == "uniform":
        return tune.uniform(low, high)
    return tune.loguniform(low, high)


def searcher(search: Search) -> Any:
    config = search.config
    if config.searcher == "optuna":
        with warnings.catch_warnings():  # both options are marked experimental in Optuna 4
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=config.seed)
        return OptunaSearch(sampler=sampler)
    return BasicVariantGenerator(random_state=config.seed)


def scheduler(search: Search) -> Any:
    if search.config.scheduler.name == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr=TIME_ATTRIBUTE, max_t=search.config.epochs,
                         grace_period=search.grace_period,
                         reduction_factor=search.config.scheduler.reduction_factor)


def _trial_name(trial: Any) -> str:
    return search_file.trial_dirname(trial.trial_id)


def trainable(search: Search) -> Any:
    """The trial function with its resources: all of the trial's in one process; with Ray Train
    workers only the launching function's (the workers reserve theirs through Train)."""
    resources = search.config.resources_per_trial
    wanted = {"CPU": resources.cpu}
    if resources.gpu:
        wanted["GPU"] = resources.gpu
    return tune.with_resources(tune.with_parameters(run_trial, manifest=search.manifest()), wanted)


def write_manifest(search: Search) -> None:
    """`<experiment>/search.yaml`; a re-run must be the same search (else it would resume another)."""
    uri = storage.join(search.experiment, MANIFEST)
    text = search_file.dump_yaml(search.manifest())
    if storage.exists(uri):
        if storage.read_text(uri) != text:
            raise ConfigError(f"name: {search.experiment} holds another search ({MANIFEST} differs); "
                              "choose a new name, or re-run the original command to resume it")
        return
    storage.write_bytes_atomic(uri, text.encode())


def build_tuner(search: Search) -> tuple[tune.Tuner, bool]:
    """A new Tuner, or the experiment's own restored one. Returns (tuner, restored)."""
    experiment = search.experiment
    write_manifest(search)
    trainable_fn = trainable(search)
    if tune.Tuner.can_restore(experiment):
        return tune.Tuner.restore(experiment, trainable=trainable_fn, resume_errored=True), True
    config = search.config
    tune_config = tune.TuneConfig(
        metric=config.objective.metric, mode=config.objective.mode,
        search_alg=searcher(search), scheduler=scheduler(search),
        num_samples=1 if config.searcher == "grid" else config.trials,
        max_concurrent_trials=config.concurrency,
        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name)
    run_config = tune.RunConfig(
        name=config.name, storage_path=config.storage,
        # Kept: the best epochs by the selection half's macro-F1 (Tune keeps the newest as well, for
        # resume), so the epoch a table or report scores still has its model.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=config.checkpoints_to_keep,
                                                checkpoint_score_attribute=SELECTION_SCORE,
                                                checkpoint_score_order="max"),
        verbose=1)
    return tune.Tuner(trainable_fn, param_space=param_space(search), tune_config=tune_config,
                      run_config=run_config), False


def run_search(search: Search) -> tune.ResultGrid:
    """Run (or resume) the search; returns Tune's ResultGrid."""
    if not ray.is_initialized():
        ensure_ray(dashboard=True)
    tuner, restored = build_tuner(search)
    if restored:
        print(f"[tune] restoring {search.experiment}", flush=True)
    return tuner.fit()


# ------------------------------------------------------------------------------ temporal rows

def run_refined_rows(search: Search, table: Any, temporal_recipes: dict[str, dict[str, Any]],
                     shards_root: str | None = None) -> list[Any]:
    """The ablation's temporal rows after its grid (`refine.plan_refined_rows`), one run after
    another on this Ray; returns the runs, a failed one with its `error` (also in its error.txt)."""
    from pipeline.temporal.ray_train import extract_and_fit
    from pipeline.tuning import refine

    if not ray.is_initialized():
        ensure_ray(dashboard=True)
    done = []
    for run in refine.plan_refined_rows(search, table, temporal_recipes, shards_root):
        if run.error:
            print(f"[ablate] {run.row}: trial {run.trial_id} not refined: {run.error}", flush=True)
            done.append(refine.record_error(run, run.error))
            continue
        print(f"[ablate] {run.row}: trial {run.trial_id} (seed {run.seed}), frame model of epoch "
              f"{run.frame_epoch}", flush=True)
        try:
            refine.record_start(run)
            extract_and_fit(run.config)
            done.append(run)
        except Exception as error:  # one trial's failure must not lose the other rows' table
            print(f"[ablate] {run.row}: trial {run.trial_id} failed: {error}", flush=True)
            done.append(refine.record_error(run, error))
    return done
