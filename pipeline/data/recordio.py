"""MXNet RecordIO (the InsightFace `train.rec` / `train.idx` format), read and written without mxnet.

Format (dmlc-core `recordio.h`, MXNet `recordio.py`):
- a record on disk is one or more parts; each part is uint32 magic 0xced7230a, uint32 `lrec`
  (low 29 bits: part length; top 3 bits: continuation flag 0 whole, 1 first, 2 middle, 3 last),
  the part's bytes, then zero padding to a multiple of 4.
- the writer splits a payload wherever the magic number appears at a 4-byte aligned position
  inside it and drops those 4 bytes; the reader puts the magic back between parts.
- `MXIndexedRecordIO` writes `key<TAB>offset` lines to the `.idx`, offset = start of the record.
- a payload is `struct IRHeader {uint32 flag; float label; uint64 id; uint64 id2}` (24 bytes,
  little-endian), then `flag` float32 labels when flag > 0 (the scalar label is then 0), then the
  image bytes.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_MASK = (1 << 29) - 1
MAX_PART_LENGTH = 1 << 29
HEADER_FORMAT = "<IfQQ"
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)  # 24

WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3


class RecordError(ValueError):
    """A record that cannot be read; the message is the reason recorded in the manifest."""


class RecordTruncated(RecordError):
    """The record needs bytes beyond the given limit (end of buffer, next record, end of file)."""


@dataclass(frozen=True)
class RecordHeader:
    flag: int
    label: float | np.ndarray
    id: int = 0
    id2: int = 0


def _padded(length: int) -> int:
    return (length + 3) & ~3


# ---------------------------------------------------------------------------------------- writing


def encode_record(payload: bytes) -> bytes:
    """The on-disk bytes of one record, split at aligned magic numbers exactly as dmlc-core does."""
    if len(payload) >= MAX_PART_LENGTH:
        raise ValueError(f"RecordIO records must be shorter than 2^29 bytes, got {len(payload)}")
    out = bytearray()
    part_start = 0
    lower_aligned = len(payload) & ~3
    for position in range(0, lower_aligned, 4):
        if payload[position:position + 4] == MAGIC_BYTES:
            flag = FIRST if part_start == 0 else MIDDLE
            out += struct.pack("<II", MAGIC, (flag << 29) | (position - part_start))
            out += payload[part_start:position]
            part_start = position + 4
    flag = LAST if part_start != 0 else WHOLE
    out += struct.pack("<II", MAGIC, (flag << 29) | (len(payload) - part_start))
    out += payload[part_start:]
    out += b"\x00" * (_padded(len(payload)) - len(payload))
    return bytes(out)


def pack(header: RecordHeader, image: bytes) -> bytes:
    """Payload bytes for `header` + `image`, as `mxnet.recordio.pack` builds them."""
    label = header.label
    if isinstance(label, (int, float, np.integer, np.floating)):
        return struct.pack(HEADER_FORMAT, 0, float(label), header.id, header.id2) + image
    labels = np.asarray(label, dtype="<f4").ravel()
    head = struct.pack(HEADER_FORMAT, labels.size, 0.0, header.id, header.id2)
    return head + labels.tobytes() + image


class IndexedRecordWriter:
    """Writes `<name>.rec` and `<name>.idx` like `MXIndexedRecordIO(idx, rec, 'w')`."""

    def __init__(self, record_handle: BinaryIO, index_handle: BinaryIO) -> None:
        self._record = record_handle
        self._index = index_handle
        self._position = 0

    def write(self, key: int, payload: bytes) -> None:
        self._index.write(f"{key}\t{self._position}\n".encode())
        encoded = encode_record(payload)
        self._record.write(encoded)
        self._position += len(encoded)

    def close(self) -> None:
        self._record.close()
        self._index.close()


# ---------------------------------------------------------------------------------------- reading


def read_index(index_text: bytes | str) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) from `.idx` content; raises ValueError naming the first bad line.

    The fast path is pyarrow's CSV parser (5.8M lines in well under a second); the line-by-line
    loop only runs to explain a failure.
    """
    if isinstance(index_text, str):
        index_text = index_text.encode()
    if not index_text.strip():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    try:
        table = pa_csv.read_csv(
            io.BytesIO(index_text),
            read_options=pa_csv.ReadOptions(column_names=["key", "offset"]),
            parse_options=pa_csv.ParseOptions(delimiter="\t"),
            convert_options=pa_csv.ConvertOptions(
                column_types={"key": pa.int64(), "offset": pa.int64()}),
        )
        keys = table["key"].to_numpy()
        offsets = table["offset"].to_numpy()
        if table["key"].null_count == 0 and table["offset"].null_count == 0:
            return keys, offsets
    except (pa.ArrowInvalid, ValueError):
        pass
    _explain_index_error(index_text.decode("ascii", errors="replace"))
    raise ValueError("unparseable index")  # _explain_index_error always raises first


def _explain_index_error(index_text: str) -> None:
    for line_number, line in enumerate(index_text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise ValueError(f"line {line_number}: expected 'key<TAB>offset', got {line[:60]!r}")
        try:
            int(fields[0]), int(fields[1])
        except ValueError:
            raise ValueError(f"line {line_number}: non-integer key or offset {line[:60]!r}") from None
    raise ValueError("index lines parse one by one but not as a table (mixed line endings?)")


def decode_record(buffer: bytes | memoryview, position: int, limit: int) -> tuple[bytes, int]:
    """Reassemble the record whose first part starts at `position` of `buffer`.

    `limit` is the first byte that does not belong to this record (the next record's offset, or
    the end of the file/buffer). Returns (payload, position after the record). Raises RecordError.
    """
    parts: list[bytes] = []
    first = True
    while True:
        if position + 8 > limit:
            raise RecordTruncated("record header runs past the end of the file (truncated .rec?)")
        magic, lrec = struct.unpack_from("<II", buffer, position)
        if magic != MAGIC:
            raise RecordError(f"bad magic 0x{magic:08x} at byte {position}")
        flag = lrec >> 29
        length = lrec & LENGTH_MASK
        if first and flag not in (WHOLE, FIRST) or not first and flag not in (MIDDLE, LAST):
            raise RecordError(f"unexpected continuation flag {flag} at byte {position}")
        start = position + 8
        end = start + length
        if end > limit:
            raise RecordTruncated(
                f"record length {length} runs past the end of the file or into the next record"
            )
        parts.append(bytes(buffer[start:end]))
        position = start + _padded(length)
        if flag in (WHOLE, LAST):
            break
        parts.append(MAGIC_BYTES)
        first = False
    return parts[0] if len(parts) == 1 else b"".join(parts), min(position, limit)


def unpack(payload: bytes) -> tuple[RecordHeader, bytes]:
    """Split a payload into its IRHeader (with float labels when flag > 0) and the image bytes."""
    if len(payload) < HEADER_SIZE:
        raise RecordError(f"payload of {len(payload)} bytes is shorter than the 24-byte header")
    flag, label, record_id, record_id2 = struct.unpack_from(HEADER_FORMAT, payload, 0)
    start = HEADER_SIZE
    if flag > 0:
        end = start + 4 * flag
        if end > len(payload):
            raise RecordError(f"header announces {flag} labels but the payload is too short")
        label = np.frombuffer(payload, dtype="<f4", count=flag, offset=start).copy()
        start = end
    return RecordHeader(flag, label, record_id, record_id2), payload[start:]


def scalar_label(header: RecordHeader) -> float:
    """The first label: the identity for MS1MV2 image records, the end key for header record 0."""
    if isinstance(header.label, np.ndarray):
        if header.label.size == 0:
            raise RecordError("record has an empty label array")
        return float(header.label[0])
    return float(header.label)


def iterate_file(handle: BinaryIO, chunk_bytes: int = 8 << 20):
    """Yield (offset, payload) for every record of a .rec read sequentially, without the .idx.

    Used to verify a file and as the sequential-read reference in benchmarks.
    """
    buffer = handle.read(chunk_bytes)
    buffer_start = 0  # file offset of buffer[0]
    local = 0
    end_of_file = len(buffer) < chunk_bytes
    while local < len(buffer) or not end_of_file:
        try:
            payload, next_local = decode_record(buffer, local, len(buffer))
        except RecordTruncated:
            if end_of_file:
                raise
            more = handle.read(chunk_bytes)
            end_of_file = len(more) < chunk_bytes
            buffer = buffer[local:] + more
            buffer_start += local
            local = 0
            continue
        yield buffer_start + local, payload
        local = next_local
