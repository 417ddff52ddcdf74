"""ABAW6 phase 2, the temporal refine (docs/methods.md): a Transformer encoder over clips of frozen
per-frame features with a per-frame classifier; the clips it trains and predicts on, its loss, its
trainer and its inference. Pure PyTorch: a distributed run passes `Collectives`, as the image loop does.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from pipeline.config import check
from pipeline.data import schema
from pipeline.methods.base import Collectives
from pipeline.training.gradients import average_gradients

SINUSOIDAL = "sinusoidal"
LEARNED = "learned"
POSITIONAL_ENCODINGS: tuple[str, ...] = (SINUSOIDAL, LEARNED)
PADDING = -1
"""The row index of a padded clip position (`FrameSequences` clips)."""


@dataclass
class TemporalConfig:
    clip_length: int = 64
    """Frames per clip (the ABAW6 paper: 64; docs/methods.md), in training and in the inference windows."""
    model_dim: int = 256
    """Width of the encoder; per-frame features are projected to it."""
    layers: int = 2
    """Transformer encoder layers."""
    heads: int = 4
    """Attention heads per layer; must divide model_dim."""
    feedforward_dim: int = 512
    """Hidden width of each layer's feed-forward block."""
    dropout: float = 0.1
    """Dropout on the projected input, attention weights and feed-forward blocks."""
    learning_rate: float = 1e-3
    """AdamW's learning rate, constant over the run."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay."""
    gradient_clip: float = 1.0
    """Global gradient norm limit, applied after averaging over workers; 0 turns clipping off."""
    batch_clips: int = 16
    """Clips per optimizer step on each worker."""
    steps: int = 500
    """Optimizer steps per epoch."""
    epochs: int = 10
    """Epochs of `steps` steps each; `fit` trains for steps * epochs steps in all."""
    seed: int = 0
    """Seeds the initial weights (the same on every worker) and, with the rank, each worker's clips
    and dropout."""
    positional: str = SINUSOIDAL
    """sinusoidal (fixed, any clip length) or learned (one vector per position up to clip_length)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing over the labeled frames."""
    stride: int | None = None
    """Step between inference windows; None: clip_length // 2 (each frame seen in about 2 windows)."""

    def __post_init__(self) -> None:
        check(self.clip_length >= 1, "temporal.clip_length", "must be at least 1")
        check(self.model_dim >= 1, "temporal.model_dim", "must be at least 1")
        check(self.layers >= 1, "temporal.layers", "must be at least 1")
        check(self.heads >= 1 and self.model_dim % self.heads == 0, "temporal.heads",
              f"must be at least 1 and divide model_dim ({self.model_dim})")
        check(self.feedforward_dim >= 1, "temporal.feedforward_dim", "must be at least 1")
        check(0.0 <= self.dropout < 1.0, "temporal.dropout", "must lie in [0, 1)")
        check(self.learning_rate > 0, "temporal.learning_rate", "must be positive")
        check(self.weight_decay >= 0, "temporal.weight_decay", "must be >= 0")
        check(self.gradient_clip >= 0, "temporal.gradient_clip", "must be >= 0")
        check(self.batch_clips >= 1, "temporal.batch_clips", "must be at least 1")
        check(self.steps >= 1, "temporal.steps", "must be at least 1")
        check(self.epochs >= 1, "temporal.epochs", "must be at least 1")
        check(self.positional in POSITIONAL_ENCODINGS, "temporal.positional",
              f"must be one of {list(POSITIONAL_ENCODINGS)}")
        check(0.0 <= self.label_smoothing < 1.0, "temporal.label_smoothing", "must lie in [0, 1)")
        check(self.stride is None or 1 <= self.stride <= self.clip_length, "temporal.stride",
              "must lie in 1..clip_length")

    @property
    def total_steps(self) -> int:
        return self.steps * self.epochs

    @property
    def inference_stride(self) -> int:
        return self.stride if self.stride is not None else max(1, self.clip_length // 2)


def sinusoidal_positions(length: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """The fixed encoding of "Attention is all you need": (length, dim), sin on even, cos on odd."""
    positions = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    frequencies = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device)
                            * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim + dim % 2, device=device)
    table[:, 0::2] = torch.sin(positions * frequencies)
    table[:, 1::2] = torch.cos(positions * frequencies)
    return table[:, :dim]


class TemporalEncoder(nn.Module):
    """Per-frame features (B, T, F) -> per-frame logits (B, T, classes), attending over the clip."""

    def __init__(self, feature_dim: int, config: TemporalConfig,
                 num_classes: int = schema.NUM_CLASSES) -> None:
        super().__init__()
        self.config = config
        # Frozen backbone features come at any scale; normalising them first keeps the projection's
        # starting point sensible whatever network produced them.
        self.input_norm = nn.LayerNorm(feature_dim)
        self.projection = nn.Linear(feature_dim, config.model_dim)
        self.learned_positions = (nn.Parameter(torch.zeros(config.clip_length, config.model_dim))
                                  if config.positional == LEARNED else None)
        if self.learned_positions is not None:
            nn.init.normal_(self.learned_positions, std=0.02)
        self.input_dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(config.model_dim, config.heads, config.feedforward_dim,
                                           config.dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        # Pre-norm layers leave their output unnormalised, hence the final LayerNorm; nested
        # tensors are off because they do not apply to pre-norm layers (and would warn).
        self.encoder = nn.TransformerEncoder(layer, config.layers, norm=nn.LayerNorm(config.model_dim),
                                             enable_nested_tensor=False)
        self.classifier = nn.Linear(config.model_dim, num_classes)

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """padding_mask (B, T) bool, True at padded positions: they are neither attended to nor
        able to change the other positions' outputs (their features are zeroed, so even NaN is
        harmless); their own logits are meaningless."""
        if features.ndim != 3:
            raise ValueError("features must have shape (clips, frames, features), got "
                             f"{tuple(features.shape)}")
        length = features.shape[1]
        if padding_mask is not None:
            if padding_mask.shape != features.shape[:2] or padding_mask.dtype != torch.bool:
                raise ValueError(f"padding_mask must be bool of shape {tuple(features.shape[:2])}, got "
                                 f"{padding_mask.dtype} {tuple(padding_mask.shape)}")
            features = features.masked_fill(padding_mask[..., None], 0.0)
        hidden = self.projection(self.input_norm(features))
        if self.learned_positions is not None:
            if length > self.learned_positions.shape[0]:
                raise ValueError(f"clips of {length} frames exceed the {self.learned_positions.shape[0]} "
                                 "learned positions")
            hidden = hidden + self.learned_positions[:length]
        else:
            hidden = hidden + sinusoidal_positions(length, hidden.shape[-1], hidden.device).to(hidden.dtype)
        hidden = self.encoder(self.input_dropout(hidden), src_key_padding_mask=padding_mask)
        return self.classifier(hidden)


class FrameSequences:
    """Per-frame features, labels (-1: ignore) and (video, frame) keys, ordered once by (video,
    frame), cut into clips of consecutive rows of one video.

    Clips are arrays of row indices into the inputs as given (not the sorted order), PADDING at
    the end of a clip shorter than clip_length. Rows are consecutive in frame order: a frame
    missing from the table is skipped over, not padded.
    """

    def __init__(self, features: Any, labels: Any, videos: Any, frames: Any, clip_length: int = 64) -> None:
        if isinstance(features, torch.Tensor):
            features = features.detach().to("cpu", torch.float32)
        else:
            # from_numpy shares the caller's array when it is float32 already: no second copy.
            features = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
        videos = np.asarray(videos)
        frames = np.asarray(frames)
        count = features.shape[0] if features.ndim == 2 else -1
        if count < 1 or labels.shape != (count,) or videos.shape != (count,) or frames.shape != (count,):
            raise ValueError(f"features {tuple(features.shape)} must be (frames, features) with at least "
                             f"one row, and labels {labels.shape}, videos {videos.shape} and frames "
                             f"{frames.shape} one value per row")
        if not np.issubdtype(labels.dtype, np.integer) or not np.issubdtype(frames.dtype, np.integer):
            raise ValueError(f"labels and frames must be integers, got {labels.dtype} and {frames.dtype}")
        invalid = (labels < schema.NO_LABEL) | (labels >= schema.NUM_CLASSES)
        if invalid.any():
            raise ValueError(f"labels must lie in {schema.NO_LABEL}..{schema.NUM_CLASSES - 1}; found "
                             f"{np.unique(labels[invalid])[:10].tolist()}")
        if not torch.isfinite(features).all():
            raise ValueError("features hold NaN or infinite values")
        if clip_length < 1:
            raise ValueError(f"clip_length must be at least 1, got {clip_length}")
        self.features = features
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.clip_length = int(clip_length)

        video_names, codes = np.unique(videos, return_inverse=True)
        codes = codes.reshape(-1)
        order = np.lexsort((frames, codes))
        sorted_codes, sorted_frames = codes[order], frames[order]
        repeated = np.flatnonzero((sorted_codes[1:] == sorted_codes[:-1])
                                  & (sorted_frames[1:] == sorted_frames[:-1]))
        if repeated.size:
            first = repeated[0]
            raise ValueError(f"video {video_names[sorted_codes[first]]!r} lists frame "
                             f"{sorted_frames[first]} more than once ({repeated.size} repeats)")
        self.order = order.astype(np.int64)
        """Row indices in (video, frame) order."""
        self.video_names = video_names
        self.video_starts = np.flatnonzero(np.append(True, sorted_codes[1:] != sorted_codes[:-1]))
        """Where each video's rows begin in `order`; `video_ends` where they end (exclusive)."""
        self.video_ends = np.append(self.video_starts[1:], count)
        labeled = np.add.reduceat((labels[order] != schema.NO_LABEL).astype(np.int64), self.video_starts)
        self.labeled_videos = np.flatnonzero(labeled > 0)
        """The videos training clips come from: those with at least one labeled frame."""

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.features.shape[1]

    def training_clips(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """`count` clips (count, clip_length) int64 from videos with a labeled frame.

        The start is uniform over every valid (video, start) pair, so a long video gives more clips;
        a video shorter than clip_length has one start and gives a padded clip.
        """
        if self.labeled_videos.size == 0:
            raise ValueError("no video has a labeled frame to train on")
        starts = self.video_starts[self.labeled_videos]
        lengths = self.video_ends[self.labeled_videos] - starts
        start_counts = np.maximum(lengths - self.clip_length + 1, 1)
        cumulative = np.cumsum(start_counts)
        draws = rng.integers(0, cumulative[-1], size=count)
        videos = np.searchsorted(cumulative, draws, side="right")
        first = starts[videos] + draws - (cumulative[videos] - start_counts[videos])
        return self._clips(first, starts[videos] + lengths[videos])

    def inference_clips(self, stride: int | None = None) -> np.ndarray:
        """Windows (windows, clip_length) int64 covering every row of every video at least once.

        Windows start every `stride` rows (default clip_length // 2), plus one ending at the video's
        last frame; a video shorter than clip_length is one padded window.
        """
        stride = max(1, self.clip_length // 2) if stride is None else int(stride)
        if not 1 <= stride <= self.clip_length:
            raise ValueError(f"stride must lie in 1..{self.clip_length}, got {stride}")
        firsts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        for start, end in zip(self.video_starts.tolist(), self.video_ends.tolist()):
            last = max(end - self.clip_length, start)
            window_starts = np.arange(start, last + 1, stride)
            if window_starts[-1] != last:
                window_starts = np.append(window_starts, last)
            firsts.append(window_starts)
            ends.append(np.full(window_starts.size, end))
        return self._clips(np.concatenate(firsts), np.concatenate(ends))

    def _clips(self, first: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Row indices of clips starting at sorted position `first`, padded from `end` on."""
        positions = first[:, None] + np.arange(self.clip_length)
        inside = positions < end[:, None]
        return np.where(inside, self.order[np.minimum(positions, len(self) - 1)], PADDING)

    def gather(self, clips: np.ndarray, device: torch.device | str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features (B, T, F), labels (B, T) with -1 at padding, padding (B, T) bool) of clips."""
        index = torch.as_tensor(clips, dtype=torch.int64)
        padding = index == PADDING
        rows = index.clamp(min=0)
        features = self.features[rows]
        labels = self.labels[rows].masked_fill(padding, schema.NO_LABEL)
        return features.to(device), labels.to(device), padding.to(device)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, padding: torch.Tensor | None = None,
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the frames with a label (not -1) that are not padding.

    A batch with no such frame gives 0 with zero gradients (not NaN), so a clip of -1 frames is
    harmless and every worker still takes part in the gradient average.
    """
    targets = labels if padding is None else labels.masked_fill(padding, schema.NO_LABEL)
    targets = targets.reshape(-1)
    summed = functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets,
                                      ignore_index=schema.NO_LABEL, reduction="sum",
                                      label_smoothing=label_smoothing)
    return summed / (targets != schema.NO_LABEL).sum().clamp(min=1)


class TemporalTrainer:
    """Trains a `TemporalEncoder` on `FrameSequences` with AdamW, one clip batch per step.

    With world_size > 1 every worker builds the same initial weights (from config.seed), draws its
    own clips (generator seeded by (seed, rank)), and averages gradients over `collectives` before
    each step, so the replicas stay identical. Dropout draws from the trainer's own generator,
    which `state_dict` saves with the rest: a resumed run continues bit for bit.
    """

    def __init__(self, config: TemporalConfig, sequences: FrameSequences,
                 collectives: Collectives | None = None, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu") -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if world_size > 1 and collectives is None:
            raise ValueError(f"world_size {world_size} needs collectives to average gradients over")
        if sequences.clip_length != config.clip_length:
            raise ValueError(f"the sequences cut clips of {sequences.clip_length} frames, the config "
                             f"asks for {config.clip_length}")
        self.config = config
        self.sequences = sequences
        self.collectives = collectives or Collectives()
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        # Module initialisers draw from the global CPU generator: seed it in a fork, so the weights
        # depend on config.seed alone and the caller's random state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(config.seed)
            self.model = TemporalEncoder(sequences.feature_dim, config).to(self.device)
        self._random_state = torch.Generator(self.device).manual_seed(config.seed * 1000 + rank).get_state()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.rng = np.random.default_rng([config.seed, rank])
        self.step = 0

    @contextlib.contextmanager
    def _own_random_state(self) -> Iterator[None]:
        """Run with this trainer's generator state (for dropout), leaving the global one untouched."""
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else [], device_type="cuda"):
            _set_device_random_state(self.device, self._random_state)
            yield
            self._random_state = _device_random_state(self.device)

    def train_step(self) -> float:
        """One optimizer step on a fresh batch of clips; returns this worker's loss."""
        clips = self.sequences.training_clips(self.rng, self.config.batch_clips)
        features, labels, padding = self.sequences.gather(clips, self.device)
        self.model.train()
        with self._own_random_state():
            logits = self.model(features, padding)
        loss = masked_cross_entropy(logits, labels, padding, self.config.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world_size > 1:
            average_gradients(list(self.model.parameters()), self.collectives)
        if self.config.gradient_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.gradient_clip)
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    def train_steps(self, count: int) -> list[float]:
        return [self.train_step() for _ in range(count)]

    def fit(self, on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
        """Train up to config.total_steps, from wherever `step` stands (a resumed run finishes its
        epoch first); returns each epoch's mean loss and calls on_epoch(epoch, mean_loss)."""
        means: list[float] = []
        while self.step < self.config.total_steps:
            epoch = self.step // self.config.steps
            remaining = (epoch + 1) * self.config.steps - self.step
            mean = float(np.mean(self.train_steps(remaining)))
            means.append(mean)
            if on_epoch is not None:
                on_epoch(epoch, mean)
        return means

    def state_dict(self) -> dict[str, Any]:
        """Everything to continue exactly, loadable with torch.load(weights_only=True). The clip and
        dropout generators are this worker's own: each worker saves and restores its state."""
        state = self.rng.bit_generator.state
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            # Big integers as strings: weights_only loading accepts no arbitrary Python ints > 64 bits.
            "rng": {"bit_generator": state["bit_generator"], "state": str(state["state"]["state"]),
                    "inc": str(state["state"]["inc"]), "has_uint32": int(state["has_uint32"]),
                    "uinteger": int(state["uinteger"])},
            "random_state": self._random_state.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        saved = state["rng"]
        self.rng.bit_generator.state = {
            "bit_generator": saved["bit_generator"],
            "state": {"state": int(saved["state"]), "inc": int(saved["inc"])},
            "has_uint32": int(saved["has_uint32"]), "uinteger": int(saved["uinteger"]),
        }
        self._random_state = state["random_state"].clone()


def _device_random_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_device_random_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def predict_sequences(model: nn.Module, sequences: FrameSequences, batch_clips: int = 16,
                      stride: int | None = None) -> np.ndarray:
    """Class probabilities (N, classes) float32, one row per input row in the input's order: the
    mean softmax over the inference windows covering the frame (padding never counts)."""
    if batch_clips < 1:
        raise ValueError(f"batch_clips must be at least 1, got {batch_clips}")
    windows = sequences.inference_clips(stride)
    device = next(model.parameters()).device
    sums: torch.Tensor | None = None
    counts = torch.zeros(len(sequences), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, windows.shape[0], batch_clips):
                clips = windows[start:start + batch_clips]
                features, _, padding = sequences.gather(clips, device)
                probabilities = torch.softmax(model(features, padding).float(), dim=-1).cpu()
                if sums is None:
                    sums = torch.zeros(len(sequences), probabilities.shape[-1], dtype=torch.float64)
                rows = torch.as_tensor(clips).reshape(-1)
                real = rows != PADDING
                sums.index_add_(0, rows[real], probabilities.reshape(rows.shape[0], -1)[real].double())
                counts.index_add_(0, rows[real], torch.ones(int(real.sum()), dtype=torch.float64))
    finally:
        model.train(was_training)
    return (sums / counts[:, None]).float().numpy()
