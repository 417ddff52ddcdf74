"""What a trial reports to the searcher once per epoch: a flat dict of scalars built from the
Trainer's epoch records. Pure Python (the Ray side sends it with `tune.report`).

Validation figures are the selection half's only (raw and smoothed macro-F1, and their best so
far): the search chooses on that half, and the report half is looked at for the best trial only
(the report reads it from that trial's metrics.jsonl).
"""

from __future__ import annotations

from typing import Any

from pipeline.core.pseudo_label_quality import flat_quality
from pipeline.data import schema

SELECTION = "selection"  # pipeline.training.evaluate.SELECTION
SELECTION_SCORE = "selection_macro_f1"
"""The epoch's own selection-half macro-F1 (the objective is its best so far)."""


def selection_figures(record: dict[str, Any]) -> dict[str, float]:
    """`selection_macro_f1` and `selection_macro_f1_smoothed_<window>` of an epoch record ({} when
    the epoch was not validated)."""
    validation = record.get("validation")
    if not validation:
        return {}
    half = (validation.get("halves") or {}).get(SELECTION)
    if half is None:
        return {}
    figures = {SELECTION_SCORE: float(half["macro_f1"])}
    for window, value in (half.get("smoothed") or {}).items():
        figures[f"{SELECTION_SCORE}_smoothed_{window}"] = float(value)
    return figures


def trial_metrics(history: list[dict[str, Any]]) -> dict[str, float | int]:
    """The flat metrics of the newest epoch of `history`, with `best_*` (best so far over the
    history) for each selection figure. None values are left out."""
    record = history[-1]
    metrics: dict[str, Any] = {"epoch": int(record["epoch"]), "step": int(record["step"])}
    for name, value in record["losses"].items():
        metrics[name if name.endswith(("loss", "rate")) else f"loss_{name}"] = value
    for index, rate in enumerate(record.get("learning_rates") or []):
        metrics[f"lr_{index}"] = rate
    for name, value in zip(schema.CLASS_NAMES, record.get("thresholds") or []):
        metrics[f"threshold_{name.lower()}"] = value
    metrics["pseudo_label_acceptance_rate"] = record.get("pseudo_label_acceptance_rate")
    if record.get("pseudo_label_quality"):
        quality = flat_quality(record["pseudo_label_quality"])
        metrics["pseudo_label_accuracy"] = quality.get("pseudo_label_accuracy")
        metrics.update({key: value for key, value in quality.items()
                        if key.startswith(("pseudo_label_precision_", "pseudo_label_coverage_"))})
    metrics["images_per_second"] = record.get("images_per_second")
    metrics.update(selection_figures(record))
    best: dict[str, float] = {}
    for earlier in history:
        for name, value in selection_figures(earlier).items():
            best[name] = max(best.get(name, float("-inf")), value)
    metrics.update({f"best_{name}": value for name, value in best.items()})
    return {name: value for name, value in metrics.items() if value is not None}
