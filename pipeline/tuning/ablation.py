"""The papers' tables as grids of Tune trials (`jobs.ablate`), and the tables written from the
experiment folder. Pure Python: the trials run through `ray_tune.run_search` like any search (a
`variant` grid over the table's trained rows x a `run.seed` grid), and the table is read back from
the trials' metrics.jsonl without Ray.

Each row is scored on the **report half** of the validation videos at the epoch its trial chose on
the selection half (its best selection macro-F1), as mean ± the 95% Student-t interval over seeds,
beside the macro-F1 its paper reports. A post-processing row trains nothing: it is the smoothed
report-half macro-F1 (sliding-window vote, the row's window) of the *same trials* and epochs as the
row it post-processes (the Trainer scores every validation window of the recipe each epoch).

A temporal row (ABAW6's "+ temporal") trains a Transformer encoder over the frozen features of each
trial of the row it refines, from that trial's checkpoint of its chosen epoch, after the grid
(`pipeline.tuning.refine`, one run per trial under `<experiment>/refine/<row>/<trial>/`); its epoch
is chosen on the selection half too, and a post-processing row of it smooths those same runs.

Papers: ABAW5 (SSL with the Dynamic Threshold Module, 5th ABAW competition), ABAW6 (debiased
teacher/student with feedback and temporal refinement, 6th ABAW competition), and the third paper
(VGG baseline, supervised ResNet-18, MutexMatch, noise-aware model). Reported numbers are the papers'
validation macro-F1 (%).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.data import schema, storage
from pipeline.tuning.search import VARIANT

FER_SOURCES = [source for source in schema.SOURCES if source != schema.MS1MV2]
ALL_SOURCES = list(schema.SOURCES)
SEED_KEY = "run.seed"
TABLE = "ablation"
"""`<experiment>/ablation.md` and `ablation.csv`."""
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Row:
    name: str
    """The row's id (the trial's `variant` for a trained row)."""
    label: str
    reported: str
    """The paper's validation macro-F1 (%) for this row, as printed."""
    recipe: str | None = None
    """Recipe file stem under jobs/recipes (`demo_` prefixed at demo scale); None: not trained."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Recipe keys (dotted) set for this row."""
    postprocess_of: str | None = None
    """A post-processing row: the row whose trials it smooths (no training of its own)."""
    window: int | None = None
    """The post-processing window (must be in that row's evaluation.windows)."""
    not_run: str | None = None
    """Why jobs.ablate does not run this row (shown in the table)."""
    refines: str | None = None
    """A temporal row: the trained row whose models' features it learns from; `recipe` is then a
    temporal recipe (jobs.train_temporal's)."""
    demo_recipe: str | None = None
    """The recipe stem at demo scale when it is not `demo_<recipe>`."""


@dataclass(frozen=True)
class Paper:
    name: str
    title: str
    rows: tuple[Row, ...]

    def trained(self) -> list[Row]:
        """The rows trained as Tune trials of the grid."""
        return [row for row in self.rows
                if row.recipe and not row.not_run and not row.postprocess_of and not row.refines]

    def refined(self) -> list[Row]:
        """The temporal rows, run after the grid on the trials of the rows they refine."""
        return [row for row in self.rows if row.refines and not row.not_run]

    def row(self, name: str) -> Row:
        return next(row for row in self.rows if row.name == name)

    def only(self, names: list[str]) -> Paper:
        """The table restricted to `names` (in the table's order); a post-processing or temporal
        row needs the row it builds on."""
        known = [row.name for row in self.rows]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"--rows: {', '.join(unknown)} not in the {self.name} table ({', '.join(known)})")
        chosen = [row for row in self.rows if row.name in names]
        for row in chosen:
            needed = row.postprocess_of or row.refines
            if needed and needed not in names:
                raise ValueError(f"--rows: {row.name} builds on {needed}; add it")
        return Paper(self.name, self.title, tuple(chosen))


BASELINE = Row("baseline", "baseline (organisers' VGG, frozen convolutions)", "23.00", "seed002_vgg_baseline")

PAPERS: dict[str, Paper] = {
    "abaw5": Paper("abaw5", "ABAW5: SSL with the Dynamic Threshold Module", (
        BASELINE,
        Row("ssl_dtm_fer", "SSL + DTM, FER data in the unlabeled pool", "35.81", "abaw5_dtm",
            {"data.unlabeled_sources": FER_SOURCES}),
        Row("ssl_dtm_ms1mv2", "+ MS1MV2 in the unlabeled pool", "39.03", "abaw5_dtm",
            {"data.unlabeled_sources": ALL_SOURCES}),
        Row("postprocess", "+ post-processing (window 10)", "40.05", postprocess_of="ssl_dtm_ms1mv2", window=10),
    )),
    "abaw6": Paper("abaw6", "ABAW6: debiased teacher/student with feedback, temporal refinement", (
        BASELINE,
        Row("feedback", "teacher/student with feedback", "39.96 / 40.57", "abaw6_feedback"),
        Row("temporal", "+ temporal refinement (Transformer over the feedback models' features)", "42.77",
            recipe="abaw6_temporal", demo_recipe="temporal", refines="feedback"),
        Row("postprocess", "+ post-processing (window 30, after the temporal encoder)", "44.43",
            postprocess_of="temporal", window=30),
    )),
    "seed002": Paper("seed002", "Third paper: supervised, MutexMatch and noise-aware models", (
        BASELINE,
        Row("supervised", "fully supervised ResNet-18", "32.34", "seed002_supervised"),
        Row("mutexmatch", "SSL with complementary labels (MutexMatch)", "32.82", "seed002_mutexmatch"),
        Row("noise_aware", "noise-aware model", "33.46", "seed002_noise_aware"),
    )),
}


def paper(name: str) -> Paper:
    if name not in PAPERS:
        raise KeyError(f"--paper: one of {sorted(PAPERS)}, got {name!r}")
    return PAPERS[name]


# ------------------------------------------------------------------------------ the grid

def row_recipe(row: Row, recipe: dict[str, Any], split: str, overrides: list[tuple[list[str], Any]]) -> dict[str, Any]:
    """A trained row's recipe mapping: the recipe file's, the row's keys, the split, then the user's
    `--set` keys (applied to every row)."""
    from pipeline.tuning.search import set_path

    mapping = yaml.safe_load(yaml.safe_dump(recipe))  # a deep copy
    for key, value in row.overrides.items():
        set_path(mapping, key.split("."), value)
    set_path(mapping, ["data", "split"], split)
    for keys, value in overrides:
        set_path(mapping, keys, value)
    mapping.setdefault("run", {})["name"] = row.name
    return mapping


def search_mapping(table: Paper, recipes: dict[str, dict[str, Any]], *, split: str, seeds: int,
                   name: str, storage_path: str, epochs: int, concurrency: int = 1, cpu: float = 1.0,
                   gpu: float = 0.0, overrides: list[tuple[list[str], Any]] | None = None) -> dict[str, Any]:
    """The search file of a table: a grid over its trained rows x `seeds` seeds (every trial runs
    all `epochs`, FIFO), `recipes` giving each row's recipe mapping by its recipe stem."""
    if seeds < 1:
        raise ValueError("--seeds: at least 1")
    variants = {row.name: row_recipe(row, recipes[row.recipe], split, overrides or [])
                for row in table.trained()}
    for row in table.rows:
        if row.postprocess_of and row.postprocess_of in variants:
            windows = (variants[row.postprocess_of].get("evaluation") or {}).get("windows") or []
            if row.window not in [int(window) for window in windows]:
                variants[row.postprocess_of].setdefault("evaluation", {})["windows"] = \
                    sorted({int(window) for window in windows} | {int(row.window)})
    first = next(iter(variants.values()))
    return {
        "base": first, "variants": variants, "name": name, "storage": storage_path,
        "trials": len(variants) * seeds, "epochs": epochs, "concurrency": concurrency,
        "resources_per_trial": {"cpu": cpu, "gpu": gpu}, "searcher": "grid", "seed": 0,
        "scheduler": {"name": "fifo"},
        "space": [{"key": VARIANT, "distribution": "grid", "values": list(variants)},
                  {"key": SEED_KEY, "distribution": "grid", "values": list(range(seeds))}],
    }


# ------------------------------------------------------------------------------ the table

def selection_macro_f1(record: dict[str, Any]) -> float | None:
    """An epoch record's selection-half macro-F1 (None when the epoch was not validated)."""
    half = ((record.get("validation") or {}).get("halves") or {}).get("selection")
    return float(half["macro_f1"]) if half else None


def chosen_record(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The epoch record with the best selection-half macro-F1 (the first of equals)."""
    scored = [record for record in history if selection_macro_f1(record) is not None]
    if not scored:
        return None
    return max(scored, key=selection_macro_f1)


def report_half(record: dict[str, Any], window: int | None = None) -> float | None:
    half = record["validation"]["halves"].get("report") or {}
    if not half.get("frames"):
        return None  # an empty report half (a split with one validation video) scores nothing
    if window is None:
        return half.get("macro_f1")
    return (half.get("smoothed") or {}).get(str(window))


def interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float | None]:
    """(mean, half-width of the Student-t interval); half-width None for fewer than 2 values."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    from scipy import stats

    spread = statistics.stdev(values) / math.sqrt(len(values))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1)) * spread


REFINE = "refine"
"""`<experiment>/refine/<row>/<trial>/`: a temporal row's run on one trial's frame model."""
REFINED_SCORE = "temporal"
"""The temporal run's figure a refined row reports (`+smoothing` for its post-processing row)."""


def chosen_refined(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The temporal run's epoch with the best selection-half macro-F1 of the encoder (the first of
    equals); None before any epoch with halves."""
    scored = [record for record in history if (record.get("halves") or {}).get("selection")]
    if not scored:
        return None
    return max(scored, key=lambda record: float(record["halves"]["selection"][REFINED_SCORE]))


def refined_report_half(record: dict[str, Any], smoothed: bool) -> float | None:
    half = record["halves"].get("report") or {}
    if not half.get("scored_frames"):
        return None
    return half.get(REFINED_SCORE + ("+smoothing" if smoothed else ""))


def refined_uri(experiment: str, row: str, trial_id: str) -> str:
    return storage.join(experiment, REFINE, row, trial_id)


def table_rows(table: Paper, trials: list[dict[str, Any]],
               refined: dict[tuple[str, str], list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """One dict per table row from the experiment's trials (report.read_trials) and the temporal
    rows' runs (`refined[(row, trial_id)]`: the run's metrics.jsonl records)."""
    refined = refined or {}
    by_row: dict[str, list[dict[str, Any]]] = {}
    for trial in trials:
        variant = trial["params"].get(VARIANT)
        if variant is not None:
            by_row.setdefault(variant, []).append(trial)
    rows = []
    for row in table.rows:
        source = row.postprocess_of or row.name  # the row whose models are scored
        temporal = table.row(source) if table.row(source).refines else None
        trained_source = temporal.refines if temporal else source
        scores, seeds, models, epochs = [], [], [], []
        if not row.not_run:
            for trial in sorted(by_row.get(trained_source, []), key=lambda trial: trial["params"].get(SEED_KEY, 0)):
                if temporal:
                    record = chosen_refined(refined.get((temporal.name, trial["trial_id"]), []))
                    value = refined_report_half(record, smoothed=bool(row.postprocess_of)) if record else None
                else:
                    record = chosen_record(trial["history"])
                    value = report_half(record, row.window if row.postprocess_of else None) if record else None
                if value is None:
                    continue
                scores.append(100.0 * float(value))
                seeds.append(trial["params"].get(SEED_KEY))
                models.append(trial["trial_id"])
                epochs.append(int(record["epoch"]))
        mean, half_width = interval(scores) if scores else (None, None)
        note = row.not_run or ""
        if row.refines:
            note = (f"a temporal encoder on each {row.refines} trial's frame features "
                    f"({REFINE}/{row.name}/<trial>; epochs are the encoder's)")
        if row.postprocess_of:
            note = f"the {row.postprocess_of} row's models, smoothed (no training)"
        if not row.not_run and not scores and by_row.get(trained_source):
            note = (note + "; " if note else "") + "no report-half score (empty report half, no validated " \
                "epoch, or no temporal run)"
        rows.append({"row": row.name, "label": row.label, "paper_macro_f1": row.reported,
                     "mean_macro_f1": mean, "ci95_half_width": half_width, "n_seeds": len(scores),
                     "seeds": seeds, "scores": scores, "trials": models, "epochs": epochs,
                     "trained": bool(row.recipe) and not row.not_run and not row.postprocess_of,
                     "note": note})
    return rows


def _shown(row: dict[str, Any]) -> str:
    if row["mean_macro_f1"] is None:
        return "—"
    if row["ci95_half_width"] is None:
        return f"{row['mean_macro_f1']:.2f}"
    return f"{row['mean_macro_f1']:.2f} ± {row['ci95_half_width']:.2f}"


def render_markdown(table: Paper, rows: list[dict[str, Any]], experiment: str) -> str:
    lines = [f"# {table.title}", "",
             f"Experiment: `{experiment}`. Validation macro-F1 (%) on the **report half** of the "
             f"validation videos, at each trial's best selection-half epoch; mean ± {int(CONFIDENCE * 100)}% "
             "Student-t interval over seeds. Paper: the macro-F1 the paper reports (its own validation "
             "set and budget; the figures here follow the recipe and split this run used).", "",
             "| row | paper | this run | seeds | trials | note |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | {row['paper_macro_f1']} | {_shown(row)} | {row['n_seeds']} | "
                     f"{', '.join(row['trials'])} | {row['note']} |")
    return "\n".join(lines) + "\n"


def render_csv(rows: list[dict[str, Any]]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    columns = ["row", "label", "paper_macro_f1", "mean_macro_f1", "ci95_half_width", "n_seeds", "seeds",
               "scores", "trials", "epochs", "trained", "note"]
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: (";".join(str(value) for value in row[key]) if isinstance(row[key], list)
                               else row[key]) for key in columns})
    return buffer.getvalue()


def read_refined(experiment: str, table: Paper, trials: list[dict[str, Any]]
                 ) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The temporal rows' per-epoch records by (row, trial id), for the runs that exist."""
    from pipeline.temporal.training import METRICS_LINES

    found = {}
    for row in table.refined():
        for trial in trials:
            uri = storage.join(refined_uri(experiment, row.name, trial["trial_id"]), METRICS_LINES)
            if storage.exists(uri):
                found[(row.name, trial["trial_id"])] = [json.loads(line) for line in
                                                        storage.read_text(uri).splitlines() if line.strip()]
    return found


def write_table(experiment: str, table: Paper) -> dict[str, Any]:
    """`<experiment>/ablation.md` and `.csv` from the experiment folder (local or s3://)."""
    from pipeline.tuning import report

    experiment = storage.absolute(experiment) if not storage.is_remote(experiment) else experiment
    search = report.read_search(experiment)
    trials = report.read_trials(experiment, search)
    rows = table_rows(table, trials, read_refined(experiment, table, trials))
    storage.write_bytes_atomic(storage.join(experiment, f"{TABLE}.md"),
                               render_markdown(table, rows, experiment).encode())
    storage.write_bytes_atomic(storage.join(experiment, f"{TABLE}.csv"), render_csv(rows).encode())
    return {"experiment": experiment, "table": storage.join(experiment, f"{TABLE}.md"),
            "csv": storage.join(experiment, f"{TABLE}.csv"), "rows": rows}
