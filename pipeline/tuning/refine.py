"""The ablation's temporal rows (ABAW6 "+ temporal"), planned after the grid: for every finished
trial of the row a temporal row refines, a temporal-stage config on that trial's checkpoint of the
epoch the table scores (best selection half), under `<experiment>/refine/<row>/<trial>/`.
`ray_tune.run_refined_rows` runs them (`pipeline.temporal.ray_train.extract_and_fit`: the frozen
frame model's features through Ray Data, then the Transformer encoder). A run that exists is
resumed (features kept, encoder continued), so re-running `jobs.ablate` is safe; a trial that
fails is recorded in its folder's error.txt, not fatal. No Ray here.
"""

from __future__ import annotations

import copy
import dataclasses
import traceback
from dataclasses import dataclass
from typing import Any

from pipeline.data import schema, storage
from pipeline.training import checkpoint
from pipeline.tuning import ablation, report
from pipeline.tuning.search import Search, set_path

ERROR_FILE = "error.txt"
FRAME_MODEL_FILE = "frame_model.json"
"""In a temporal run's folder: the trial, epoch and checkpoint file its frame model came from."""


def epoch_checkpoint(trial: dict[str, Any], epoch: int) -> str | None:
    """The trial's checkpoint file of `epoch` among those Tune kept (its `checkpoint_*` folders, or
    the Train run's reported checkpoint paths); None when that epoch's was not kept."""
    folder = trial["folder"]
    candidates = [storage.join(folder, name) for name in sorted(storage.list_dir(folder))
                  if name.startswith("checkpoint_")]
    candidates += [result["checkpoint_path"] for result in trial["results"] if result.get("checkpoint_path")]
    for candidate in candidates:
        if epoch in checkpoint.list_checkpoints(candidate):
            return storage.join(candidate, checkpoint.CHECKPOINT_FOLDER, checkpoint.checkpoint_name(epoch))
    return None


def frame_model(trial: dict[str, Any], chosen: dict[str, Any]) -> tuple[int, str]:
    """(epoch, checkpoint file) of the model a temporal row refines: the chosen epoch's. Tune keeps
    the best checkpoints by the same selection score but, among equal scores, the later epoch,
    while the table takes the first: a kept epoch of equal score is the same choice."""
    score = ablation.selection_macro_f1(chosen)
    tied = [record for record in trial["history"] if ablation.selection_macro_f1(record) == score]
    for record in sorted(tied, key=lambda record: (record is not chosen, -int(record["epoch"]))):
        found = epoch_checkpoint(trial, int(record["epoch"]))
        if found:
            return int(record["epoch"]), found
    raise FileNotFoundError(f"trial {trial['trial_id']}: the checkpoint of its chosen epoch {chosen['epoch']} "
                            "was not kept (raise checkpoints_to_keep)")


def shards_folder(split: str, shards_root: str | None) -> str:
    """The Aff-Wild2 shard folder: under `shards_root`, else under the root the split records."""
    if shards_root is None:
        from pipeline.data.split import load_split

        shards_root = load_split(split).shards_root
    return storage.join(shards_root, schema.AFFWILD2)


@dataclass(frozen=True)
class RefineRun:
    """One temporal row's run on one trial: its config, or why it cannot run."""

    row: str
    trial_id: str
    seed: Any
    folder: str
    config: Any = None
    """The run's `TemporalJobConfig` (None when `error` says why there is none)."""
    frame_epoch: int | None = None
    error: str | None = None


def plan_refined_rows(search: Search, table: ablation.Paper, temporal_recipes: dict[str, dict[str, Any]],
                      shards_root: str | None = None) -> list[RefineRun]:
    """Every temporal row of `table` on every trial of the row it refines, read from the
    experiment folder. `temporal_recipes[row]` is the row's temporal recipe mapping (the user's
    keys already set); each run's frame checkpoint, shards, folder, halves seed and window are set
    here. A trial that did not finish, or whose scored checkpoint is gone, gets an error instead."""
    from pipeline.temporal.training import load_temporal_config

    experiment = search.experiment
    trials = report.read_trials(experiment, search)
    runs = []
    for row in table.refined():
        postprocess = [other for other in table.rows if other.postprocess_of == row.name]
        for trial in trials:
            if trial["params"].get(ablation.VARIANT) != row.refines:
                continue
            folder = ablation.refined_uri(experiment, row.name, trial["trial_id"])
            seed = trial["params"].get(ablation.SEED_KEY)
            try:
                chosen = ablation.chosen_record(trial["history"])
                if trial["status"] != "TERMINATED" or chosen is None:
                    raise RuntimeError(f"trial {trial['trial_id']} ({trial['status']}) has no finished, "
                                       "validated training to refine")
                frame_epoch, frame_checkpoint = frame_model(trial, chosen)
                trial_config = search.trial_config(trial["params"])
                mapping = copy.deepcopy(temporal_recipes[row.name])
                set_path(mapping, ["frame_checkpoint"], frame_checkpoint)
                set_path(mapping, ["shards"], shards_folder(trial_config.data.split, shards_root))
                set_path(mapping, ["run", "storage"], storage.join(experiment, ablation.REFINE, row.name))
                set_path(mapping, ["run", "name"], trial["trial_id"])
                set_path(mapping, ["evaluation", "halves_seed"], trial_config.evaluation.halves_seed)
                if postprocess:
                    set_path(mapping, ["evaluation", "window"], int(postprocess[0].window))
                runs.append(RefineRun(row.name, trial["trial_id"], seed, folder,
                                      load_temporal_config(base=mapping), frame_epoch))
            except Exception as error:  # recorded per trial: the other trials' runs still go ahead
                runs.append(RefineRun(row.name, trial["trial_id"], seed, folder, error=describe(error)))
    return runs


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def record_start(run: RefineRun) -> None:
    """`frame_model.json` (which checkpoint the run refines); clears an earlier failure's file."""
    storage.write_json_atomic(storage.join(run.folder, FRAME_MODEL_FILE), {
        "trial_id": run.trial_id, "epoch": run.frame_epoch, "checkpoint": run.config.frame_checkpoint})
    if storage.exists(storage.join(run.folder, ERROR_FILE)):
        storage.remove(storage.join(run.folder, ERROR_FILE))


def record_error(run: RefineRun, error: BaseException | str) -> RefineRun:
    text = error if isinstance(error, str) else "".join(traceback.format_exception(error))
    storage.write_bytes_atomic(storage.join(run.folder, ERROR_FILE), text.encode())
    return dataclasses.replace(run, error=error if isinstance(error, str) else describe(error))
