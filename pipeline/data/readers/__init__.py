"""Corpus readers, one module per source format, and the factory the ingest job uses."""

from __future__ import annotations

from pipeline.data import schema
from pipeline.data.readers.base import SourceReader


def make_reader(source: str, root: str, *, fraction: float = 1.0, seed: int = 0,
                full_decode: bool = False, unit_bytes: int = 192 << 20,
                min_units: int = 1) -> SourceReader:
    """The reader for `source` with the options that apply to it; others must stay at defaults."""
    if source != schema.MS1MV2 and fraction != 1.0:
        raise ValueError("--fraction/--seed select a subset of ms1mv2 only")
    if source == schema.MS1MV2:
        from pipeline.data.readers.ms1mv2 import Ms1mv2Reader

        return Ms1mv2Reader(root, fraction=fraction, seed=seed, unit_bytes=unit_bytes,
                            full_decode=full_decode, min_units=min_units)
    if source == schema.AFFWILD2:
        from pipeline.data.readers.affwild2 import AffWild2Reader

        return AffWild2Reader(root, full_decode=full_decode)
    if source == schema.AFFECTNET:
        from pipeline.data.readers.affectnet import AffectNetReader

        return AffectNetReader(root)
    if source == schema.EXPW:
        from pipeline.data.readers.expw import ExpWReader

        return ExpWReader(root)
    raise ValueError(f"unknown source {source!r}; expected one of {schema.SOURCES}")
