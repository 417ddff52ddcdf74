"""InsightFace MS1MV2 (`faces_emore`): `train.rec` + `train.idx`, a uniform subset, as unlabeled rows.

Record 0 is a header whose first label is the end of the image keys (images are keys 1..end-1;
the keys after them describe identity ranges and hold no image). Without such a header every key
in the index is taken as an image, as InsightFace's own loader does.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data import images, recordio, schema, storage
from pipeline.data.readers.base import Batch, Plan, RowBuffer, Skip, SourceReader, SourceUnusable

# One ranged read covers records until this many bytes; bounds worker memory and S3 GET size.
DEFAULT_READ_BYTES = 16 << 20
# A gap between selected records larger than this starts a new read instead of reading through it.
MAX_READ_GAP = 1 << 20


class IndexLookup:
    """Each `.idx` key's offset and limit (the next record's offset, or the file size), found by
    binary search over the sorted keys. Numpy arrays hold 24 bytes an entry; the dicts of Python
    ints this replaces held ~330, which made the driver's memory grow by ~650 MB for a 1.94M-record
    index (BENCHMARKS.md, ingest at the papers' scale) and would be ~2 GB for the full 5.8M one.
    A key listed twice resolves to its last line, as a dict built in file order would."""

    def __init__(self, keys: np.ndarray, offsets: np.ndarray, file_size: int) -> None:
        by_offset = np.argsort(offsets, kind="stable")
        limits = np.empty_like(offsets)
        limits[by_offset] = np.append(offsets[by_offset][1:], file_size)
        by_key = np.argsort(keys, kind="stable")
        self.keys, self.offsets, self.limits = keys[by_key], offsets[by_key], limits[by_key]

    def find(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(present, offsets, limits) for each wanted key; offsets/limits are meaningless where
        `present` is False."""
        wanted = np.asarray(wanted, dtype=np.int64)
        if self.keys.size == 0:
            zeros = np.zeros(wanted.size, np.int64)
            return np.zeros(wanted.size, bool), zeros, zeros
        position = np.clip(np.searchsorted(self.keys, wanted, side="right") - 1, 0, self.keys.size - 1)
        present = self.keys[position] == wanted
        return present, self.offsets[position], self.limits[position]


@dataclass(frozen=True)
class Unit:
    keys: np.ndarray  # int64, sorted by offset
    offsets: np.ndarray  # int64, start of each record
    limits: np.ndarray  # int64, first byte after each record (next record's offset or file size)


class Ms1mv2Reader(SourceReader):
    source = schema.MS1MV2

    def __init__(self, root: str, fraction: float = 1.0, seed: int = 0,
                 unit_bytes: int = 192 << 20, full_decode: bool = False,
                 read_bytes: int = DEFAULT_READ_BYTES, record_name: str = "train",
                 min_units: int = 1) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.root = root
        self.fraction = fraction
        self.seed = seed
        self.unit_bytes = unit_bytes
        self.full_decode = full_decode
        self.read_bytes = read_bytes
        self.record_name = record_name
        self.min_units = min_units

    @property
    def record_uri(self) -> str:
        return storage.join(self.root, f"{self.record_name}.rec")

    @property
    def index_uri(self) -> str:
        return storage.join(self.root, f"{self.record_name}.idx")

    def plan(self) -> Plan:
        for uri in (self.record_uri, self.index_uri):
            if not storage.exists(uri):
                raise SourceUnusable(f"ms1mv2: {uri} does not exist (expected InsightFace train.rec/.idx)")
        file_size = storage.size(self.record_uri)
        try:
            keys, offsets = recordio.read_index(storage.read_bytes(self.index_uri))
        except ValueError as error:
            raise SourceUnusable(f"ms1mv2: {self.index_uri}: {error}") from None
        if keys.size == 0:
            raise SourceUnusable(f"ms1mv2: {self.index_uri} is empty")
        index = IndexLookup(keys, offsets, file_size)

        image_keys, header_detail = self._image_keys(keys, index, file_size)
        skipped: list[Skip] = []
        present, _, _ = index.find(image_keys)
        for key in image_keys[~present].tolist():
            skipped.append(Skip("key_missing_from_index", f"{self.index_uri}#{key}",
                                sample_id=schema.ms1mv2_sample_id(key)))
        available = image_keys[present]

        selected = self._select(available)
        _, selected_offsets, selected_limits = index.find(selected)
        by_offset = np.argsort(selected_offsets, kind="stable")
        selected, selected_offsets, selected_limits = (
            selected[by_offset], selected_offsets[by_offset], selected_limits[by_offset])

        # Cut into units of at most ~unit_bytes of record data (one unit becomes one shard file),
        # and into at least `min_units` (the cluster's CPUs) so a small corpus uses every core;
        # cuts fall at equal byte fractions so units come out the same size.
        cumulative = np.cumsum(np.maximum(selected_limits - selected_offsets, 0))
        total = int(cumulative[-1]) if cumulative.size else 0
        count = min(selected.size, max(self.min_units, -(-total // max(1, self.unit_bytes)), 1))
        targets = total * np.arange(1, count) / count
        cuts = np.unique(np.searchsorted(cumulative, targets, side="left") + 1)
        bounds = [0, *[int(cut) for cut in cuts if 0 < cut < selected.size], selected.size]
        units = [Unit(selected[start:stop], selected_offsets[start:stop], selected_limits[start:stop])
                 for start, stop in zip(bounds[:-1], bounds[1:]) if stop > start]
        return Plan(units, skipped, details={
            "rec_bytes": file_size,
            "index_entries": int(keys.size),
            "image_keys": int(image_keys.size),
            "selected": int(selected.size),
            **header_detail,
        })

    def _image_keys(self, keys, index: "IndexLookup", file_size):
        found, header_offset, header_limit = index.find(np.zeros(1, np.int64))
        if not found[0]:
            return np.sort(keys), {"header_record": False}
        start, end = int(header_offset[0]), min(int(header_limit[0]), file_size)
        try:
            data = storage.read_bytes(self.record_uri, start, end) if end > start else b""
            payload, _ = recordio.decode_record(data, 0, len(data))
            header, _ = recordio.unpack(payload)
        except recordio.RecordError as error:
            raise SourceUnusable(
                f"ms1mv2: cannot read header record 0 of {self.record_uri}: {error} "
                "(not an MXNet RecordIO file, or a damaged one)"
            ) from None
        if header.flag <= 0:
            return np.sort(keys), {"header_record": False}
        end_key = int(recordio.scalar_label(header))
        if end_key < 1:
            raise SourceUnusable(f"ms1mv2: header record 0 of {self.record_uri} gives end key {end_key}")
        return np.arange(1, end_key, dtype=np.int64), {"header_record": True, "image_key_end": end_key}

    def _select(self, available: np.ndarray) -> np.ndarray:
        """A uniform subset of round(fraction * n) keys, the same for the same seed and input."""
        if self.fraction >= 1.0:
            return np.sort(available)
        count = int(math.floor(self.fraction * available.size + 0.5))
        generator = np.random.default_rng(self.seed)
        chosen = generator.choice(available.size, size=count, replace=False)
        return np.sort(np.sort(available)[chosen])

    def _spans(self, unit: Unit) -> Iterator[tuple[int, int, int, int]]:
        """(first record, last record + 1, byte start, byte end) of each ranged read.

        A read covers consecutive records up to `read_bytes` and stops early at a gap wider than
        MAX_READ_GAP (a sparse subset is cheaper to fetch in pieces than to read through).
        """
        count = unit.keys.size
        gaps = unit.offsets[1:] - unit.limits[:-1]
        breaks = np.flatnonzero(gaps > MAX_READ_GAP) + 1  # a read may not cross these
        first = 0
        while first < count:
            last = int(np.searchsorted(unit.limits, unit.offsets[first] + self.read_bytes, "right"))
            next_break = np.searchsorted(breaks, first, "right")
            if next_break < breaks.size:
                last = min(last, int(breaks[next_break]))
            last = max(last, first + 1)
            yield first, last, int(unit.offsets[first]), int(unit.limits[last - 1])
            first = last

    def read_unit(self, unit: Unit) -> Iterator[Batch]:
        file_size = storage.size(self.record_uri)
        spans = list(self._spans(unit))

        def fetch(span: tuple[int, int, int, int]) -> bytes:
            return storage.read_bytes(self.record_uri, span[2], min(span[3], file_size))

        # Read the next span while parsing and writing this one: file and S3 reads release the
        # GIL, so storage latency overlaps the CPU work (cold-cache and S3 ingest gain most).
        with ThreadPoolExecutor(max_workers=1) as prefetcher:
            pending = prefetcher.submit(fetch, spans[0]) if spans else None
            for number, (first, last, byte_start, _) in enumerate(spans):
                data = pending.result()
                if number + 1 < len(spans):
                    pending = prefetcher.submit(fetch, spans[number + 1])
                yield self._parse_span(unit, first, last, byte_start, data)

    def _parse_span(self, unit: Unit, first: int, last: int, byte_start: int, data: bytes) -> Batch:
        keys = unit.keys[first:last]
        positions = unit.offsets[first:last] - byte_start
        limits = np.minimum(unit.limits[first:last] - byte_start, len(data))
        if self.full_decode:
            fast, slow = _Parsed.empty(), np.arange(keys.size)
        else:
            fast, slow = _parse_whole_jpeg_records(data, positions, limits)
        rows = RowBuffer()
        for index in slow.tolist():
            self._read_record(rows, data, int(keys[index]), int(positions[index]), int(limits[index]))
        batch = rows.take()
        tables = [table for table in (fast.table(data, keys), batch.table) if table is not None]
        table = pa.concat_tables(tables) if len(tables) > 1 else (tables[0] if tables else None)
        return Batch(table, batch.skipped)

    def _read_record(self, rows: RowBuffer, data: bytes, key: int, position: int, limit: int) -> None:
        """The careful per-record path: multi-part records, errors, PNGs, full decodes."""
        try:
            payload, _ = recordio.decode_record(data, position, limit)
            header, image = recordio.unpack(payload)
            identity = int(recordio.scalar_label(header))
            info = images.check(image, self.full_decode)
        except (recordio.RecordError, images.ImageError) as error:
            rows.skip(_skip_reason(error), f"{self.record_name}.rec#{key}", str(error),
                      schema.ms1mv2_sample_id(key))
            return
        rows.add(schema.ms1mv2_sample_id(key), image, info, schema.NO_LABEL, schema.MS1MV2,
                 schema.TRAIN, identity=identity)


_START_OF_FRAME = np.array(sorted(images.START_OF_FRAME_MARKERS), dtype=np.uint8)
_STANDALONE = np.array(sorted(images.STANDALONE_MARKERS), dtype=np.uint8)
_MAX_JPEG_SEGMENTS = 24


@dataclass
class _Parsed:
    """Records the vectorised parser accepted: where their images lie and what they hold."""

    which: np.ndarray  # indices into the span's records
    image_starts: np.ndarray
    image_ends: np.ndarray
    identities: np.ndarray
    heights: np.ndarray
    widths: np.ndarray

    @classmethod
    def empty(cls) -> "_Parsed":
        nothing = np.zeros(0, np.int64)
        return cls(nothing, nothing, nothing, nothing, nothing, nothing)

    def table(self, data: bytes, keys: np.ndarray) -> pa.Table | None:
        count = self.which.size
        if count == 0:
            return None
        view = memoryview(data)
        # One join of memoryview slices is a single memcpy per image into one Arrow buffer.
        values = b"".join([view[start:end] for start, end in
                           zip(self.image_starts.tolist(), self.image_ends.tolist())])
        offsets = np.zeros(count + 1, np.int32)
        np.cumsum(self.image_ends - self.image_starts, out=offsets[1:])
        image_column = pa.BinaryArray.from_buffers(
            pa.binary(), count, [None, pa.py_buffer(offsets), pa.py_buffer(values)])
        record_keys = pa.array(keys[self.which])
        sample_ids = pc.binary_join_element_wise(
            schema.MS1MV2 + "/", pc.cast(record_keys, pa.string()), "")
        columns = {
            schema.SAMPLE_ID: sample_ids,
            schema.IMAGE: image_column,
            schema.LABEL: pa.array(np.full(count, schema.NO_LABEL, np.int8)),
            schema.SOURCE: pa.array([schema.MS1MV2] * count, pa.string()),
            schema.SPLIT: pa.array([schema.TRAIN] * count, pa.string()),
            schema.VIDEO: pa.nulls(count, pa.string()),
            schema.FRAME: pa.nulls(count, pa.int32()),
            schema.IDENTITY: pa.array(self.identities.astype(np.int64)),
            schema.HEIGHT: pa.array(self.heights.astype(np.int32)),
            schema.WIDTH: pa.array(self.widths.astype(np.int32)),
        }
        return pa.Table.from_arrays([columns[name] for name in schema.SHARD_SCHEMA.names],
                                    schema=schema.SHARD_SCHEMA)


def _parse_whole_jpeg_records(data: bytes, positions: np.ndarray, limits: np.ndarray
                              ) -> tuple[_Parsed, np.ndarray]:
    """Parse the common case for a whole span at once with numpy: single-part records holding a
    well-formed JPEG. Returns (accepted records, indices left to the careful per-record path).

    At MS1MV2 scale a per-record Python loop costs more than reading the bytes; this keeps ingest
    close to storage speed. Anything unusual is handed to the per-record path, which also
    produces the skip reasons, so both paths accept exactly the same records.
    """
    count = positions.size
    octets = np.frombuffer(data, dtype=np.uint8)
    words = np.frombuffer(data, dtype="<u4", count=len(data) // 4)
    candidate = (positions % 4 == 0) & (positions + 8 + recordio.HEADER_SIZE + 4 <= limits)
    word = np.where(candidate, positions // 4, 0)
    magic = words[word]
    lrec = words[word + 1]
    length = (lrec & recordio.LENGTH_MASK).astype(np.int64)
    candidate &= (magic == recordio.MAGIC) & ((lrec >> 29) == recordio.WHOLE)
    candidate &= (length >= recordio.HEADER_SIZE) & (positions + 8 + length <= limits)
    label_count = words[word + 2].astype(np.int64)
    image_starts = positions + 8 + recordio.HEADER_SIZE + 4 * label_count
    image_ends = positions + 8 + length
    candidate &= image_starts + 16 <= image_ends
    # The identity is the scalar label, or the first of the label array when flag > 0.
    label_word = np.where(label_count > 0, word + 2 + recordio.HEADER_SIZE // 4, word + 3)
    identities = words[np.where(candidate, label_word, 0)].view("<f4")
    starts = np.where(candidate, image_starts, 0)
    ends = np.where(candidate, image_ends, 2)
    candidate &= (octets[starts] == 0xFF) & (octets[starts + 1] == 0xD8)
    candidate &= (octets[ends - 2] == 0xFF) & (octets[ends - 1] == 0xD9)

    heights = np.zeros(count, np.int64)
    widths = np.zeros(count, np.int64)
    cursor = starts + 2
    active = candidate.copy()
    for _ in range(_MAX_JPEG_SEGMENTS):
        if not active.any():
            break
        active &= cursor + 9 < ends
        at = np.where(active, cursor, 0)
        marker = octets[at + 1]
        active &= octets[at] == 0xFF
        frame = active & np.isin(marker, _START_OF_FRAME)
        heights[frame] = octets[at[frame] + 5].astype(np.int64) << 8 | octets[at[frame] + 6]
        widths[frame] = octets[at[frame] + 7].astype(np.int64) << 8 | octets[at[frame] + 8]
        active &= ~frame
        segment = (octets[at + 2].astype(np.int64) << 8) | octets[at + 3]
        standalone = np.isin(marker, _STANDALONE)
        fill = marker == 0xFF
        # A scan or end marker before any frame header is malformed: the careful path says so.
        active &= (marker != 0xDA) & (marker != 0xD9) & (standalone | fill | (segment >= 2))
        cursor = np.where(fill, cursor + 1, np.where(standalone, cursor + 2, cursor + 2 + segment))
    accepted = candidate & (heights > 0) & (widths > 0) & (heights * widths <= images.MAX_PIXELS)
    which = np.flatnonzero(accepted)
    parsed = _Parsed(which, image_starts[which], image_ends[which],
                     identities[which].astype(np.int64), heights[which], widths[which])
    return parsed, np.flatnonzero(~accepted)


def _skip_reason(error: ValueError) -> str:
    if isinstance(error, images.ImageError):
        return "bad_image"
    if isinstance(error, recordio.RecordTruncated):
        return "truncated_record"
    if "magic" in str(error):
        return "bad_magic"
    return "bad_record"
