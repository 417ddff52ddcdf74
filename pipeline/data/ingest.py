"""Ingest one corpus into a shard folder: plan on the driver, read units in parallel, manifest last.

The executor that runs the units is passed in: `run_sequentially` here (tests, debugging) or the
Ray Data one in `pipeline.data.ray_ingest`. Nothing in this module imports ray.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Iterator

from pipeline.data import shards, storage
from pipeline.data.readers.base import SourceReader, SourceUnusable
from pipeline.data.shards import skipped_records
from pipeline.progress import Progress


@dataclasses.dataclass
class UnitResult:
    index: int
    files: list[shards.FileEntry]
    skipped: list[dict[str, Any]]
    rows: int
    bytes: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class UnitTask:
    """Everything a worker needs to read and write one unit; picklable."""

    reader: SourceReader
    folder: str
    max_file_bytes: int
    row_group_bytes: int

    def __call__(self, index: int, unit: Any) -> UnitResult:
        started = time.perf_counter()
        writer = shards.ShardWriter(self.folder, f"{shards.PART_PREFIX}{index:05d}",
                                    self.max_file_bytes, self.row_group_bytes)
        skipped: list[dict[str, Any]] = []
        for batch in self.reader.read_unit(unit):
            if batch.table is not None:
                writer.write(batch.table)
            skipped.extend(skip.to_dict() for skip in batch.skipped)
        files = writer.close()
        return UnitResult(index, files, skipped, sum(f.rows for f in files),
                          sum(f.bytes for f in files), time.perf_counter() - started)


Executor = Callable[[UnitTask, list[Any]], Iterable[UnitResult]]


def run_sequentially(task: UnitTask, units: list[Any]) -> Iterator[UnitResult]:
    for index, unit in enumerate(units):
        yield task(index, unit)


class IngestProgress:
    """Units done of the total, with the rows, megabytes and skipped records so far (a bar on a
    terminal, a line every 30 s and at the end in a log; `pipeline.progress`)."""

    def __init__(self, label: str, total_units: int, stream=None) -> None:
        self.progress = Progress(label, total_units, "units", stream=stream)
        self.rows = self.bytes = self.skipped = 0

    def update(self, result: UnitResult) -> None:
        self.rows += result.rows
        self.bytes += result.bytes
        self.skipped += skipped_records(result.skipped)
        elapsed = max(time.monotonic() - self.progress.started, 1e-9)
        self.progress.advance(1, rows=self.rows, MB=round(self.bytes / 1e6, 1), skipped=self.skipped,
                              **{"rows/s": round(self.rows / elapsed)})

    def close(self) -> None:
        self.progress.close()


class TooManySkipped(SourceUnusable):
    """More records were skipped than the run allows: storage trouble or the wrong files."""


def ingest(reader: SourceReader, out: str, executor: Executor = run_sequentially,
           max_file_bytes: int = shards.DEFAULT_MAX_FILE_BYTES,
           row_group_bytes: int = shards.DEFAULT_ROW_GROUP_BYTES,
           progress: bool = True, max_skipped_fraction: float = 0.5) -> shards.Manifest:
    """Ingest `reader`'s corpus into `<out>/<source>/` and return the manifest written there.

    Safe to re-run: the old manifest is removed first, parts are rewritten under the same
    deterministic names, parts the new run does not produce are deleted, the manifest comes last.
    A run that skips more than `max_skipped_fraction` of its records writes no manifest and
    raises: a storage outage must not pass for a small corpus.
    """
    started = time.perf_counter()
    folder = storage.join(out, reader.source)
    plan = reader.plan()
    shards.begin_output(folder)
    task = UnitTask(reader, folder, max_file_bytes, row_group_bytes)
    tracker = IngestProgress(f"ingest {reader.source}", len(plan.units)) if progress else None
    results: list[UnitResult] = []
    for result in executor(task, plan.units):
        results.append(result)
        if tracker:
            tracker.update(result)
    if tracker:
        tracker.close()
    results.sort(key=lambda result: result.index)
    files = [entry for result in results for entry in result.files]
    skipped = [skip.to_dict() for skip in plan.skipped]
    skipped += [skip for result in results for skip in result.skipped]
    rows = sum(entry.rows for entry in files)
    lost = skipped_records(skipped)  # a skip can stand for a whole video's frames
    reasons = sorted({skip["reason"] for skip in skipped})
    if not files:
        raise SourceUnusable(
            f"{reader.source}: no usable record under {getattr(reader, 'root', '?')} "
            f"({len(skipped)} skipped: {reasons[:5]})"
        )
    if lost > max_skipped_fraction * (rows + lost):
        raise TooManySkipped(
            f"{reader.source}: {lost:,} records skipped ({len(skipped):,} skips) against {rows:,} read "
            f"(more than {max_skipped_fraction:.0%}; reasons {reasons[:5]}); no manifest written. "
            "Check the storage and the root, or raise --max-skipped-fraction."
        )
    manifest = shards.Manifest(
        source=reader.source, files=files, skipped=skipped, excluded=plan.excluded,
        inputs=reader.describe(), details={
            **plan.details,
            "units": len(plan.units),
            "seconds": round(time.perf_counter() - started, 2),
        },
    )
    shards.remove_stale_parts(folder, files)
    manifest.save(folder)
    return manifest
