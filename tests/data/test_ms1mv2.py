"""The MS1MV2 reader: InsightFace layout, subsets, the vectorised path against the careful one,
and every kind of damaged input skipped with its reason or failed fast with the file named."""

from __future__ import annotations

import os
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.data import ingest, recordio, schema, shards
from pipeline.data.readers import ms1mv2 as ms1mv2_module
from pipeline.data.readers.base import SourceUnusable
from pipeline.data.readers.ms1mv2 import Ms1mv2Reader

from conftest import make_jpeg

MAGIC = struct.pack("<I", recordio.MAGIC)


def with_aligned_magic(jpeg: bytes) -> bytes:
    """A valid JPEG whose payload holds the RecordIO magic at a 4-aligned offset (a COM segment),
    which forces MXNet's writer to split the record into parts."""
    # payload offset of the image = 24 (header); SOI(2) + FFFE(2) + length(2) = 6 -> pad 2
    comment = b"\x00\x00" + MAGIC + b"\x00\x00"
    segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    image = jpeg[:2] + segment + jpeg[2:]
    assert (24 + image.index(MAGIC)) % 4 == 0
    return image


def write_rec(folder, count=60, identities=6, header=True, odd_keys=()):
    """InsightFace-style train.rec/.idx; returns {key: (identity, image bytes)}."""
    os.makedirs(folder, exist_ok=True)
    expected = {}
    writer = recordio.IndexedRecordWriter(open(os.path.join(folder, "train.rec"), "wb"),
                                          open(os.path.join(folder, "train.idx"), "wb"))
    if header:
        writer.write(0, recordio.pack(recordio.RecordHeader(2, np.array([count + 1, count + 1 + identities])), b""))
    for key in range(1, count + 1):
        identity = key % max(identities, 1)
        image = make_jpeg(key, (112, 112))
        if key in odd_keys:
            image = with_aligned_magic(image)
        label = float(identity) if key % 2 else np.array([identity, 0.5])  # both label forms
        writer.write(key, recordio.pack(recordio.RecordHeader(0 if key % 2 else 2, label), image))
        expected[key] = (identity, image)
    for identity in range(identities):
        writer.write(count + 1 + identity, recordio.pack(recordio.RecordHeader(2, np.array([1.0, 2.0])), b""))
    writer.close()
    return expected


def read_rows(folder):
    manifest = shards.Manifest.load(os.path.join(folder, schema.MS1MV2))
    tables = [pq.read_table(uri) for uri in manifest.file_uris(os.path.join(folder, schema.MS1MV2))]
    rows = {}
    for table in tables:
        for row in table.to_pylist():
            rows[row[schema.SAMPLE_ID]] = row
    return manifest, rows


def test_reads_every_image_record_with_identity_and_size(tmp_path):
    expected = write_rec(tmp_path / "rec", odd_keys={5, 6, 17})
    manifest = ingest.ingest(Ms1mv2Reader(str(tmp_path / "rec")), str(tmp_path / "out"), progress=False)
    manifest, rows = read_rows(tmp_path / "out")
    assert manifest.rows == len(expected) and not manifest.skipped
    for key, (identity, image) in expected.items():
        row = rows[f"ms1mv2/{key}"]
        assert row[schema.IMAGE] == image
        assert row[schema.IDENTITY] == identity
        assert (row[schema.LABEL], row[schema.SOURCE], row[schema.SPLIT]) == (-1, "ms1mv2", "train")
        assert (row[schema.HEIGHT], row[schema.WIDTH]) == (112, 112)
        assert row[schema.VIDEO] is None and row[schema.FRAME] is None
    assert manifest.details["header_record"] is True


def test_vectorised_path_accepts_exactly_what_the_careful_path_accepts(tmp_path, monkeypatch):
    write_rec(tmp_path / "rec", count=80, odd_keys={3, 40})
    rec = tmp_path / "rec" / "train.rec"
    data = bytearray(rec.read_bytes())
    keys, offsets = recordio.read_index((tmp_path / "rec" / "train.idx").read_bytes())
    offset_of = dict(zip(keys.tolist(), offsets.tolist()))
    image_start = lambda key, labels: offset_of[key] + 8 + 24 + 4 * labels
    data[image_start(10, 2) + 1] = 0x00                      # breaks the JPEG start marker
    data[image_start(21, 0) + 3:image_start(21, 0) + 40] = b"\x00" * 37  # garbles the segments
    rec.write_bytes(bytes(data))
    fast = ingest.ingest(Ms1mv2Reader(str(tmp_path / "rec")), str(tmp_path / "fast"), progress=False)
    monkeypatch.setattr(ms1mv2_module, "_parse_whole_jpeg_records",
                        lambda data, positions, limits: (ms1mv2_module._Parsed.empty(),
                                                         np.arange(positions.size)))
    careful = ingest.ingest(Ms1mv2Reader(str(tmp_path / "rec")), str(tmp_path / "careful"), progress=False)
    _, fast_rows = read_rows(tmp_path / "fast")
    _, careful_rows = read_rows(tmp_path / "careful")
    assert fast_rows == careful_rows
    assert fast.skipped == careful.skipped
    assert {skip["sample_id"] for skip in fast.skipped} == {"ms1mv2/10", "ms1mv2/21"}


def test_subset_is_uniform_deterministic_and_sized(tmp_path):
    write_rec(tmp_path / "rec", count=300)
    reader = lambda seed: Ms1mv2Reader(str(tmp_path / "rec"), fraction=1 / 3, seed=seed)
    first = np.concatenate([unit.keys for unit in reader(0).plan().units])
    again = np.concatenate([unit.keys for unit in reader(0).plan().units])
    other = np.concatenate([unit.keys for unit in reader(1).plan().units])
    assert first.size == 100 and np.array_equal(np.sort(first), np.sort(again))
    assert not np.array_equal(np.sort(first), np.sort(other))
    assert first.min() >= 1 and first.max() <= 300  # identity records are never images
    assert abs(np.median(first) - 150) < 40  # spread over the whole range, not a prefix


def test_units_respect_the_byte_budget(tmp_path):
    write_rec(tmp_path / "rec", count=120)
    units = Ms1mv2Reader(str(tmp_path / "rec"), unit_bytes=100_000).plan().units
    assert len(units) > 3
    for unit in units:
        assert unit.keys.size == 1 or (unit.limits - unit.offsets).sum() <= 100_000
    manifest = ingest.ingest(Ms1mv2Reader(str(tmp_path / "rec"), unit_bytes=100_000),
                             str(tmp_path / "out"), progress=False)
    assert len(manifest.files) == len(units) and manifest.rows == 120


def test_without_header_record_every_key_is_an_image(tmp_path):
    expected = write_rec(tmp_path / "rec", count=20, identities=0, header=False)
    manifest = ingest.ingest(Ms1mv2Reader(str(tmp_path / "rec")), str(tmp_path / "out"), progress=False)
    assert manifest.rows == len(expected)
    assert manifest.details["header_record"] is False


def test_truncated_rec_skips_the_cut_records_and_keeps_the_rest(tmp_path):
    write_rec(tmp_path / "rec", count=40)
    rec = tmp_path / "rec" / "train.rec"
    keys, offsets = recordio.read_index((tmp_path / "rec" / "train.idx").read_bytes())
    cut = int(offsets[keys.tolist().index(30)]) + 100  # inside record 30
    rec.write_bytes(rec.read_bytes()[:cut])
    manifest = ingest.ingest(Ms1mv2Reader(str(tmp_path / "rec")), str(tmp_path / "out"), progress=False)
    assert manifest.rows == 29
    skipped = {skip["sample_id"]: skip["reason"] for skip in manifest.skipped}
    assert set(skipped) == {f"ms1mv2/{key}" for key in range(30, 41)}
    assert set(skipped.values()) == {"truncated_record"}
    assert all("train.rec#" in skip["location"] for skip in manifest.skipped)


def test_wrong_magic_in_header_record_fails_fast(tmp_path):
    write_rec(tmp_path / "rec", count=5)
    rec = tmp_path / "rec" / "train.rec"
    rec.write_bytes(b"JUNK" + rec.read_bytes()[4:])
    with pytest.raises(SourceUnusable, match="train.rec"):
        Ms1mv2Reader(str(tmp_path / "rec")).plan()


def test_record_level_damage_is_skipped_with_reasons(tmp_path):
    write_rec(tmp_path / "rec", count=30)
    rec = tmp_path / "rec" / "train.rec"
    data = bytearray(rec.read_bytes())
    keys, offsets = recordio.read_index((tmp_path / "rec" / "train.idx").read_bytes())
    at = dict(zip(keys.tolist(), offsets.tolist()))
    data[at[3]:at[3] + 4] = b"\xde\xad\xbe\xef"                       # wrong magic
    data[at[7] + 4:at[7] + 8] = struct.pack("<I", 10_000)              # length runs past the record
    start = at[11] + 8 + 24                                            # image bytes -> not an image
    data[start:start + 4] = b"GIF8"
    rec.write_bytes(bytes(data))
    manifest = ingest.ingest(Ms1mv2Reader(str(tmp_path / "rec")), str(tmp_path / "out"), progress=False)
    reasons = {skip["sample_id"]: skip["reason"] for skip in manifest.skipped}
    assert reasons == {"ms1mv2/3": "bad_magic", "ms1mv2/7": "truncated_record",
                       "ms1mv2/11": "bad_image"}
    assert manifest.rows == 27
    assert manifest.skipped_by_reason == {"bad_image": 1, "bad_magic": 1, "truncated_record": 1}


def test_image_key_missing_from_index_is_reported(tmp_path):
    write_rec(tmp_path / "rec", count=10)
    index = tmp_path / "rec" / "train.idx"
    index.write_text("".join(line for line in index.read_text().splitlines(True)
                             if not line.startswith("4\t")))
    manifest = ingest.ingest(Ms1mv2Reader(str(tmp_path / "rec")), str(tmp_path / "out"), progress=False)
    assert manifest.rows == 9
    assert [skip["reason"] for skip in manifest.skipped] == ["key_missing_from_index"]


@pytest.mark.parametrize("setup, message", [
    (lambda folder: os.remove(folder / "train.idx"), "train.idx"),
    (lambda folder: (folder / "train.idx").write_text("1\tnot-a-number\n"), "line 1"),
    (lambda folder: (folder / "train.idx").write_text(""), "empty"),
])
def test_unusable_index_fails_fast(tmp_path, setup, message):
    write_rec(tmp_path / "rec", count=3)
    setup(tmp_path / "rec")
    with pytest.raises(SourceUnusable, match=message):
        Ms1mv2Reader(str(tmp_path / "rec")).plan()


def test_missing_root_fails_fast_naming_it(tmp_path):
    with pytest.raises(SourceUnusable, match="nowhere"):
        Ms1mv2Reader(str(tmp_path / "nowhere")).plan()


def test_rerun_rewrites_in_place_and_removes_stale_parts(tmp_path):
    write_rec(tmp_path / "rec", count=60)
    small_units = Ms1mv2Reader(str(tmp_path / "rec"), unit_bytes=50_000)
    first = ingest.ingest(small_units, str(tmp_path / "out"), progress=False)
    second = ingest.ingest(Ms1mv2Reader(str(tmp_path / "rec")), str(tmp_path / "out"), progress=False)
    files = sorted(name for name in os.listdir(tmp_path / "out" / "ms1mv2") if name.startswith("part-"))
    assert len(first.files) > 1 and files == [entry.path for entry in second.files]
    again = ingest.ingest(Ms1mv2Reader(str(tmp_path / "rec")), str(tmp_path / "out"), progress=False)
    assert [(f.path, f.rows, f.checksum) for f in again.files] == \
        [(f.path, f.rows, f.checksum) for f in second.files]


def test_index_lookup_matches_a_dictionary_of_the_index():
    # The oracle is what the reader used before: dicts built in .idx order (the last line of a
    # repeated key wins) and each record's limit as the next offset in file order.
    rng = np.random.default_rng(3)
    keys = rng.permutation(np.arange(0, 5000, dtype=np.int64))[:3000]
    keys = np.concatenate([keys, keys[:40]])  # 40 keys listed twice
    offsets = rng.permutation(np.arange(keys.size, dtype=np.int64)) * 100 + 8
    file_size = int(offsets.max()) + 77
    order = np.argsort(offsets, kind="stable")
    limit_at = dict(zip(order.tolist(), np.append(offsets[order][1:], file_size).tolist()))
    offset_of, limit_of = {}, {}
    for line, key in enumerate(keys.tolist()):
        offset_of[key], limit_of[key] = int(offsets[line]), limit_at[line]
    index = ms1mv2_module.IndexLookup(keys, offsets, file_size)
    wanted = np.arange(-3, 5003, dtype=np.int64)
    present, found_offsets, found_limits = index.find(wanted)
    assert present.tolist() == [key in offset_of for key in wanted.tolist()]
    assert found_offsets[present].tolist() == [offset_of[key] for key in wanted[present].tolist()]
    assert found_limits[present].tolist() == [limit_of[key] for key in wanted[present].tolist()]
    empty = ms1mv2_module.IndexLookup(np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    assert empty.find(np.array([1, 2]))[0].tolist() == [False, False]
