"""Worker processes for tests, stopped by process id within bounded time: `torch.multiprocessing`'s
`spawn(join=True)` waits forever for a worker stuck in a collective, and leaves the others running
if the test is interrupted."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch.multiprocessing as multiprocessing


def spawn_and_join(function: Callable[..., None], args: tuple[Any, ...], processes: int,
                   timeout_s: float = 300.0) -> None:
    """Run `function(rank, *args)` in `processes` spawned processes and wait for all of them; a
    worker's exception is raised here. Past `timeout_s`, or on any error, every worker still alive
    is killed by its PID and reaped before this returns."""
    context = multiprocessing.spawn(function, args=args, nprocs=processes, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{processes} worker processes still running after {timeout_s:g} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)
