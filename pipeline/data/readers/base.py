"""The interface every corpus reader implements, and the skip record they all produce.

A reader is a small picklable object (root URI + options). `plan()` runs once on the driver: it
checks the file-level layout (failing fast with the file named) and cuts the work into units;
`read_unit()` runs in a Ray Data task and yields shard tables plus the records it had to skip.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Iterator

import pyarrow as pa

from pipeline.data import images, schema


class SourceUnusable(RuntimeError):
    """A file-level problem that makes a whole source unusable; the message names the file."""


@dataclass(frozen=True)
class Skip:
    """One record left out, with a machine-readable reason and where it was found."""

    reason: str  # short snake_case code, e.g. "missing_frame", "bad_magic"
    location: str  # file[:line] or file@offset
    detail: str = ""
    sample_id: str | None = None
    records: int = 1
    """How many records this skip stands for: a whole video's annotated frames for a missing frame
    folder, every line of an annotation file with a bad header. The skip guard counts these."""

    def to_dict(self) -> dict[str, Any]:
        # `records` is written only where a skip stands for other than one record.
        return {key: value for key, value in asdict(self).items()
                if value not in ("", None) and not (key == "records" and value == 1)}


@dataclass
class Batch:
    """Rows read from one part of a unit, and the records skipped on the way."""

    table: pa.Table | None
    skipped: list[Skip] = field(default_factory=list)


@dataclass
class Plan:
    units: list[Any]
    skipped: list[Skip] = field(default_factory=list)  # record-level problems found while planning
    excluded: dict[str, int] = field(default_factory=dict)  # left out by design, by reason
    details: dict[str, Any] = field(default_factory=dict)  # what the manifest should remember


class SourceReader(abc.ABC):
    source: ClassVar[str]

    @abc.abstractmethod
    def plan(self) -> Plan:
        """Check the layout and cut the work into units. Raises SourceUnusable."""

    @abc.abstractmethod
    def read_unit(self, unit: Any) -> Iterator[Batch]:
        """Read one unit; never raises for a bad record, only for a bug or lost storage."""

    def describe(self) -> dict[str, Any]:
        """The reader's inputs, recorded in the manifest."""
        return {key: value for key, value in vars(self).items() if not key.startswith("_")}


class RowBuffer:
    """Collects shard rows column-wise and hands them out as tables of bounded byte size."""

    def __init__(self, flush_bytes: int = 32 << 20) -> None:
        self.flush_bytes = flush_bytes
        self._columns = schema.empty_columns()
        self._bytes = 0
        self.skipped: list[Skip] = []

    def add(self, sample_id: str, image: bytes, info: images.ImageInfo, label: int, source: str,
            split: str, video: str | None = None, frame: int | None = None,
            identity: int | None = None) -> None:
        columns = self._columns
        columns[schema.SAMPLE_ID].append(sample_id)
        columns[schema.IMAGE].append(image)
        columns[schema.LABEL].append(label)
        columns[schema.SOURCE].append(source)
        columns[schema.SPLIT].append(split)
        columns[schema.VIDEO].append(video)
        columns[schema.FRAME].append(frame)
        columns[schema.IDENTITY].append(identity)
        columns[schema.HEIGHT].append(info.height)
        columns[schema.WIDTH].append(info.width)
        self._bytes += len(image)

    def skip(self, reason: str, location: str, detail: str = "", sample_id: str | None = None,
             records: int = 1) -> None:
        self.skipped.append(Skip(reason, location, detail, sample_id, records))

    @property
    def full(self) -> bool:
        return self._bytes >= self.flush_bytes

    def take(self) -> Batch:
        rows = len(self._columns[schema.SAMPLE_ID])
        table = schema.columns_to_table(self._columns) if rows else None
        batch = Batch(table, self.skipped)
        self._columns = schema.empty_columns()
        self._bytes = 0
        self.skipped = []
        return batch
