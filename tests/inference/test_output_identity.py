"""Resumable outputs (predictions, pseudo labels, features) are keyed by what produced them: the
digest of the network's weights and the options that change the rows, not the checkpoint's path.
A network retrained to the same path does not reuse the old outputs; a moved checkpoint does."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pytest

from pipeline.data import schema
from pipeline.inference.predict import load_frame_model, output_identity, resolve_checkpoint
from pipeline.inference.prediction_files import PATH_COLUMN, FileCollector, InputFile, is_done
from pipeline.training.config import load_config
from pipeline.training.loop import Trainer

from conftest import build_tiny_split

pytestmark = pytest.mark.slow


def train(split_dir: str, storage_folder: str, seed: int) -> str:
    Trainer(load_config(base={
        "method": "dtm", "model": {"backbone": "test_resnet", "channels_last": False},
        "data": {"split": split_dir, "image_size": 32, "labeled_batch": 8, "shuffle_buffer": 32},
        "evaluation": {"windows": [5], "batch_size": 64},
        "run": {"name": "frame", "storage": storage_folder, "epochs": 1, "steps_per_epoch": 2,
                "seed": seed, "resume": False}})).fit()
    return resolve_checkpoint(f"{storage_folder}/frame")


def write_output(out: str, identity: dict) -> InputFile:
    """One input file's output and done-marker, as a finished export leaves them."""
    item = InputFile(uri="/shards/ms1mv2/part-00.parquet", relative="ms1mv2/part-00.parquet", rows=2)
    collector = FileCollector(out, [item], identity)
    collector.add(pa.table({schema.SAMPLE_ID: ["a", "b"], PATH_COLUMN: [item.path] * 2}))
    assert collector.written == [item]
    return item


def test_outputs_follow_the_weights_not_the_path(tmp_path):
    split_dir = build_tiny_split(tmp_path)
    path = train(split_dir, str(tmp_path / "runs"), seed=0)
    first = load_frame_model(path)
    identity = output_identity(first, features=False)
    out = str(tmp_path / "out")
    item = write_output(out, identity)

    # The same weights loaded again, and from a copy elsewhere: the output counts as done.
    moved = tmp_path / "elsewhere.pt"
    shutil.copy(path, moved)
    assert output_identity(load_frame_model(str(moved)), features=False) == identity
    assert is_done(out, item, output_identity(load_frame_model(path), features=False))
    # Other options that change the rows: not done.
    assert not is_done(out, item, output_identity(first, features=True))

    # Retrained in place (another seed, same run name, same checkpoint path): not done.
    retrained_path = train(split_dir, str(tmp_path / "runs"), seed=1)
    assert retrained_path == path
    retrained = load_frame_model(path)
    assert retrained.weights_digest != first.weights_digest
    assert not is_done(out, item, output_identity(retrained, features=False))
