"""RecordIO bytes against dmlc-core's layout, built by hand here, independent of our writer."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from pipeline.data import recordio

MAGIC = struct.pack("<I", 0xCED7230A)


def lrec(flag: int, length: int) -> bytes:
    return struct.pack("<I", (flag << 29) | length)


def test_whole_record_layout_and_padding():
    payload = b"x" * 27
    expected = MAGIC + lrec(0, 27) + payload + b"\x00"
    assert recordio.encode_record(payload) == expected
    assert recordio.decode_record(expected, 0, len(expected)) == (payload, 36)


def test_aligned_magic_inside_payload_splits_the_record_like_dmlc():
    payload = b"AAAA" + MAGIC + b"BBBBBB"
    expected = MAGIC + lrec(1, 4) + b"AAAA" + MAGIC + lrec(3, 6) + b"BBBBBB" + b"\x00\x00"
    assert recordio.encode_record(payload) == expected
    assert recordio.decode_record(expected, 0, len(expected))[0] == payload


def test_magic_at_start_middle_and_end():
    payload = MAGIC + b"CCCC" + MAGIC + b"DDDD" + MAGIC
    expected = (MAGIC + lrec(1, 0) + MAGIC + lrec(2, 4) + b"CCCC" + MAGIC + lrec(2, 4) + b"DDDD"
                + MAGIC + lrec(3, 0))
    assert recordio.encode_record(payload) == expected
    assert recordio.decode_record(expected, 0, len(expected)) == (payload, len(expected))


def test_unaligned_magic_is_not_split():
    payload = b"Z" + MAGIC + b"ZZZ"
    expected = MAGIC + lrec(0, 8) + payload
    assert recordio.encode_record(payload) == expected


def test_pack_matches_mxnet_header_layout():
    scalar = recordio.pack(recordio.RecordHeader(0, 7.0, 3, 4), b"img")
    assert scalar == struct.pack("<IfQQ", 0, 7.0, 3, 4) + b"img"
    vector = recordio.pack(recordio.RecordHeader(2, np.array([5.0, 9.0])), b"img")
    assert vector == struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 5.0, 9.0) + b"img"
    header, image = recordio.unpack(vector)
    assert header.flag == 2 and list(header.label) == [5.0, 9.0] and image == b"img"
    assert recordio.scalar_label(header) == 5.0
    header, image = recordio.unpack(scalar)
    assert recordio.scalar_label(header) == 7.0 and header.id == 3 and header.id2 == 4


def test_indexed_writer_and_sequential_iteration_round_trip():
    records, index = io.BytesIO(), io.BytesIO()
    writer = recordio.IndexedRecordWriter(records, index)
    payloads = [bytes([n]) * n + (MAGIC if n % 3 == 0 else b"") for n in range(1, 40)]
    for key, payload in enumerate(payloads):
        writer.write(key + 10, payload)
    keys, offsets = recordio.read_index(index.getvalue())
    assert keys.tolist() == list(range(10, 10 + len(payloads)))
    data = records.getvalue()
    for offset, payload in zip(offsets.tolist(), payloads):
        assert recordio.decode_record(data, offset, len(data))[0] == payload
    found = list(recordio.iterate_file(io.BytesIO(data), chunk_bytes=64))
    assert [offset for offset, _ in found] == offsets.tolist()
    assert [payload for _, payload in found] == payloads


@pytest.mark.parametrize("damage, error", [
    (lambda data: data[:-3], recordio.RecordTruncated),
    (lambda data: b"\x00\x00\x00\x00" + data[4:], recordio.RecordError),
    (lambda data: data[:4] + lrec(0, 1000) + data[8:], recordio.RecordTruncated),
    (lambda data: data[:4] + lrec(2, 27) + data[8:], recordio.RecordError),
])
def test_damaged_records_raise(damage, error):
    data = recordio.encode_record(b"y" * 27)
    damaged = damage(data)
    with pytest.raises(error):
        recordio.decode_record(damaged, 0, len(damaged))


def test_index_errors_name_the_line():
    assert recordio.read_index(b"1\t0\n2\t40\n")[1].tolist() == [0, 40]
    with pytest.raises(ValueError, match="line 2"):
        recordio.read_index(b"1\t0\n2\tforty\n")
    with pytest.raises(ValueError, match="line 1"):
        recordio.read_index(b"1 0\n")
