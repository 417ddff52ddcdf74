"""Parquet shard files of bounded size, and the manifest that makes a shard folder complete.

A shard folder holds `part-*.parquet` files and `_manifest.json`. The manifest is written last and
is the only list of files a consumer trusts, so an interrupted write is never mistaken for a
complete one and stray files from an earlier run are ignored (then removed).
"""

from __future__ import annotations

import datetime
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.data import schema, storage

MANIFEST_NAME = "_manifest.json"
PART_PREFIX = "part-"
DEFAULT_MAX_FILE_BYTES = 192 << 20
DEFAULT_ROW_GROUP_BYTES = 32 << 20


class IncompleteOutput(FileNotFoundError):
    """A shard folder without a manifest: missing, or its writer did not finish."""


def skip_records(skip: dict[str, Any]) -> int:
    """The records one skip (`Skip.to_dict()` form) stands for: one, unless it says how many (a
    whole video, a whole annotation file)."""
    return int(skip.get("records", 1))


def skipped_records(skips: list[dict[str, Any]]) -> int:
    return sum(skip_records(skip) for skip in skips)


@dataclass
class FileEntry:
    path: str  # relative to the shard folder
    rows: int
    bytes: int
    checksum: str
    # {split: {label: rows}}, kept per file so a manifest can be merged and audited file by file.
    rows_by_split_label: dict[str, dict[str, int]] = field(default_factory=dict)


def count_split_labels(table: pa.Table) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    grouped = table.group_by([schema.SPLIT, schema.LABEL]).aggregate([([], "count_all")])
    for split, label, rows in zip(
        grouped[schema.SPLIT].to_pylist(), grouped[schema.LABEL].to_pylist(),
        grouped["count_all"].to_pylist(),
    ):
        counts[split][str(label)] = rows
    return dict(counts)


def _add_counts(total: dict[str, dict[str, int]], part: dict[str, dict[str, int]]) -> None:
    for split, labels in part.items():
        into = total.setdefault(split, {})
        for label, rows in labels.items():
            into[label] = into.get(label, 0) + rows


class ShardWriter:
    """Streams tables into `<folder>/<stem>-NN.parquet`, starting a new file past `max_file_bytes`.

    Memory stays at about one row group whatever the shard size: pyarrow flushes each written
    table as row groups straight to the (checksumming) sink.
    """

    def __init__(self, folder: str, stem: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES) -> None:
        self.folder = folder
        self.stem = stem
        self.max_file_bytes = max_file_bytes
        self.row_group_bytes = row_group_bytes
        self.files: list[FileEntry] = []
        self._sink: storage.ChecksumWriter | None = None
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0
        self._counts: dict[str, dict[str, int]] = {}

    def _open(self) -> None:
        name = f"{self.stem}-{len(self.files):02d}.parquet"
        self._path = name
        self._sink = storage.open_for_write(storage.join(self.folder, name))
        self._writer = pq.ParquetWriter(
            self._sink, schema.SHARD_SCHEMA, compression="none",
            use_dictionary=list(schema.DICTIONARY_COLUMNS),
            write_statistics=list(schema.STATISTICS_COLUMNS),
        )
        self._rows = 0
        self._counts = {}

    def _close_file(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()
        self.files.append(FileEntry(self._path, self._rows, self._sink.bytes_written,
                                    self._sink.checksum, self._counts))
        self._writer = None
        self._sink = None

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if table.schema != schema.SHARD_SCHEMA:
            table = table.cast(schema.SHARD_SCHEMA)
        if self._writer is not None and self._rows and (
            self._sink.bytes_written + table.nbytes > self.max_file_bytes
        ):
            self._close_file()
        if self._writer is None:
            self._open()
        # Row groups of ~row_group_bytes keep reader memory bounded and give Ray Data
        # enough blocks to parallelise over, whatever the image size.
        bytes_per_row = max(1, table.nbytes // table.num_rows)
        rows_per_group = max(1, self.row_group_bytes // bytes_per_row)
        self._writer.write_table(table, row_group_size=rows_per_group)
        self._rows += table.num_rows
        _add_counts(self._counts, count_split_labels(table))

    def close(self) -> list[FileEntry]:
        self._close_file()
        return self.files


@dataclass
class Manifest:
    source: str
    files: list[FileEntry]
    skipped: list[dict[str, Any]]
    excluded: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    schema_version: int = schema.SCHEMA_VERSION
    created: str = ""
    pipeline_version: str = __version__

    @property
    def rows(self) -> int:
        return sum(entry.rows for entry in self.files)

    @property
    def rows_by_split_label(self) -> dict[str, dict[str, int]]:
        total: dict[str, dict[str, int]] = {}
        for entry in self.files:
            _add_counts(total, entry.rows_by_split_label)
        return {split: dict(sorted(labels.items(), key=lambda item: int(item[0])))
                for split, labels in sorted(total.items())}

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        """Records skipped, by reason (a skip of a whole video counts its frames)."""
        counts: Counter = Counter()
        for skip in self.skipped:
            counts[skip["reason"]] += skip_records(skip)
        return dict(sorted(counts.items()))

    @property
    def skipped_records(self) -> int:
        return skipped_records(self.skipped)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "source": self.source,
            "created": self.created,
            "pipeline_version": self.pipeline_version,
            "inputs": self.inputs,
            "rows": self.rows,
            "bytes": sum(entry.bytes for entry in self.files),
            "rows_by_split_label": self.rows_by_split_label,
            "skipped_records": self.skipped_records,
            "skipped_by_reason": self.skipped_by_reason,
            "excluded": self.excluded,
            "details": self.details,
            "files": [asdict(entry) for entry in self.files],
            "skipped": self.skipped,
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any], where: str) -> "Manifest":
        schema.check_schema_version(int(payload["schema_version"]), where)
        return cls(
            source=payload["source"],
            files=[FileEntry(**entry) for entry in payload["files"]],
            skipped=payload["skipped"],
            excluded=payload.get("excluded", {}),
            inputs=payload.get("inputs", {}),
            details=payload.get("details", {}),
            schema_version=int(payload["schema_version"]),
            created=payload.get("created", ""),
            pipeline_version=payload.get("pipeline_version", ""),
        )

    def save(self, folder: str) -> None:
        if not self.created:
            self.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        storage.write_json_atomic(storage.join(folder, MANIFEST_NAME), self.to_dict())

    @classmethod
    def load(cls, folder: str) -> "Manifest":
        uri = storage.join(folder, MANIFEST_NAME)
        if not storage.exists(uri):
            raise IncompleteOutput(
                f"{folder} has no {MANIFEST_NAME}: it is not a shard folder, or the job writing it "
                "did not finish (re-run it)"
            )
        return cls.from_dict(storage.read_json(uri), uri)

    def file_uris(self, folder: str) -> list[str]:
        return [storage.join(folder, entry.path) for entry in self.files]

    def summary(self) -> str:
        counts = self.rows_by_split_label
        parts = [f"{self.source}: {self.rows:,} rows in {len(self.files)} files"]
        for split, labels in counts.items():
            labeled = {label: rows for label, rows in labels.items() if int(label) >= 0}
            unlabeled = labels.get(str(schema.NO_LABEL), 0)
            per_class = " ".join(
                f"{schema.CLASS_NAMES[int(label)][:3]}={rows}" for label, rows in labeled.items()
            )
            parts.append(f"  {split}: {sum(labels.values()):,} rows ({unlabeled:,} unlabeled) {per_class}")
        if self.skipped:
            reasons = ", ".join(f"{reason}={count}" for reason, count in self.skipped_by_reason.items())
            parts.append(f"  skipped {self.skipped_records:,} records ({len(self.skipped):,} skips): {reasons}")
        if self.excluded:
            parts.append("  excluded by design: " + ", ".join(f"{k}={v}" for k, v in self.excluded.items()))
        return "\n".join(parts)


def begin_output(folder: str) -> None:
    """Mark a folder as being (re)written: the old manifest goes first, so a crash leaves no
    manifest and the folder reads as incomplete rather than as the previous run's result."""
    storage.make_dirs(folder)
    storage.remove(storage.join(folder, MANIFEST_NAME))


def remove_stale_parts(folder: str, keep: list[FileEntry]) -> list[str]:
    """Delete part files a previous (longer or crashed) run left that the new manifest omits."""
    kept = {entry.path for entry in keep}
    removed = []
    for name in storage.list_dir(folder):
        if name.startswith(PART_PREFIX) and name not in kept:
            storage.remove(storage.join(folder, name))
            removed.append(name)
    return removed


def read_tables(folder: str, columns: list[str] | None = None, filter_expression=None
                ) -> Iterator[tuple[str, pa.Table]]:
    """(file path, table) for each file the manifest lists, optionally projected and filtered."""
    manifest = Manifest.load(folder)
    for entry in manifest.files:
        uri = storage.join(folder, entry.path)
        fs, path = storage.filesystem(uri)
        table = pq.read_table(path, filesystem=fs, columns=columns, filters=filter_expression)
        yield entry.path, table


def table_checksum_matches(folder: str, entry: FileEntry) -> bool:
    return storage.file_checksum(storage.join(folder, entry.path)) == entry.checksum
