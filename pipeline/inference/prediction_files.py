"""Prediction outputs one file per input shard file: which rows of an input count (`RowFilter`),
what each input must produce (`InputFile`), and `FileCollector`, which gathers streamed prediction
rows by input file and writes each file atomically once all its rows are in, with a done-marker
that lets a re-run skip it (resume by shard). Pure pyarrow; the Ray Data stream feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data import schema, shards, split, storage

PATH_COLUMN = "path"
"""The input file of each row (Ray Data's `include_paths` column), as the filesystem path."""
DONE_FOLDER = "_done"
FILTER_COLUMNS = [schema.SAMPLE_ID, schema.SOURCE, schema.SPLIT]


@dataclass
class RowFilter:
    """Which rows of an input file are predicted: the unlabeled pool only (`excluded_ids` given:
    `split.unlabeled_mask`), only some `split` values, only some sources."""

    excluded_ids: pa.Array | None = None
    splits: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.excluded_ids is not None or bool(self.splits) or bool(self.sources)

    def mask(self, table: pa.Table) -> pa.BooleanArray:
        mask = pa.array([True] * table.num_rows)
        if self.excluded_ids is not None:
            mask = split.unlabeled_mask(table, self.excluded_ids)
        for column, values in ((schema.SPLIT, self.splits), (schema.SOURCE, self.sources)):
            if values:
                mask = pc.and_(mask, pc.is_in(table[column], value_set=pa.array(values)))
        return mask

    def __call__(self, table: pa.Table) -> pa.Table:
        return table.filter(self.mask(table)) if self.active else table


@dataclass
class InputFile:
    uri: str
    relative: str
    """Where its output goes under the output folder (`<source>/part-....parquet`)."""
    rows: int
    """Rows it contributes after the filter: the output file is written when this many arrived."""

    @property
    def path(self) -> str:
        return storage.filesystem(self.uri)[1]


def input_files_from_folders(folders: list[str], row_filter: RowFilter) -> list[InputFile]:
    """Every file of complete shard folders (manifests required), with its filtered row count."""
    inputs = []
    for folder in folders:
        manifest = shards.Manifest.load(folder)
        name = manifest.source or folder.rstrip("/").split("/")[-1]
        for entry, uri in zip(manifest.files, manifest.file_uris(folder)):
            rows = count_rows(uri, row_filter) if row_filter.active else entry.rows
            inputs.append(InputFile(uri, f"{name}/{entry.path}", rows))
    return inputs


def input_files_from_pool(split_dir: str, extra: RowFilter | None = None) -> tuple[list[InputFile], RowFilter]:
    """The unlabeled pool of a split as input files (rows counted after the pool filter)."""
    pool = split.load_unlabeled_pool(split_dir)
    row_filter = RowFilter(excluded_ids=pool.excluded_ids, sources=list(extra.sources) if extra else [],
                           splits=list(extra.splits) if extra else [])
    inputs = [InputFile(uri, relative, count_rows(uri, row_filter))
              for uri, relative in zip(pool.file_uris, pool.relative_paths)]
    return inputs, row_filter


def count_rows(uri: str, row_filter: RowFilter) -> int:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle, columns=FILTER_COLUMNS)
    return int(pc.sum(row_filter.mask(table)).as_py() or 0) if table.num_rows else 0


def done_marker(out: str, relative: str) -> str:
    return storage.join(out, DONE_FOLDER, relative + ".json")


def is_done(out: str, item: InputFile, identity: dict[str, Any]) -> bool:
    """Whether an earlier run already wrote this input's output with the same model and settings."""
    marker = done_marker(out, item.relative)
    if not (storage.exists(marker) and storage.exists(storage.join(out, item.relative))):
        return False
    try:
        recorded = storage.read_json(marker)
    except ValueError:
        return False
    return recorded.get("identity") == identity and recorded.get("rows") == item.rows


class FileCollector:
    """Buffers streamed rows per input file; writes `<out>/<relative>` (sorted by `sort_by`) when a
    file's rows are all in, then its done-marker. `finish(table)` shapes a file's rows before the
    write (adds columns, drops the path)."""

    def __init__(self, out: str, inputs: list[InputFile], identity: dict[str, Any],
                 finish: Callable[[pa.Table], pa.Table] | None = None,
                 sort_by: list[str] | None = None) -> None:
        self.out = out
        self.identity = identity
        self.finish = finish or (lambda table: table)
        self.sort_by = sort_by or [schema.SAMPLE_ID]
        self.by_path = {item.path: item for item in inputs}
        self.buffers: dict[str, list[pa.Table]] = {}
        self.received: dict[str, int] = {}
        self.written: list[InputFile] = []
        self.on_write: Callable[[InputFile, pa.Table], None] | None = None

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        paths = table[PATH_COLUMN]
        for path in pc.unique(paths).to_pylist():
            item = self.by_path.get(path) or self.by_path.get(path.lstrip("/"))
            if item is None:
                raise ValueError(f"prediction rows for {path}, which is not one of this run's inputs")
            part = table.filter(pc.equal(paths, path))
            self.buffers.setdefault(item.path, []).append(part)
            self.received[item.path] = self.received.get(item.path, 0) + part.num_rows
            if self.received[item.path] > item.rows:
                raise ValueError(f"{item.uri}: {self.received[item.path]} prediction rows for "
                                 f"{item.rows} input rows (duplicates)")
            if self.received[item.path] == item.rows:
                self._write(item)

    def _write(self, item: InputFile) -> None:
        table = pa.concat_tables(self.buffers.pop(item.path), promote_options="default")
        table = self.finish(table.drop_columns([PATH_COLUMN]))
        table = table.sort_by([(column, "ascending") for column in self.sort_by])
        storage.write_parquet_atomic(storage.join(self.out, item.relative), table)
        storage.write_json_atomic(done_marker(self.out, item.relative),
                                  {"identity": self.identity, "rows": item.rows, "input": item.uri})
        self.written.append(item)
        if self.on_write:
            self.on_write(item, table)

    def check_complete(self, expected: list[InputFile]) -> None:
        """Fail, naming the files, if any input did not deliver all its rows."""
        missing = [f"{item.uri} ({self.received.get(item.path, 0)}/{item.rows} rows)"
                   for item in expected if item not in self.written]
        if missing:
            raise RuntimeError("predictions incomplete for: " + "; ".join(missing[:10])
                               + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
