"""Write a small synthetic corpus in the four real on-disk formats (Aff-Wild2, AffectNet, ExpW,
MS1MV2 RecordIO) so the embedded default and the tests exercise the real readers end to end.

Expressions persist over runs of video frames with blended transitions and per-frame jitter (so
smoothing and temporal models have something to gain); the labeled corpora are class-imbalanced
like real FER data; the face-recognition pool is larger and unlabeled.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pipeline import config
from pipeline.data import recordio, schema
from pipeline.demo import faces

# Roughly the class shares of in-the-wild FER sets (Neutral and Happiness dominate, Fear and
# Disgust are rare), in ABAW order.
DEFAULT_CLASS_SHARES = (0.26, 0.08, 0.04, 0.04, 0.28, 0.12, 0.10, 0.08)
AFFECTNET_FROM_ABAW = {abaw: affectnet for affectnet, abaw in schema.AFFECTNET_TO_ABAW.items()}
EXPW_FROM_ABAW = {abaw: expw for expw, abaw in schema.EXPW_TO_ABAW.items()}
AFFWILD2_HEADER = ",".join(schema.CLASS_NAMES)


@dataclass
class DemoCorpusConfig:
    """Sizes and difficulty of the generated corpus; the defaults ingest in seconds on 2 cores."""

    seed: int = 0
    image_size: int = 112
    difficulty: float = 1.0
    """Scales pose, lighting, blur and noise ranges (0 = clean frontal faces)."""
    class_shares: tuple[float, ...] = DEFAULT_CLASS_SHARES
    # Aff-Wild2
    # Many short videos rather than a few long ones: with a handful of identities a network
    # learns who and where (background, lighting) instead of the expression, and nothing
    # generalises to new validation subjects (measured: 10 train videos left a supervised model
    # at chance on validation; 80 gave a learnable task). Real Aff-Wild2 has hundreds of subjects.
    train_videos: int = 60
    validation_videos: int = 24
    two_person_videos: int = 4
    """Train videos recorded as a `<video>_left` / `<video>_right` pair."""
    frames_per_video: tuple[int, int] = (40, 90)
    segment_frames: tuple[int, int] = (10, 40)
    """Length range of a run of one expression."""
    transition_frames: int = 6
    """Frames over which the face morphs from one expression into the next."""
    invalid_run_probability: float = 0.15
    """Chance that a segment is annotated -1 (occluded or ambiguous: unlabeled data)."""
    missing_frame_fraction: float = 0.01
    """Annotated frames whose image file is absent, as in the real release."""
    label_noise: float = 0.03
    """Frames whose annotation is a random class (annotator disagreement)."""
    # AffectNet
    affectnet_train: int = 500
    affectnet_validation: int = 80
    affectnet_excluded_fraction: float = 0.06
    """Rows with expression 7..10 (kept out by the reader)."""
    # ExpW
    expw_images: int = 200
    expw_max_faces: int = 3
    # MS1MV2
    ms1mv2_identities: int = 400
    ms1mv2_images: int = 4000
    jpeg_quality: int = 92

    def __post_init__(self) -> None:
        config.check(len(self.class_shares) == schema.NUM_CLASSES, "class_shares",
                     f"needs {schema.NUM_CLASSES} values")
        config.check(min(self.class_shares) > 0, "class_shares", "every class needs a share > 0")
        config.check(self.frames_per_video[0] >= 10, "frames_per_video", "at least 10 frames")
        config.check(self.train_videos >= 1 and self.validation_videos >= 1, "train_videos",
                     "needs at least one train and one validation video")
        config.check(self.two_person_videos * 2 <= self.train_videos, "two_person_videos",
                     "each pair takes two train videos")


@dataclass
class DemoCorpus:
    root: str
    counts: dict[str, int] = field(default_factory=dict)

    def source_root(self, source: str) -> str:
        return os.path.join(self.root, source)


def _class_shares(cfg: DemoCorpusConfig, classes: int = schema.NUM_CLASSES) -> np.ndarray:
    shares = np.asarray(cfg.class_shares[:classes], dtype=float)
    return shares / shares.sum()


def _save_jpeg(image: Image.Image, path: str, quality: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format="JPEG", quality=quality)


def _jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------- Aff-Wild2


def video_timeline(rng: np.random.Generator, cfg: DemoCorpusConfig, frames: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: expression weights (frames, 8), the annotated label, and the true class.

    Runs of one expression with a random intensity; the first `transition_frames` of a run morph
    from the previous face; the annotation switches when the new expression dominates.
    """
    shares = _class_shares(cfg)
    weights = np.zeros((frames, schema.NUM_CLASSES))
    labels = np.zeros(frames, np.int64)
    truth = np.zeros(frames, np.int64)
    previous = faces.expression_weights(0, 0.0)
    position = 0
    while position < frames:
        length = int(rng.integers(cfg.segment_frames[0], cfg.segment_frames[1] + 1))
        end = min(frames, position + length)
        expression = int(rng.choice(schema.NUM_CLASSES, p=shares))
        target = faces.expression_weights(expression, float(rng.uniform(0.45, 1.0)))
        invalid = rng.random() < cfg.invalid_run_probability
        for frame in range(position, end):
            blend = min(1.0, (frame - position + 1) / max(1, cfg.transition_frames))
            weights[frame] = (1 - blend) * previous + blend * target
            dominant = expression if blend >= 0.5 else int(np.argmax(previous))
            truth[frame] = dominant
            labels[frame] = schema.NO_LABEL if invalid else dominant
        previous = target
        position = end
    noisy = (rng.random(frames) < cfg.label_noise) & (labels >= 0)
    labels[noisy] = rng.integers(0, schema.NUM_CLASSES, int(noisy.sum()))
    return weights, labels, truth


def _write_video(rng, cfg, root, annotation_folder, video, identity) -> int:
    frames = int(rng.integers(cfg.frames_per_video[0], cfg.frames_per_video[1] + 1))
    weights, labels, _ = video_timeline(rng, cfg, frames)
    conditions = faces.Conditions.sample(rng, cfg.difficulty)
    missing = rng.random(frames) < cfg.missing_frame_fraction
    frame_folder = os.path.join(root, "cropped_aligned", video)
    os.makedirs(frame_folder, exist_ok=True)
    for index in range(frames):
        conditions = conditions.jitter(rng, 0.15)
        if missing[index]:
            continue
        image = faces.render_face(weights[index], identity, conditions, cfg.image_size, rng)
        _save_jpeg(image, os.path.join(frame_folder, f"{index + 1:05d}.jpg"), cfg.jpeg_quality)
    os.makedirs(annotation_folder, exist_ok=True)
    with open(os.path.join(annotation_folder, f"{video}.txt"), "w") as handle:
        handle.write(AFFWILD2_HEADER + "\n")
        handle.writelines(f"{label}\n" for label in labels.tolist())
    return frames


def write_affwild2(root: str, cfg: DemoCorpusConfig, rng: np.random.Generator) -> int:
    challenge = os.path.join(root, "EXPR_Classification_Challenge")
    total = 0
    pairs = cfg.two_person_videos
    for index in range(cfg.train_videos - pairs):
        # Pairs use two identities in one recording, named like the real release.
        names = [f"{index + 1:03d}-demo_left", f"{index + 1:03d}-demo_right"] if index < pairs \
            else [f"{index + 1:03d}-demo"]
        for name in names:
            total += _write_video(rng, cfg, root, os.path.join(challenge, "Train_Set"), name,
                                  faces.Identity.sample(rng))
    for index in range(cfg.validation_videos):
        total += _write_video(rng, cfg, root, os.path.join(challenge, "Validation_Set"),
                              f"{500 + index}-demo", faces.Identity.sample(rng))
    return total


# ---------------------------------------------------------------------------- AffectNet and ExpW


def _scene(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A plain background with a gradient, standing in for the photo around a face."""
    top = rng.integers(30, 225, 3)
    bottom = rng.integers(30, 225, 3)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = (1 - ramp) * top + ramp * bottom + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _face_in_scene(rng, cfg, expression, scene, box) -> None:
    left, top, right, bottom = box
    weights = faces.expression_weights(expression, float(rng.uniform(0.5, 1.0)))
    face = faces.render_face(weights, faces.Identity.sample(rng),
                             faces.Conditions.sample(rng, cfg.difficulty), cfg.image_size, rng)
    scene.paste(face.resize((right - left, bottom - top), Image.BILINEAR), (left, top))


def write_affectnet(root: str, cfg: DemoCorpusConfig, rng: np.random.Generator) -> int:
    image_root = os.path.join(root, "Manually_Annotated_Images")
    shares = _class_shares(cfg, 7)
    header = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
              "facial_landmarks", "expression", "valence", "arousal"]
    written = 0
    for file_name, count in (("training.csv", cfg.affectnet_train),
                             ("validation.csv", cfg.affectnet_validation)):
        rows = []
        for index in range(count):
            if rng.random() < cfg.affectnet_excluded_fraction:
                expression = int(rng.integers(7, 11))
                drawn = 0
            else:
                drawn = int(rng.choice(7, p=shares))
                expression = AFFECTNET_FROM_ABAW[drawn]
            face_size = int(rng.integers(96, 200))
            width = face_size + int(rng.integers(20, 160))
            height = face_size + int(rng.integers(20, 160))
            x = int(rng.integers(0, width - face_size + 1))
            y = int(rng.integers(0, height - face_size + 1))
            scene = _scene(rng, width, height)
            _face_in_scene(rng, cfg, drawn, scene, (x, y, x + face_size, y + face_size))
            relative = f"{index % 7 + 1}/{file_name[0]}{index:06d}.jpg"
            _save_jpeg(scene, os.path.join(image_root, relative), cfg.jpeg_quality)
            rows.append([relative, x, y, face_size, face_size, "", expression,
                         round(float(rng.uniform(-1, 1)), 3), round(float(rng.uniform(-1, 1)), 3)])
        with open(os.path.join(root, file_name), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
        written += count
    return written


def write_expw(root: str, cfg: DemoCorpusConfig, rng: np.random.Generator) -> int:
    image_root = os.path.join(root, "image", "origin")
    os.makedirs(os.path.join(root, "label"), exist_ok=True)
    shares = _class_shares(cfg, 7)
    lines = []
    for index in range(cfg.expw_images):
        faces_here = int(rng.integers(1, cfg.expw_max_faces + 1))
        face_size = int(rng.integers(64, 150))
        width = faces_here * (face_size + 20) + int(rng.integers(10, 80))
        height = face_size + int(rng.integers(20, 120))
        scene = _scene(rng, width, height)
        name = f"demo_{index:05d}.jpg"
        for face_id in range(faces_here):
            left = 10 + face_id * (face_size + 20)
            top = int(rng.integers(0, height - face_size + 1))
            drawn = int(rng.choice(7, p=shares))
            _face_in_scene(rng, cfg, drawn, scene, (left, top, left + face_size, top + face_size))
            confidence = round(float(rng.uniform(20, 80)), 4)
            lines.append(f"{name} {face_id} {top} {left} {left + face_size} {top + face_size} "
                         f"{confidence} {EXPW_FROM_ABAW[drawn]}\n")
        _save_jpeg(scene, os.path.join(image_root, name), cfg.jpeg_quality)
    with open(os.path.join(root, "label", "label.lst"), "w") as handle:
        handle.writelines(lines)
    return len(lines)


# ----------------------------------------------------------------------------------------- MS1MV2


def write_ms1mv2(root: str, cfg: DemoCorpusConfig, rng: np.random.Generator) -> int:
    """InsightFace layout: header record 0 (label = [image key end, identity key end]), image
    records 1..n with the identity as label, then one record per identity with its key range."""
    os.makedirs(root, exist_ok=True)
    shares = _class_shares(cfg)
    identities = [faces.Identity.sample(rng) for _ in range(cfg.ms1mv2_identities)]
    owners = np.sort(rng.integers(0, cfg.ms1mv2_identities, cfg.ms1mv2_images))
    image_end = cfg.ms1mv2_images + 1
    identity_end = image_end + cfg.ms1mv2_identities
    writer = recordio.IndexedRecordWriter(open(os.path.join(root, "train.rec"), "wb"),
                                          open(os.path.join(root, "train.idx"), "wb"))
    writer.write(0, recordio.pack(recordio.RecordHeader(2, np.array([image_end, identity_end])), b""))
    for key, owner in enumerate(owners.tolist(), start=1):
        # Face-recognition photos: mostly neutral or smiling, every class present.
        expression = int(rng.choice(schema.NUM_CLASSES, p=shares))
        weights = faces.expression_weights(expression, float(rng.uniform(0.3, 1.0)))
        image = faces.render_face(weights, identities[owner],
                                  faces.Conditions.sample(rng, cfg.difficulty * 0.7),
                                  cfg.image_size, rng)
        writer.write(key, recordio.pack(recordio.RecordHeader(0, float(owner)),
                                        _jpeg_bytes(image, cfg.jpeg_quality)))
    for identity in range(cfg.ms1mv2_identities):
        keys = np.flatnonzero(owners == identity) + 1
        span = [float(keys[0]), float(keys[-1] + 1)] if keys.size else [0.0, 0.0]
        writer.write(image_end + identity, recordio.pack(recordio.RecordHeader(2, np.array(span)), b""))
    writer.close()
    with open(os.path.join(root, "property"), "w") as handle:
        handle.write(f"{cfg.ms1mv2_identities},{cfg.image_size},{cfg.image_size}\n")
    return cfg.ms1mv2_images


WRITERS = {
    schema.AFFWILD2: write_affwild2,
    schema.AFFECTNET: write_affectnet,
    schema.EXPW: write_expw,
    schema.MS1MV2: write_ms1mv2,
}


def write_demo_corpus(root: str, cfg: DemoCorpusConfig | None = None,
                      sources: tuple[str, ...] = schema.SOURCES) -> DemoCorpus:
    """Write the corpus under `root/<source>/`; each source has its own seeded generator, so
    writing a subset of sources gives the same files for those sources."""
    cfg = cfg or DemoCorpusConfig()
    corpus = DemoCorpus(root)
    for index, source in enumerate(schema.SOURCES):
        if source not in sources:
            continue
        rng = np.random.default_rng([cfg.seed, index])
        corpus.counts[source] = WRITERS[source](corpus.source_root(source), cfg, rng)
    return corpus


# Named sizes: "default" for `make demo`, "tiny" for tests that run the whole chain in seconds.
PRESETS: dict[str, DemoCorpusConfig] = {
    "default": DemoCorpusConfig(),
    "tiny": DemoCorpusConfig(
        train_videos=3, validation_videos=1, two_person_videos=1, frames_per_video=(24, 40),
        segment_frames=(6, 16), affectnet_train=60, affectnet_validation=12, expw_images=20,
        ms1mv2_identities=12, ms1mv2_images=150,
    ),
}
