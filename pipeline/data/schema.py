"""The one owner of the shard schema, the ABAW class list and the source label maps.

Every other module names columns through the constants here, never by hand.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# Bump when a column is added, removed or changes meaning; manifests record it and readers refuse
# shards written with a newer version than they understand.
SCHEMA_VERSION = 1

CLASS_NAMES: tuple[str, ...] = (
    "Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other",
)
NUM_CLASSES = len(CLASS_NAMES)
NO_LABEL = -1  # Aff-Wild2's "ignore this frame"; also every unlabeled (face recognition) image

# Source ids -> ABAW ids (docs/methods.md, "Classes and label maps"). AffectNet 7..10 (Contempt, None,
# Uncertain, No-Face) have no ABAW class and are kept out of the shards entirely.
AFFECTNET_TO_ABAW: dict[int, int] = {0: 0, 1: 4, 2: 5, 3: 6, 4: 3, 5: 2, 6: 1}
AFFECTNET_EXCLUDED: dict[int, str] = {7: "Contempt", 8: "None", 9: "Uncertain", 10: "No-Face"}
EXPW_TO_ABAW: dict[int, int] = {0: 1, 1: 2, 2: 3, 3: 4, 4: 5, 5: 6, 6: 0}

# Source and split names as they appear in the `source` / `split` columns and folder names.
AFFWILD2 = "affwild2"
AFFECTNET = "affectnet"
EXPW = "expw"
MS1MV2 = "ms1mv2"
SOURCES: tuple[str, ...] = (AFFWILD2, AFFECTNET, EXPW, MS1MV2)
TRAIN = "train"
VALIDATION = "validation"
SPLITS: tuple[str, ...] = (TRAIN, VALIDATION)

# Column names.
SAMPLE_ID = "sample_id"
IMAGE = "image"
LABEL = "label"
SOURCE = "source"
SPLIT = "split"
VIDEO = "video"
FRAME = "frame"
IDENTITY = "identity"
HEIGHT = "height"
WIDTH = "width"

SHARD_SCHEMA = pa.schema(
    [
        pa.field(SAMPLE_ID, pa.string(), nullable=False),
        pa.field(IMAGE, pa.binary(), nullable=False),
        pa.field(LABEL, pa.int8(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(VIDEO, pa.string()),
        pa.field(FRAME, pa.int32()),
        pa.field(IDENTITY, pa.int64()),
        pa.field(HEIGHT, pa.int32(), nullable=False),
        pa.field(WIDTH, pa.int32(), nullable=False),
    ],
    metadata={b"fer_pipeline_schema_version": str(SCHEMA_VERSION).encode()},
)

# Everything but the image bytes: what split/sampling jobs read (cheap column projection).
METADATA_COLUMNS: tuple[str, ...] = tuple(name for name in SHARD_SCHEMA.names if name != IMAGE)

# Columns worth dictionary encoding and statistics; the image column gets neither (JPEG bytes do
# not compress and min/max statistics over them only bloat the footer).
DICTIONARY_COLUMNS: tuple[str, ...] = (SOURCE, SPLIT, VIDEO)
STATISTICS_COLUMNS: tuple[str, ...] = (SAMPLE_ID, LABEL, SOURCE, SPLIT, VIDEO, FRAME, IDENTITY)


# Prediction files (`jobs.infer`, `jobs.pseudolabel`, the temporal features): the shard's
# identifying columns plus these. One owner, because inference writes them and training, the
# temporal stage and the pseudo-label reader read them.
PROBABILITY_COLUMNS: tuple[str, ...] = tuple(f"probability_{name.lower()}" for name in CLASS_NAMES)
PREDICTED = "predicted"    # argmax class, -1 for an undecodable frame
CONFIDENCE = "confidence"  # the predicted class's probability
DECODED = "decoded"        # False: the image did not decode; the row carries no prediction
FEATURES = "features"      # pooled backbone features (list<float32>), when asked for
# Pseudo-label files add these three to a prediction file.
THRESHOLD = "threshold"    # the class threshold in force for the row's predicted class
ACCEPTED = "accepted"      # decoded and confidence >= threshold
RUN_ID = "run_id"          # the training run whose model produced the row


def source_indices(sources, known: tuple[str, ...] = SOURCES):
    """Each row's source as its index in `known` (int64 numpy); an unknown source is an error
    naming it."""
    position = {name: index for index, name in enumerate(known)}
    try:
        return np.array([position[name] for name in sources], dtype=np.int64)
    except KeyError as error:
        raise ValueError(f"unknown source {error.args[0]!r} (known: {', '.join(known)})") from None


def affwild2_sample_id(video: str, frame: int) -> str:
    return f"{AFFWILD2}/{video}/{frame:05d}"


def affectnet_sample_id(sub_directory_file_path: str) -> str:
    return f"{AFFECTNET}/{sub_directory_file_path}"


def expw_sample_id(image_name: str, face_id: int) -> str:
    return f"{EXPW}/{image_name}/{face_id}"


def ms1mv2_sample_id(record_key: int) -> str:
    return f"{MS1MV2}/{record_key}"


def empty_columns() -> dict[str, list]:
    """A dict of empty lists, one per shard column, for readers that build rows column-wise."""
    return {name: [] for name in SHARD_SCHEMA.names}


def columns_to_table(columns: dict[str, list]) -> pa.Table:
    """Build a shard table from column lists, failing loudly on a missing or unknown column."""
    if set(columns) != set(SHARD_SCHEMA.names):
        missing = sorted(set(SHARD_SCHEMA.names) - set(columns))
        unknown = sorted(set(columns) - set(SHARD_SCHEMA.names))
        raise ValueError(f"shard columns mismatch: missing {missing}, unknown {unknown}")
    return pa.Table.from_pydict(columns, schema=SHARD_SCHEMA)


def check_schema_version(version: int, where: str) -> None:
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"{where} was written with shard schema version {version}; this code reads up to "
            f"{SCHEMA_VERSION}. Upgrade the pipeline package."
        )
