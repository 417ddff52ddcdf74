"""Accepted pseudo labels read back as labeled rows: the finished export's manifest lists its label
files, whose accepted rows are joined to their images in the input shards. Training reads them
(`data.labeled_pseudo_labels`); the export that writes them is `pipeline.inference.pseudo_labels`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data import schema, storage
from pipeline.data.schema import ACCEPTED, PREDICTED

MANIFEST = "_manifest.json"
"""Written last by `jobs.pseudolabel`: its presence means the export finished."""


def read_accepted(folder: str, per_class: int | None = None, seed: int = 0) -> pa.Table:
    """The accepted rows of a finished export as labeled shard rows (sample_id, image, label =
    the pseudo label, video/frame when the source has them), images fetched from the input files
    the manifest lists. `per_class` caps each class (a seeded draw): the rows are held in memory."""
    manifest_uri = storage.join(folder, MANIFEST)
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(f"{folder}: no {MANIFEST}; the pseudo-label export did not finish")
    manifest = storage.read_json(manifest_uri)
    selected = []
    for entry in manifest["files"]:
        labels = storage.read_parquet(storage.join(folder, entry["path"]), [schema.SAMPLE_ID, PREDICTED, ACCEPTED])
        labels = labels.filter(labels[ACCEPTED])
        if labels.num_rows:
            selected.append((entry["input"], labels))
    if per_class is not None:
        selected = _cap_per_class(selected, per_class, seed)
    parts = []
    columns = [schema.SAMPLE_ID, schema.IMAGE, schema.VIDEO, schema.FRAME]
    for input_uri, labels in selected:
        source = storage.read_parquet(input_uri, columns)
        source = source.filter(pc.is_in(source[schema.SAMPLE_ID], value_set=labels[schema.SAMPLE_ID]))
        label_of = dict(zip(labels[schema.SAMPLE_ID].to_pylist(), labels[PREDICTED].to_pylist()))
        if source.num_rows != labels.num_rows:
            raise ValueError(f"{input_uri}: {labels.num_rows} accepted ids but {source.num_rows} found "
                             "in the input file (was it rewritten after the export?)")
        pseudo = [label_of[sample_id] for sample_id in source[schema.SAMPLE_ID].to_pylist()]
        parts.append(source.append_column(schema.LABEL, pa.array(pseudo, pa.int64())))
    if not parts:
        return pa.table({schema.SAMPLE_ID: pa.array([], pa.string()), schema.IMAGE: pa.array([], pa.binary()),
                         schema.VIDEO: pa.array([], pa.string()), schema.FRAME: pa.array([], pa.int64()),
                         schema.LABEL: pa.array([], pa.int64())})
    return pa.concat_tables(parts, promote_options="default")


def _cap_per_class(selected: list[tuple[str, pa.Table]], per_class: int, seed: int
                   ) -> list[tuple[str, pa.Table]]:
    labels = np.concatenate([table[PREDICTED].to_numpy() for _, table in selected]) if selected else np.zeros(0, int)
    keep = np.zeros(len(labels), bool)
    rng = np.random.default_rng(seed)
    for label in range(schema.NUM_CLASSES):
        rows = np.flatnonzero(labels == label)
        keep[rng.permutation(rows)[:per_class]] = True
    capped, offset = [], 0
    for uri, table in selected:
        mask = keep[offset:offset + table.num_rows]
        offset += table.num_rows
        if mask.any():
            capped.append((uri, table.filter(pa.array(mask))))
    return capped
