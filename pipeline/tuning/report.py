"""The report of a search, written from the experiment folder alone (local or s3://), without Ray:
`<experiment>/report/` with

- report.html: one self-contained file (plotly's JS inline, no network): the summary, the best
  trial's parameters and report-half figure, the trial table, and Optuna's optimisation history,
  parallel coordinates, parameter importances (with the trial count) and slice plots over a study
  rebuilt from the trials, the learning curves of the best trials, and the best trial's per-class
  F1 and confusion matrix;
- optimisation_history.png, learning_curves.png, confusion.png (matplotlib, no browser);
- trials.parquet and trials.csv: one row per trial (status, objective, params, recipe values,
  last-epoch metrics, checkpoint path);
- best_config.yaml: the best trial's recipe, which `jobs.train --config` accepts as it is.

Read per trial: `trial_<id>/params.json`, `result.json` (one line per epoch, written by Tune),
`metrics.jsonl` (the Trainer's full epoch records; `train/metrics.jsonl` for a trial with Ray Train
workers) and `checkpoint_*/` (or the reported `checkpoint_path`); statuses from Tune's
newest `experiment_state-*.json` when there is one.
"""

from __future__ import annotations

import html
import io
import json
import math
import warnings
from typing import Any

import pandas as pd
import yaml

from pipeline.data import schema, storage
from pipeline.training.config import load_config
from pipeline.tuning.metrics import selection_figures, trial_metrics
from pipeline.tuning.search import MANIFEST, Search, SearchEntry, dump_yaml, load_search

REPORT_FOLDER = "report"
TRIAL_PREFIX = "trial_"
TRAIN_RUN = "train"
"""A trial's Ray Train run folder (`ray_tune.TRAIN_RUN_NAME`) when it has workers."""
TOP_TRIALS = 5
"""Trials drawn in the learning-curve plot."""


# ------------------------------------------------------------------------------ reading trials

def read_search(experiment: str) -> Search:
    return load_search(mapping=yaml.safe_load(storage.read_text(storage.join(experiment, MANIFEST))))


def tune_statuses(experiment: str) -> dict[str, str]:
    """trial id -> Tune status from the newest experiment_state-*.json ({} when unreadable)."""
    names = sorted(name for name in storage.list_dir(experiment)
                   if name.startswith("experiment_state-") and name.endswith(".json"))
    if not names:
        return {}
    try:
        state = json.loads(storage.read_text(storage.join(experiment, names[-1])))
        statuses = {}
        for trial_json, _ in state.get("trial_data", []):
            trial = json.loads(trial_json)
            statuses[str(trial["trial_id"])] = str(trial["status"])
        return statuses
    except (ValueError, KeyError, TypeError):
        return {}


def read_trials(experiment: str, search: Search) -> list[dict[str, Any]]:
    """One dict per trial folder: id, folder, params, results (Tune's per-epoch lines), history
    (the Trainer's records), status, checkpoint."""
    statuses = tune_statuses(experiment)
    trials = []
    for name in sorted(storage.list_dir(experiment)):
        folder = storage.join(experiment, name)
        if not name.startswith(TRIAL_PREFIX) or not storage.is_dir(folder):
            continue
        trial_id = name[len(TRIAL_PREFIX):]
        params_uri = storage.join(folder, "params.json")
        params = json.loads(storage.read_text(params_uri)) if storage.exists(params_uri) else {}
        reported = _json_lines(storage.join(folder, "result.json"))
        # One process: the Trainer's files are the trial folder's; with Ray Train workers they are
        # the trial's Train run's (`train/`), whose checkpoints Tune knows by path only.
        history = _json_lines(storage.join(folder, "metrics.jsonl")) or \
            _json_lines(storage.join(folder, TRAIN_RUN, "metrics.jsonl"))
        results = per_epoch_results(history, reported)
        checkpoints = [storage.join(folder, entry) for entry in sorted(storage.list_dir(folder))
                       if entry.startswith("checkpoint_")]
        checkpoints += [result["checkpoint_path"] for result in results if result.get("checkpoint_path")]
        status = statuses.get(trial_id)
        if status is None:
            status = "ERROR" if storage.exists(storage.join(folder, "error.txt")) else "UNKNOWN"
        trials.append({"trial_id": trial_id, "folder": folder, "params": params, "results": results,
                       "history": history, "status": status,
                       "checkpoint": checkpoints[-1] if checkpoints else None})
    return trials


def per_epoch_results(history: list[dict[str, Any]], reported: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trial's metrics per epoch, rebuilt from the Trainer's records (complete) with Tune's
    reported line of each epoch laid over them (checkpoint path, timings) where there is one.
    Tune's result.json alone can miss epochs: a trial with Ray Train workers gives Tune no
    checkpoint, so after a restore Tune starts its lines again at the epoch the Train run resumed."""
    by_epoch = {int(line["epoch"]): line for line in reported if "epoch" in line}
    rebuilt = [{**trial_metrics(history[:index + 1]), **by_epoch.get(int(record["epoch"]), {})}
               for index, record in enumerate(history)]
    return rebuilt or reported


def _json_lines(uri: str) -> list[dict[str, Any]]:
    if not storage.exists(uri):
        return []
    lines = []
    for line in storage.read_text(uri).splitlines():
        line = line.strip()
        if line:
            try:
                lines.append(json.loads(line))
            except ValueError:  # a line caught mid-write
                continue
    return lines


def objective_of(trial: dict[str, Any], metric: str) -> float | None:
    values = [result[metric] for result in trial["results"] if result.get(metric) is not None]
    return max(values) if values else None


def trials_table(trials: list[dict[str, Any]], search: Search) -> pd.DataFrame:
    """One row per trial: the columns of trials.parquet."""
    metric = search.config.objective.metric
    rows = []
    for trial in trials:
        results = trial["results"]
        last = results[-1] if results else {}
        objective = objective_of(trial, metric)
        best = max(results, key=lambda result: result.get("selection_macro_f1", -math.inf)) if results else {}
        epochs = int(last.get("epoch", 0))
        row: dict[str, Any] = {
            "trial_id": trial["trial_id"],
            "status": trial["status"],
            "epochs": epochs,
            "stopped_early": bool(results) and trial["status"] == "TERMINATED" and epochs < search.config.epochs,
            "objective": objective,
            "best_epoch": best.get("epoch"),
        }
        for entry in search.config.space:
            row[f"param.{entry.name}"] = trial["params"].get(entry.name)
        for key, value in search.recipe_values(trial["params"]).items():
            row[f"config.{key}"] = value
        for name in ("selection_macro_f1", "loss", "labeled_loss", "unlabeled_loss",
                     "pseudo_label_acceptance_rate", "pseudo_label_accuracy"):
            row[f"last.{name}"] = last.get(name)
        row["checkpoint"] = trial["checkpoint"]
        row["folder"] = trial["folder"]
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame = frame.sort_values("objective", ascending=False, na_position="last", kind="stable")
    return frame.reset_index(drop=True)


# ------------------------------------------------------------------------------ the rebuilt study

def _categorical_value(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def optuna_distribution(entry: SearchEntry, integer: bool) -> Any:
    import optuna

    if entry.distribution in ("choice", "grid"):
        return optuna.distributions.CategoricalDistribution(
            [_categorical_value(value) for value in entry.values or []])
    low, high = entry.sampled_bounds()
    log = entry.distribution != "uniform"
    if integer:
        return optuna.distributions.IntDistribution(int(low), int(high), log=log)
    return optuna.distributions.FloatDistribution(low, high, log=log)


def rebuild_study(trials: list[dict[str, Any]], search: Search) -> Any:
    """An in-memory Optuna study with one trial per Tune trial: params on the searched scale,
    value = the objective (best so far, as OptunaSearch records an ASHA-stopped trial), intermediate
    values per epoch. Trials without any report are FAIL."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metric = search.config.objective.metric
    study = optuna.create_study(direction="maximize", study_name=search.config.name)
    distributions = {entry.name: optuna_distribution(entry, entry.key in search.integer_keys)
                     for entry in search.config.space}
    built = []
    for trial in trials:
        if any(name not in trial["params"] for name in distributions):
            continue
        params = {}
        for name, distribution in distributions.items():
            value = trial["params"][name]
            if isinstance(distribution, optuna.distributions.CategoricalDistribution):
                value = _categorical_value(value)
            elif isinstance(distribution, optuna.distributions.IntDistribution):
                value = min(max(int(round(value)), distribution.low), distribution.high)
            else:
                value = min(max(float(value), distribution.low), distribution.high)
            params[name] = value
        objective = objective_of(trial, metric)
        intermediate = {int(result["epoch"]): float(result[metric]) for result in trial["results"]
                        if result.get(metric) is not None and "epoch" in result}
        state = optuna.trial.TrialState.COMPLETE if objective is not None else optuna.trial.TrialState.FAIL
        built.append(optuna.trial.create_trial(
            params=params, distributions=distributions, value=objective, state=state,
            intermediate_values=intermediate, user_attrs={"tune_trial_id": trial["trial_id"]}))
    study.add_trials(built)
    return study


# ------------------------------------------------------------------------------ figures

def _plotly_figures(study: Any, trials: list[dict[str, Any]], best: dict[str, Any] | None,
                    search: Search) -> list[tuple[str, str, Any]]:
    """(anchor, title, plotly figure or an explanatory string) in report order."""
    import optuna.visualization as ov
    import plotly.graph_objects as go

    complete = [trial for trial in study.trials if trial.state.name == "COMPLETE"]
    figures: list[tuple[str, str, Any]] = []

    def attempt(anchor: str, title: str, make: Any) -> None:
        try:
            figures.append((anchor, title, make()))
        except Exception as error:  # a plot Optuna cannot draw for this study (too few trials, ...)
            figures.append((anchor, title, f"not drawn: {type(error).__name__}: {error}"))

    attempt("history", "Optimisation history", lambda: ov.plot_optimization_history(study))
    attempt("parallel", "Parallel coordinates over the searched keys",
            lambda: ov.plot_parallel_coordinate(study))
    importance_title = (f"Parameter importances (fANOVA over {len(complete)} complete trials; "
                        "noisy under about 20)")
    if len(complete) >= 2:
        attempt("importances", importance_title, lambda: ov.plot_param_importances(study))
    else:
        figures.append(("importances", importance_title, "not drawn: needs at least 2 complete trials"))
    attempt("slice", "Slice plots: objective against each searched key", lambda: ov.plot_slice(study))

    metric = search.config.objective.metric
    ranked = sorted((trial for trial in trials if objective_of(trial, metric) is not None),
                    key=lambda trial: objective_of(trial, metric), reverse=True)[:TOP_TRIALS]
    curves = go.Figure()
    for trial in ranked:
        epochs = [result["epoch"] for result in trial["results"] if "selection_macro_f1" in result]
        curves.add_trace(go.Scatter(x=epochs, y=[result["selection_macro_f1"] for result in trial["results"]
                                                 if "selection_macro_f1" in result],
                                    mode="lines+markers", name=f"{trial['trial_id']} raw"))
        smoothed = [key for key in (trial["results"][-1] if trial["results"] else {})
                    if key.startswith("selection_macro_f1_smoothed_")]
        for key in smoothed[:1]:
            curves.add_trace(go.Scatter(x=epochs, y=[result.get(key) for result in trial["results"]
                                                     if "selection_macro_f1" in result],
                                        mode="lines", line={"dash": "dash"},
                                        name=f"{trial['trial_id']} {key.rsplit('_', 1)[-1]}-smoothed"))
    curves.update_layout(xaxis_title="epoch", yaxis_title="selection-half macro-F1")
    figures.append(("curves", f"Learning curves of the best {len(ranked)} trials", curves))

    record = best_record(best)
    if record is not None:
        validation = record["validation"]
        names = list(schema.CLASS_NAMES)
        figures.append(("per_class", f"Best trial {best['trial_id']}: per-class F1 at epoch {record['epoch']} "
                        "(whole validation set)",
                        go.Figure(go.Bar(x=names, y=validation["per_class_f1"]))))
        confusion = go.Figure(go.Heatmap(z=validation["confusion"], x=names, y=names, colorscale="Blues"))
        confusion.update_layout(xaxis_title="predicted", yaxis_title="true",
                                yaxis={"autorange": "reversed"})
        figures.append(("confusion", f"Best trial {best['trial_id']}: confusion matrix at epoch "
                        f"{record['epoch']}", confusion))
    return figures


def best_record(best: dict[str, Any] | None) -> dict[str, Any] | None:
    """The best trial's validated epoch record with the best selection-half macro-F1."""
    if not best:
        return None
    validated = [record for record in best["history"] if selection_figures(record)]
    if not validated:
        return None
    return max(validated, key=lambda record: selection_figures(record)["selection_macro_f1"])


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _pngs(study: Any, trials: list[dict[str, Any]], best: dict[str, Any] | None,
          search: Search) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as omp

    pngs: dict[str, bytes] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib module is marked experimental
        try:
            axes = omp.plot_optimization_history(study)
            pngs["optimisation_history.png"] = _png(axes.figure)
            plt.close(axes.figure)
        except Exception:  # no complete trial yet
            pass
    metric = search.config.objective.metric
    ranked = sorted((trial for trial in trials if objective_of(trial, metric) is not None),
                    key=lambda trial: objective_of(trial, metric), reverse=True)[:TOP_TRIALS]
    figure, axis = plt.subplots(figsize=(7, 4))
    for trial in ranked:
        points = [(result["epoch"], result["selection_macro_f1"]) for result in trial["results"]
                  if "selection_macro_f1" in result]
        axis.plot([x for x, _ in points], [y for _, y in points], marker="o", label=trial["trial_id"])
    axis.set_xlabel("epoch")
    axis.set_ylabel("selection-half macro-F1")
    if ranked:
        axis.legend()
    pngs["learning_curves.png"] = _png(figure)
    plt.close(figure)
    record = best_record(best)
    if record is not None:
        figure, axis = plt.subplots(figsize=(6, 5))
        image = axis.imshow(record["validation"]["confusion"], cmap="Blues")
        axis.set_xticks(range(schema.NUM_CLASSES), schema.CLASS_NAMES, rotation=45, ha="right")
        axis.set_yticks(range(schema.NUM_CLASSES), schema.CLASS_NAMES)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        figure.colorbar(image)
        pngs["confusion.png"] = _png(figure)
        plt.close(figure)
    return pngs


# ------------------------------------------------------------------------------ writing

def best_config_mapping(search: Search, best: dict[str, Any]) -> dict[str, Any]:
    """The best trial's recipe for `jobs.train`: the base recipe with the best values, its own
    run name under the base recipe's storage."""
    base_run = search.base.get("run", {})
    mapping = search.trial_mapping(best["params"], run_storage=base_run.get("storage", "runs"),
                                   run_name=f"{search.config.name}_best")
    load_config(base=mapping)  # it must load as it is
    return mapping


def _table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda value: f"{value:.4g}", na_rep="", border=0,
                         classes="trials")


def render_html(search: Search, frame: pd.DataFrame, figures: list[tuple[str, str, Any]],
                best: dict[str, Any] | None, summary: dict[str, Any]) -> str:
    config = search.config
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Search {html.escape(config.name)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "table.trials,table.kv{border-collapse:collapse;font-size:12px}"
        "table.trials td,table.trials th,table.kv td{border:1px solid #ccc;padding:2px 6px}"
        ".note{color:#666}</style></head><body>",
        f"<h1>Search {html.escape(config.name)}</h1>",
        "<table class='kv'>",
    ]
    rows = {"experiment": summary["experiment"], "searcher": config.searcher,
            "scheduler": f"{config.scheduler.name} (time_attr epoch, grace {search.grace_period})",
            "objective": f"{config.objective.metric} ({config.objective.mode})",
            "trials": f"{summary['trials']} of {config.trials} ({summary['complete']} with a result)",
            "epochs per trial": config.epochs,
            "best trial": summary.get("best_trial"), "best objective": summary.get("best_objective"),
            "best trial, report half (at its best selection epoch)": summary.get("best_report_macro_f1")}
    parts += [f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(str(value))}</td></tr>"
              for key, value in rows.items()]
    parts.append("</table>")
    if best is not None:
        parts.append("<h2>Best parameters</h2><table class='kv'>")
        parts += [f"<tr><td>{html.escape(key)}</td><td>{html.escape(str(value))}</td></tr>"
                  for key, value in search.recipe_values(best["params"]).items()]
        parts.append("</table><p class='note'>best_config.yaml holds the full recipe "
                     "(python -m jobs.train --config best_config.yaml).</p>")
    parts.append("<p class='note'>The search chose on the selection half of the validation videos; "
                 "the report half is shown for the best trial only.</p>")
    first = True
    for anchor, title, figure in figures:
        parts.append(f"<h2 id='{anchor}'>{html.escape(title)}</h2>")
        if isinstance(figure, str):
            parts.append(f"<p class='note'>{html.escape(figure)}</p>")
            continue
        # The first figure carries the whole plotly.js bundle inline; the rest reuse it.
        parts.append(figure.to_html(full_html=False, include_plotlyjs=True if first else False,
                                    div_id=f"plot-{anchor}"))
        first = False
    parts.append("<h2 id='trials'>Trials</h2>")
    shown = frame.drop(columns=[column for column in ("folder",) if column in frame.columns])
    parts.append(_table_html(shown))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(experiment: str) -> dict[str, Any]:
    """Write `<experiment>/report/` from the experiment folder; returns a summary."""
    experiment = storage.absolute(experiment) if not storage.is_remote(experiment) else experiment
    search = read_search(experiment)
    trials = read_trials(experiment, search)
    frame = trials_table(trials, search)
    metric = search.config.objective.metric
    scored = [trial for trial in trials if objective_of(trial, metric) is not None]
    best = max(scored, key=lambda trial: objective_of(trial, metric)) if scored else None
    out = storage.join(experiment, REPORT_FOLDER)
    summary: dict[str, Any] = {"experiment": experiment, "report": out, "trials": len(trials),
                               "complete": len(scored)}
    if best is not None:
        record = best_record(best)
        halves = (record or {}).get("validation", {}).get("halves", {}) if record else {}
        summary.update(best_trial=best["trial_id"], best_objective=objective_of(best, metric),
                       best_params=search.recipe_values(best["params"]),
                       best_report_macro_f1=halves.get("report", {}).get("macro_f1"))
        best_config = best_config_mapping(search, best)
        storage.write_bytes_atomic(storage.join(out, "best_config.yaml"), dump_yaml(best_config).encode())
        summary["best_config"] = storage.join(out, "best_config.yaml")
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    storage.write_bytes_atomic(storage.join(out, "trials.parquet"), buffer.getvalue())
    storage.write_bytes_atomic(storage.join(out, "trials.csv"), frame.to_csv(index=False).encode())
    study = rebuild_study(trials, search)
    figures = _plotly_figures(study, trials, best, search)
    for name, data in _pngs(study, trials, best, search).items():
        storage.write_bytes_atomic(storage.join(out, name), data)
    storage.write_bytes_atomic(storage.join(out, "report.html"),
                               render_html(search, frame, figures, best, summary).encode())
    summary["html"] = storage.join(out, "report.html")
    return summary
