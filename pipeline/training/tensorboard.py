"""TensorBoard event files of the per-epoch metrics (tensorboardX), next to metrics.jsonl.

Events are written to a local folder; for an s3:// run folder they are written to a temporary
folder and copied up after every epoch, so `tensorboard --logdir s3://...` sees them too.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from pipeline.core.pseudo_label_quality import flat_quality
from pipeline.data import schema, storage

TENSORBOARD_FOLDER = "tensorboard"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The epoch record as flat TensorBoard tags."""
    values: dict[str, float] = {}
    for name, value in record["losses"].items():
        values[f"loss/{name}"] = value
    for index, rate in enumerate(record["learning_rates"]):
        values[f"learning_rate/{index}"] = rate
    for index, threshold in enumerate(record["thresholds"] or []):
        values[f"threshold/{schema.CLASS_NAMES[index]}"] = threshold
    if record["pseudo_label_acceptance_rate"] is not None:
        values["pseudo_labels/acceptance_rate"] = record["pseudo_label_acceptance_rate"]
        for index, count in enumerate(record["pseudo_label_histogram"] or []):
            values[f"pseudo_labels/{schema.CLASS_NAMES[index]}"] = count
    if record.get("pseudo_label_quality"):
        for name, value in flat_quality(record["pseudo_label_quality"]).items():
            values["pseudo_label_quality/" + name.removeprefix("pseudo_label_")] = value
    values["throughput/images_per_second"] = record["images_per_second"]
    if "images_per_second_total" in record:
        values["throughput/images_per_second_total"] = record["images_per_second_total"]
    if "input_wait_fraction" in record:
        values["throughput/input_wait_fraction"] = record["input_wait_fraction"]
    validation = record["validation"]
    if validation:
        values["validation/macro_f1"] = validation["macro_f1"]
        values["validation/accuracy"] = validation["accuracy"]
        for index, value in enumerate(validation["per_class_f1"]):
            values[f"validation_f1/{schema.CLASS_NAMES[index]}"] = value
        for window, smoothed in (validation.get("smoothed") or {}).items():
            values[f"validation/macro_f1_smoothed_{window}"] = smoothed["macro_f1"]
        for half, figures in (validation.get("halves") or {}).items():
            values[f"validation_{half}/macro_f1"] = figures["macro_f1"]
            for window, value in (figures.get("smoothed") or {}).items():
                values[f"validation_{half}/macro_f1_smoothed_{window}"] = value
    return values


class TensorBoardLog:
    """One event file per process lifetime under `<run_folder>/tensorboard/`."""

    def __init__(self, run_folder: str) -> None:
        from tensorboardX import SummaryWriter

        self.target = storage.join(run_folder, TENSORBOARD_FOLDER)
        self.remote = storage.is_remote(run_folder)
        self.local = tempfile.mkdtemp(prefix="fer-tensorboard-") if self.remote else self.target
        self.writer = SummaryWriter(self.local)

    def write(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, float(value), global_step=record["step"])
        self.writer.flush()
        if self.remote:
            for name in os.listdir(self.local):
                with open(os.path.join(self.local, name), "rb") as handle:
                    storage.write_bytes_atomic(storage.join(self.target, name), handle.read())

    def close(self) -> None:
        self.writer.close()
