"""Ray at the edge of the data layer: starting/joining Ray, and running ingest units with Ray Data.

`ray.init()` with no address joins the cluster of `ray job submit` (RAY_ADDRESS is set there) or
starts a local one in-process (the embedded default).
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any, Iterator

import numpy as np

from pipeline.data.ingest import UnitResult, UnitTask


def ensure_ray(num_cpus: int | None = None, quiet: bool = True, dashboard: bool = False) -> None:
    """Join the running cluster (RAY_ADDRESS) or start a local Ray once per process.

    `dashboard=True` for Ray Train/Tune: Train V2's controller and placement-group cleanup talk
    to the dashboard's state API (without it they log errors and can leak placement groups).
    """
    import ray

    if ray.is_initialized():
        return
    options: dict[str, Any] = {"logging_level": logging.WARNING if quiet else logging.INFO,
                               "log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS"):
        options["num_cpus"] = num_cpus
        options["include_dashboard"] = dashboard
        # Only this machine may reach a local dashboard (its job API runs code).
        options["dashboard_host"] = "127.0.0.1"
        # No runtime_env here: a local Ray's workers inherit this process's environment (the S3
        # endpoint and credentials among it), and a runtime_env would copy secrets into Ray's
        # job table, its logs and the dashboard. On a cluster, credentials come from the nodes.
    ray.init(**options)


def cluster_cpus() -> int:
    """CPUs of the Ray cluster this process is connected to (starting a local one if needed)."""
    import ray

    ensure_ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _run_batch(batch: dict[str, np.ndarray], task_bytes: bytes) -> dict[str, np.ndarray]:
    task: UnitTask = pickle.loads(task_bytes)
    results = []
    for index, unit_bytes in zip(batch["index"].tolist(), batch["unit"]):
        result = task(int(index), pickle.loads(unit_bytes))
        results.append(pickle.dumps(result))
    return {"index": batch["index"], "result": np.array(results, dtype=object)}


class RayDataExecutor:
    """Runs ingest units as Ray Data tasks, one unit per task, yielding results as they finish.

    Units travel pickled in a binary column (a reader's unit can be numpy arrays or row lists that
    Arrow would not store natively); the task object travels once per task as a pickled argument.
    """

    def __init__(self, num_cpus_per_task: float = 1.0) -> None:
        self.num_cpus_per_task = num_cpus_per_task

    def __call__(self, task: UnitTask, units: list[Any]) -> Iterator[UnitResult]:
        import ray.data

        if not units:
            return
        ensure_ray()
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # our own per-unit progress lines are clearer in logs
        items = [{"index": index, "unit": pickle.dumps(unit)} for index, unit in enumerate(units)]
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        dataset = dataset.map_batches(
            _run_batch, batch_size=1, batch_format="numpy", num_cpus=self.num_cpus_per_task,
            fn_kwargs={"task_bytes": pickle.dumps(task)},
        )
        for row in dataset.iter_rows():
            yield pickle.loads(row["result"])
