"""The data recipe: a seeded draw of the labeled, validation and unlabeled sets from ingested shards.

Decisions read metadata columns only. Labeled and validation rows are copied into shard folders;
the unlabeled pool stays a view (file list + excluded ids) over the source shards.
"""

from __future__ import annotations

import datetime
import numbers
import os
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.data import schema, shards, storage

SPLIT_NAME = "_split.json"
POOL_NAME = "_pool.json"
EXCLUDED_IDS_NAME = "excluded_ids.parquet"
LABELED = "labeled"
VALIDATION = "validation"
UNLABELED = "unlabeled"
OUTPUTS: dict[str, str] = {LABELED: LABELED, VALIDATION: VALIDATION, UNLABELED: UNLABELED}

OTHER = schema.CLASS_NAMES.index("Other")

# What the decision needs, a subset of schema.METADATA_COLUMNS: image bytes are never read.
DECISION_COLUMNS: tuple[str, ...] = (
    schema.SAMPLE_ID, schema.LABEL, schema.SOURCE, schema.SPLIT, schema.VIDEO, schema.FRAME,
)
FILE_INDEX = "file_index"  # added to metadata rows: which source file they came from
GROUP = "group"  # added to labeled picks: which labeled group drew them

VALIDATION_ORDER = [(schema.VIDEO, "ascending"), (schema.FRAME, "ascending"),
                    (schema.SAMPLE_ID, "ascending")]

EXCLUSION_RULE = (
    f"a row of a listed file is unlabeled unless its {schema.SAMPLE_ID} is in {EXCLUDED_IDS_NAME} "
    f"(the labeled selection) or {schema.SOURCE} == '{schema.AFFWILD2}' and "
    f"{schema.SPLIT} == '{schema.VALIDATION}' (the validation set)"
)


@dataclass(frozen=True)
class LabeledGroup:
    """Sources pooled for one labeled draw, and the classes drawn from them."""

    name: str
    sources: tuple[str, ...]
    classes: tuple[int, ...]


# The position in this tuple is the group index in each class's generator seed: append, never reorder.
LABELED_GROUPS: tuple[LabeledGroup, ...] = (
    LabeledGroup(schema.AFFWILD2, (schema.AFFWILD2,), tuple(range(schema.NUM_CLASSES))),
    # `Other` is an Aff-Wild2 class only; AffectNet and ExpW have no equivalent label.
    LabeledGroup(f"{schema.AFFECTNET}_{schema.EXPW}", (schema.AFFECTNET, schema.EXPW),
                 tuple(label for label in range(schema.NUM_CLASSES) if label != OTHER)),
)


@dataclass(frozen=True)
class Shortfall:
    """A class with fewer candidates than requested: all were taken, none repeated."""

    group: str
    label: int
    requested: int
    available: int


@dataclass
class SplitSummary:
    """What `_split.json` records; `out` is where it was loaded from, not stored in the file."""

    out: str
    shards_root: str
    seed: int
    per_class: int
    sources: dict[str, dict[str, Any]]  # source -> {"path": manifest, "rows", "created"}
    labeled: dict[str, dict[int, int]]  # group -> class -> rows
    labeled_by_source: dict[str, int]
    shortfalls: list[Shortfall]
    validation: dict[int, int]  # class -> rows, -1 included (context for smoothing, not scored)
    unlabeled: dict[str, int]  # source -> rows
    outputs: dict[str, str] = field(default_factory=lambda: dict(OUTPUTS))  # relative to `out`
    created: str = ""
    pipeline_version: str = __version__

    def folder(self, name: str) -> str:
        """Where output `name` (labeled, validation, unlabeled) lies."""
        return storage.join(self.out, self.outputs[name])

    @property
    def labeled_rows(self) -> int:
        return sum(sum(counts.values()) for counts in self.labeled.values())

    @property
    def validation_rows(self) -> int:
        return sum(self.validation.values())

    @property
    def unlabeled_rows(self) -> int:
        return sum(self.unlabeled.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": schema.SCHEMA_VERSION,
            "created": self.created,
            "pipeline_version": self.pipeline_version,
            "shards_root": self.shards_root,
            "shards_root_from_split": _relative_root(self.shards_root, self.out),
            "seed": self.seed,
            "per_class": self.per_class,
            "sources": self.sources,
            "labeled": {group: {str(label): rows for label, rows in counts.items()}
                        for group, counts in self.labeled.items()},
            "labeled_by_source": self.labeled_by_source,
            "shortfalls": [asdict(shortfall) for shortfall in self.shortfalls],
            "validation": {str(label): rows for label, rows in self.validation.items()},
            "unlabeled": self.unlabeled,
            "outputs": self.outputs,
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any], out: str) -> "SplitSummary":
        schema.check_schema_version(int(payload["schema_version"]), storage.join(out, SPLIT_NAME))
        return cls(
            out=out,
            shards_root=resolve_shards_root(payload, out),
            seed=int(payload["seed"]),
            per_class=int(payload["per_class"]),
            sources=payload["sources"],
            labeled={group: {int(label): rows for label, rows in counts.items()}
                     for group, counts in payload["labeled"].items()},
            labeled_by_source=payload["labeled_by_source"],
            shortfalls=[Shortfall(**shortfall) for shortfall in payload["shortfalls"]],
            validation={int(label): rows for label, rows in payload["validation"].items()},
            unlabeled=payload["unlabeled"],
            outputs=payload["outputs"],
            created=payload.get("created", ""),
            pipeline_version=payload.get("pipeline_version", ""),
        )

    def summary(self) -> str:
        groups = list(self.labeled)
        header = ["class", *groups, "validation"]
        rows = []
        for label in [*range(schema.NUM_CLASSES), schema.NO_LABEL]:
            name = schema.CLASS_NAMES[label] if label >= 0 else "no label (-1)"
            cells = [f"{self.labeled[group][label]:,}" if label in self.labeled[group] else "-"
                     for group in groups]
            rows.append([name, *cells, f"{self.validation.get(label, 0):,}"])
        rows.append(["total", *[f"{sum(self.labeled[group].values()):,}" for group in groups],
                     f"{self.validation_rows:,}"])
        widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
        lines = [f"split of {self.shards_root} (seed {self.seed}, {self.per_class:,} per class)"]
        for row in [header, *rows]:
            lines.append("  ".join([row[0].ljust(widths[0])]
                                   + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]))
        unlabeled = "  ".join(f"{source} {count:,}" for source, count in self.unlabeled.items())
        lines.append(f"unlabeled: {unlabeled}  (total {self.unlabeled_rows:,})")
        if self.shortfalls:
            lines.append("shortfalls: " + "; ".join(
                f"{shortfall.group} {schema.CLASS_NAMES[shortfall.label]} "
                f"{shortfall.available:,} of {shortfall.requested:,}" for shortfall in self.shortfalls
            ))
        return "\n".join(lines)


@dataclass
class UnlabeledPool:
    """The unlabeled pool as a view: stream `file_uris`, keep rows where `unlabeled_mask` is True."""

    file_uris: list[str]
    excluded_ids: pa.Array
    rows: int
    relative_paths: list[str] = field(default_factory=list)
    """Each file's path under the shards root (`<source>/part-....parquet`), as `file_uris`."""


@dataclass(frozen=True)
class _SourceFile:
    source: str
    folder: str
    entry: shards.FileEntry

    @property
    def uri(self) -> str:
        return storage.join(self.folder, self.entry.path)

    @property
    def relative_path(self) -> str:
        return posixpath.join(self.source, self.entry.path)


def unlabeled_mask(table: pa.Table, excluded_ids: pa.Array) -> pa.BooleanArray:
    """True for rows of the unlabeled pool: not an excluded id and not Aff-Wild2 validation."""
    sample_ids = _plain(table[schema.SAMPLE_ID])
    if isinstance(excluded_ids, pa.ChunkedArray):
        excluded_ids = excluded_ids.combine_chunks()
    excluded = pc.is_in(sample_ids, value_set=excluded_ids.cast(sample_ids.type))
    validation = pc.and_(pc.equal(_plain(table[schema.SOURCE]), schema.AFFWILD2),
                         pc.equal(_plain(table[schema.SPLIT]), schema.VALIDATION))
    mask = pc.invert(pc.or_(excluded, validation))
    return mask.combine_chunks() if isinstance(mask, pa.ChunkedArray) else mask


def _plain(column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    # Batches from Ray Data or a dictionary-preserving reader may carry dictionary-encoded strings.
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    return column


def make_split(shards_root: str, out: str, per_class: int, seed: int,
               max_file_bytes: int = shards.DEFAULT_MAX_FILE_BYTES) -> SplitSummary:
    """Draw the split from the shard folders under `shards_root` and write it under `out`.

    Validation keeps Aff-Wild2's -1 frames (temporal context for smoothing; the metric drops
    them). Safe to re-run: `_split.json` goes first and comes back last, parts keep deterministic
    names, stale parts are removed.
    """
    if isinstance(per_class, bool) or not isinstance(per_class, numbers.Integral) or per_class < 1:
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    per_class, seed = int(per_class), int(seed)
    if not storage.is_remote(shards_root):
        # Recorded in the pool: an absolute path still resolves from a Ray worker's directory.
        shards_root = os.path.abspath(shards_root)

    manifests = _load_manifests(shards_root)
    files = [_SourceFile(source, folder, entry)
             for source, (folder, manifest) in manifests.items() for entry in manifest.files]
    metadata = _read_metadata(files)
    labeled, shortfalls = _draw_labeled(metadata, per_class, seed)
    if labeled.num_rows == 0:
        raise ValueError(f"{shards_root}: no labeled training row in any source, nothing to draw")
    validation = _validation_rows(metadata)
    if validation.num_rows == 0:
        raise ValueError(f"{storage.join(shards_root, schema.AFFWILD2)} holds no "
                         f"{schema.VALIDATION} rows: the validation set would be empty")
    by_id = pc.sort_indices(labeled, sort_keys=[(schema.SAMPLE_ID, "ascending")])
    excluded_ids = labeled[schema.SAMPLE_ID].take(by_id).combine_chunks()

    storage.make_dirs(out)
    storage.remove(storage.join(out, SPLIT_NAME))
    storage.remove(storage.join(out, OUTPUTS[UNLABELED], POOL_NAME))
    inputs = {"shards_root": shards_root, "seed": seed, "per_class": per_class}
    _materialise(files, labeled, storage.join(out, OUTPUTS[LABELED]), LABELED, inputs,
                 max_file_bytes, [[index] for index in _file_order(labeled)], sort_keys=None)
    _materialise(files, validation, storage.join(out, OUTPUTS[VALIDATION]), VALIDATION, inputs,
                 max_file_bytes, _ordered_clusters(validation), sort_keys=VALIDATION_ORDER)
    unlabeled = _write_pool(storage.join(out, OUTPUTS[UNLABELED]), shards_root, files, metadata,
                            excluded_ids, manifests)

    summary = SplitSummary(
        out=out,
        shards_root=shards_root,
        seed=seed,
        per_class=per_class,
        sources={source: {"path": storage.join(folder, shards.MANIFEST_NAME), "rows": manifest.rows,
                          "created": manifest.created}
                 for source, (folder, manifest) in manifests.items()},
        labeled={group.name: _count_labels(labeled.filter(pc.equal(labeled[GROUP], group.name)),
                                           group.classes)
                 for group in LABELED_GROUPS},
        labeled_by_source={source: int(pc.sum(pc.equal(labeled[schema.SOURCE], source)).as_py() or 0)
                           for source in manifests},
        shortfalls=shortfalls,
        validation=_count_labels(validation, (schema.NO_LABEL, *range(schema.NUM_CLASSES))),
        unlabeled=unlabeled,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    storage.write_json_atomic(storage.join(out, SPLIT_NAME), summary.to_dict())
    return summary


def load_split(out: str) -> SplitSummary:
    """The summary of a finished split; fails if `make_split` never finished writing `out`."""
    uri = storage.join(out, SPLIT_NAME)
    if not storage.exists(uri):
        raise shards.IncompleteOutput(
            f"{out} has no {SPLIT_NAME}: it is not a split folder, or make_split did not finish "
            "(re-run it)"
        )
    return SplitSummary.from_dict(storage.read_json(uri), out)


def _relative_root(shards_root: str, out: str) -> str | None:
    """The shard root as a path from the split folder, when both are local (None otherwise): a split
    and its shards copied together to another machine or mount still find each other."""
    if storage.is_remote(shards_root) or storage.is_remote(out):
        return None
    return os.path.relpath(os.path.abspath(shards_root), os.path.abspath(out)).replace(os.sep, "/")


def resolve_shards_root(payload: dict[str, Any], out: str) -> str:
    """Where the shards of the split recorded in `payload` (read from `out`) are now: the recorded
    relative path when it leads to a folder, else the recorded absolute one when that exists (the
    split moved, the shards did not); fails naming both when neither does."""
    recorded = payload["shards_root"]
    relative = payload.get("shards_root_from_split")
    if relative is None or storage.is_remote(out):
        return recorded
    moved = os.path.normpath(os.path.join(os.path.abspath(out), *relative.split("/")))
    if os.path.isdir(moved):
        return moved
    if storage.is_remote(recorded) or os.path.isdir(recorded):
        return recorded
    raise FileNotFoundError(f"{storage.join(out, SPLIT_NAME)}: its shards are neither at {moved} "
                            f"(recorded relative to the split) nor at {recorded} (recorded absolute)")


def load_unlabeled_pool(split_dir: str, shards_root: str | None = None) -> UnlabeledPool:
    """The unlabeled pool of a finished split; `shards_root` overrides the recorded root (moved
    shards)."""
    summary = load_split(split_dir)
    folder = summary.folder(UNLABELED)
    payload = storage.read_json(storage.join(folder, POOL_NAME))
    root = shards_root if shards_root is not None else summary.shards_root
    excluded_ids = _read_parquet(storage.join(folder, payload["excluded_ids"]),
                                 columns=[schema.SAMPLE_ID])[schema.SAMPLE_ID].combine_chunks()
    if len(excluded_ids) != payload["excluded_rows"]:
        raise ValueError(f"{folder}/{payload['excluded_ids']} holds {len(excluded_ids)} ids, "
                         f"{POOL_NAME} expects {payload['excluded_rows']}: re-run the split")
    return UnlabeledPool(
        file_uris=[storage.join(root, *entry["path"].split("/")) for entry in payload["files"]],
        excluded_ids=excluded_ids,
        rows=int(payload["rows"]),
        relative_paths=[entry["path"] for entry in payload["files"]],
    )


def _load_manifests(shards_root: str) -> dict[str, tuple[str, shards.Manifest]]:
    manifests = {}
    for source in schema.SOURCES:
        folder = storage.join(shards_root, source)
        if not storage.exists(folder):
            if source == schema.AFFWILD2:
                raise FileNotFoundError(
                    f"{folder} does not exist: Aff-Wild2 shards are required (they give the "
                    "validation set and the Other class); ingest Aff-Wild2 first"
                )
            continue
        manifest = shards.Manifest.load(folder)  # IncompleteOutput for a folder left half-written
        if manifest.source != source:
            raise ValueError(f"{folder}: manifest says source {manifest.source!r}, "
                             f"expected {source!r}")
        manifests[source] = (folder, manifest)
    return manifests


def _read_parquet(uri: str, columns: list[str] | None = None,
                  filter_expression: pc.Expression | None = None) -> pa.Table:
    fs, path = storage.filesystem(uri)
    # partitioning=None: a folder name with '=' in it must not turn into a column.
    return pq.read_table(path, filesystem=fs, columns=columns, filters=filter_expression,
                         partitioning=None)


def _read_metadata(files: list[_SourceFile]) -> pa.Table:
    """Decision columns of every file but MS1MV2's (whose manifest counts are all the pool needs)."""
    tables = []
    for index, file in enumerate(files):
        if file.source == schema.MS1MV2:
            continue
        table = _read_parquet(file.uri, columns=list(DECISION_COLUMNS))
        if table.num_rows != file.entry.rows:
            raise ValueError(f"{file.uri} holds {table.num_rows} rows, its manifest says "
                             f"{file.entry.rows}: the file changed after ingest, "
                             f"re-ingest {file.source}")
        if table.num_rows and not pc.all(pc.equal(table[schema.SOURCE], file.source)).as_py():
            raise ValueError(f"{file.uri} holds rows whose {schema.SOURCE} is not {file.source!r}")
        tables.append(table.append_column(FILE_INDEX, pa.array(np.full(table.num_rows, index,
                                                                       dtype=np.int32))))
    if not tables:
        return pa.table({name: pa.array([], schema.SHARD_SCHEMA.field(name).type)
                         for name in DECISION_COLUMNS} | {FILE_INDEX: pa.array([], pa.int32())})
    metadata = pa.concat_tables(tables)
    # The exclusion rule matches rows by sample_id, so a repeated id would leak labeled rows into
    # the pool (or drop pool rows); ids are unique by construction, checked here because it is cheap.
    if pc.count_distinct(metadata[schema.SAMPLE_ID]).as_py() != metadata.num_rows:
        counts = metadata.group_by(schema.SAMPLE_ID).aggregate([([], "count_all")])
        repeated = counts.filter(pc.greater(counts["count_all"], 1))[schema.SAMPLE_ID]
        raise ValueError(f"{len(repeated)} sample ids occur more than once across the shards, "
                         f"e.g. {repeated[0].as_py()!r}")
    return metadata


def _draw_labeled(metadata: pa.Table, per_class: int, seed: int
                  ) -> tuple[pa.Table, list[Shortfall]]:
    """Per group and class: `per_class` rows without replacement, or all of them when short."""
    candidates = metadata.filter(pc.and_(pc.equal(metadata[schema.SPLIT], schema.TRAIN),
                                         pc.greater_equal(metadata[schema.LABEL], 0)))
    picks, shortfalls = [], []
    for group_index, group in enumerate(LABELED_GROUPS):
        in_group = candidates.filter(pc.is_in(candidates[schema.SOURCE],
                                              value_set=pa.array(group.sources)))
        for label in group.classes:
            of_class = in_group.filter(pc.equal(in_group[schema.LABEL], label))
            # Sorted by id so the draw depends on which rows exist, not on file or ingest order.
            of_class = of_class.take(pc.sort_indices(of_class,
                                                     sort_keys=[(schema.SAMPLE_ID, "ascending")]))
            available = of_class.num_rows
            if available <= per_class:
                chosen = of_class
                if available < per_class:
                    shortfalls.append(Shortfall(group.name, label, per_class, available))
            else:
                # One generator per (group, class): adding rows to one class never moves the
                # draw of another.
                generator = np.random.default_rng([seed, group_index, label])
                chosen = of_class.take(np.sort(generator.choice(available, size=per_class,
                                                                replace=False)))
            picks.append(chosen.append_column(GROUP, pa.array([group.name] * chosen.num_rows,
                                                                pa.string())))
    return pa.concat_tables(picks), shortfalls


def _validation_rows(metadata: pa.Table) -> pa.Table:
    """All Aff-Wild2 validation rows in (video, frame) order, -1 frames included.

    The -1 frames give the smoothing window its temporal context; the metric leaves them out.
    """
    rows = metadata.filter(pc.and_(pc.equal(metadata[schema.SOURCE], schema.AFFWILD2),
                                   pc.equal(metadata[schema.SPLIT], schema.VALIDATION)))
    return rows.sort_by(VALIDATION_ORDER)


def _count_labels(table: pa.Table, labels: tuple[int, ...]) -> dict[int, int]:
    values, counts = np.unique(table[schema.LABEL].to_numpy(), return_counts=True)
    found = dict(zip(values.tolist(), counts.tolist()))
    return {label: int(found.get(label, 0)) for label in labels}


def _file_order(rows: pa.Table) -> list[int]:
    return sorted(set(rows[FILE_INDEX].to_pylist()))


def _ordered_clusters(ordered: pa.Table) -> list[list[int]]:
    """Files grouped so that writing group after group, each sorted, yields the global order.

    Each file covers a span of positions in the global order; files whose spans overlap must be
    sorted together. Shards written video by video give one file per group, so memory stays at
    about one file; interleaved files merge into larger groups (the whole set at worst).
    """
    file_index = ordered[FILE_INDEX].to_numpy()
    files, first = np.unique(file_index, return_index=True)
    _, from_end = np.unique(file_index[::-1], return_index=True)
    last = len(file_index) - 1 - from_end
    clusters: list[list[int]] = []
    end = -1
    for position in np.argsort(first, kind="stable"):
        if first[position] <= end:
            clusters[-1].append(int(files[position]))
        else:
            clusters.append([int(files[position])])
        end = max(end, int(last[position]))
    return clusters


def _materialise(files: list[_SourceFile], rows: pa.Table, folder: str, name: str,
                 inputs: dict[str, Any], max_file_bytes: int, clusters: list[list[int]],
                 sort_keys: list[tuple[str, str]] | None) -> shards.Manifest:
    """Copy `rows` (with their image bytes) into a shard folder, reading each source file once."""
    shards.begin_output(folder)
    writer = shards.ShardWriter(folder, f"{shards.PART_PREFIX}00000", max_file_bytes)
    wanted_by_file = _ids_by_file(rows)
    for cluster in clusters:
        tables = []
        for index in cluster:
            wanted = wanted_by_file[index]
            table = _read_parquet(files[index].uri,
                                  filter_expression=pc.field(schema.SAMPLE_ID).isin(wanted))
            if table.num_rows != len(wanted):
                raise ValueError(f"{files[index].uri}: expected {len(wanted)} {name} rows, found "
                                 f"{table.num_rows}: the file changed during the split, re-run it")
            tables.append(table)
        table = pa.concat_tables(tables)
        if sort_keys:
            table = table.sort_by(sort_keys)
        _write_in_slices(writer, table)
    entries = writer.close()
    manifest = shards.Manifest(source=name, files=entries, skipped=[], inputs=inputs,
                               details={"rows": rows.num_rows})
    shards.remove_stale_parts(folder, entries)
    manifest.save(folder)
    return manifest


def _ids_by_file(rows: pa.Table) -> dict[int, pa.Array]:
    file_index = rows[FILE_INDEX].to_numpy()
    order = np.argsort(file_index, kind="stable")
    sample_ids = rows[schema.SAMPLE_ID].combine_chunks().take(pa.array(order))
    files, starts = np.unique(file_index[order], return_index=True)
    ends = [*starts[1:].tolist(), len(order)]
    return {int(file): sample_ids.slice(start, end - start)
            for file, start, end in zip(files, starts.tolist(), ends)}


def _write_in_slices(writer: shards.ShardWriter, table: pa.Table,
                     slice_bytes: int = shards.DEFAULT_ROW_GROUP_BYTES) -> None:
    # The writer starts a new file only between writes, so a large sorted group goes in slices.
    if table.num_rows == 0:
        return
    rows_per_slice = max(1, slice_bytes * table.num_rows // max(1, table.nbytes))
    for offset in range(0, table.num_rows, rows_per_slice):
        writer.write(table.slice(offset, rows_per_slice))


def _write_pool(folder: str, shards_root: str, files: list[_SourceFile], metadata: pa.Table,
                excluded_ids: pa.Array, manifests: dict[str, tuple[str, shards.Manifest]]
                ) -> dict[str, int]:
    """Write the excluded ids and `_pool.json` (last); return the unlabeled rows per source."""
    storage.make_dirs(folder)
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({schema.SAMPLE_ID: excluded_ids}), buffer)
    storage.write_bytes_atomic(storage.join(folder, EXCLUDED_IDS_NAME), buffer.getvalue().to_pybytes())

    # Counted with the same mask later jobs apply, so the recorded sizes cannot drift from the rule.
    in_pool = unlabeled_mask(metadata, excluded_ids).to_numpy(zero_copy_only=False)
    pool_rows = np.bincount(metadata[FILE_INDEX].to_numpy()[in_pool], minlength=len(files))
    entries = []
    rows_by_source = {source: 0 for source in manifests}
    for index, file in enumerate(files):
        rows = file.entry.rows if file.source == schema.MS1MV2 else int(pool_rows[index])
        rows_by_source[file.source] += rows
        if rows:  # a file holding only labeled or validation rows has nothing to stream
            entries.append({"source": file.source, "path": file.relative_path,
                            "rows": file.entry.rows, "unlabeled_rows": rows,
                            "checksum": file.entry.checksum})
    storage.write_json_atomic(storage.join(folder, POOL_NAME), {
        "schema_version": schema.SCHEMA_VERSION,
        "shards_root": shards_root,
        "rows": sum(rows_by_source.values()),
        "rows_by_source": rows_by_source,
        "exclusion_rule": EXCLUSION_RULE,
        "excluded_ids": EXCLUDED_IDS_NAME,
        "excluded_rows": len(excluded_ids),
        "source_manifests": {source: {"path": storage.join(source_folder, shards.MANIFEST_NAME),
                                      "created": manifest.created}
                             for source, (source_folder, manifest) in manifests.items()},
        "files": entries,
    })
    return rows_by_source
