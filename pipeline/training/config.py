"""The typed training configuration: one recipe file per paper setup, `--set key=value` overrides.

Unknown keys and bad values fail before any work starts, with the key's path. The same config
runs in one process (`jobs.train`) and on Ray Train (`scaling.num_workers > 0`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline import config as typed
from pipeline.core.models import ModelConfig
from pipeline.methods.base import OptimizerConfig, find_method


@dataclass
class DataConfig:
    split: str = ""
    """The `jobs.split` output folder (local or s3://): labeled/, validation/, unlabeled/."""
    image_size: int = 112
    """Side of the square network input."""
    resize: int | None = None
    """Resize to this before a random crop of `image_size` (ABAW6: 256 -> 224); None: resize to
    `image_size` directly (ABAW5)."""
    labeled_batch: int = 32
    unlabeled_ratio: int = 1
    """µ: unlabeled images per labeled image in a step."""
    use_unlabeled: bool = True
    """False trains SSL methods without the unlabeled pool (for ablations)."""
    unlabeled_sources: list[str] = field(default_factory=list)
    """Restrict the unlabeled pool to these sources (empty: all of the pool)."""
    labeled_pseudo_labels: str | None = None
    """A `jobs.pseudolabel` output whose accepted rows join the labeled training set, labeled with
    their pseudo label (closing the loop). They are sampled like labeled rows but never enter the
    threshold update, which uses true labels only. Held in memory as JPEG bytes."""
    pseudo_labels_per_class: int | None = None
    """Cap on accepted pseudo-labeled rows per class (a seeded draw); None: all of them."""
    colour_jitter: float = 0.4
    """Strength of the weak view's brightness/contrast/saturation jitter (hue gets a quarter)."""
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0
    """Probability of random erasing in the strong view (the ABAW6 text adds it)."""
    shuffle_buffer: int = 4096
    """Unlabeled rows held for shuffling the stream."""
    unlabeled_reader: str = "auto"
    """How the unlabeled pool is read and decoded: in_process (this process reads its share of the
    files and decodes in a background thread), ray_data (Ray Data tasks decode and crop, the
    training process only consumes batches) or auto (ray_data on Ray Train, else in_process)."""
    decode_batch: int = 256
    """Rows per Ray Data decode task call (ray_data reader)."""
    decode_cpus: float = 1.0
    """CPUs each Ray Data decode task reserves (ray_data reader)."""
    max_undecodable_fraction: float = 0.01
    """The run fails, naming examples, once more than this share of the images drawn for training
    (labeled and unlabeled) did not decode; they are dropped from batches until then."""

    def __post_init__(self) -> None:
        typed.check(self.unlabeled_reader in ("auto", "in_process", "ray_data"), "data.unlabeled_reader",
                    "auto, in_process or ray_data")
        typed.check(self.decode_batch >= 1, "data.decode_batch", "must be at least 1")
        typed.check(self.decode_cpus > 0, "data.decode_cpus", "must be positive")
        typed.check(0.0 <= self.max_undecodable_fraction <= 1.0, "data.max_undecodable_fraction",
                    "must be between 0 and 1")
        typed.check(self.image_size >= 16, "data.image_size", "must be at least 16")
        typed.check(self.resize is None or self.resize >= self.image_size, "data.resize",
                    "must be at least data.image_size")
        typed.check(self.labeled_batch >= 1, "data.labeled_batch", "must be at least 1")
        typed.check(self.unlabeled_ratio >= 0, "data.unlabeled_ratio", "must be >= 0")


@dataclass
class EvaluationConfig:
    windows: list[int] = field(default_factory=lambda: [10])
    """Sliding-window sizes reported for smoothed validation macro-F1 (ABAW5: 10, ABAW6: 30)."""
    mode: str = "centred"
    """centred or block."""
    batch_size: int = 128
    every_epochs: int = 1
    halves_seed: int = 0
    """Seed of the split of the validation videos into a selection half (best epoch, defaults,
    searches choose on it) and a report half (the figure to report)."""

    def __post_init__(self) -> None:
        typed.check(self.mode in ("centred", "block"), "evaluation.mode", "centred or block")
        typed.check(all(window >= 1 for window in self.windows), "evaluation.windows", "all >= 1")


COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")


@dataclass
class RunConfig:
    name: str = "run"
    storage: str = "runs"
    """Folder (local or s3://) under which `<name>/` holds checkpoints and metrics."""
    epochs: int = 10
    steps_per_epoch: int = 1000
    seed: int = 0
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""
    precision: str = "fp32"
    """fp32 or bf16."""
    checkpoints_to_keep: int = 2
    resume: bool = True
    """Continue from the latest checkpoint of the same run name if there is one."""
    threads: int | None = None
    """torch intra-op threads for this process (None: torch's default). On small shared CPU
    machines 1 thread per process, with processes side by side, is the fastest arrangement."""
    tf32: bool = True
    """On CUDA, fp32 matmuls and convolutions in TF32 (about 10 significant bits, 8x the fp32 rate on
    tensor cores); bf16 recipes are unaffected. false keeps full fp32."""
    cudnn_benchmark: bool = True
    """On CUDA, let cuDNN time its algorithms for each new shape and keep the fastest (a faster step,
    not bit-for-bit repeatable across restarts; see the README's resume notes)."""
    compile: str = "off"
    """off, or a torch.compile backend (inductor, the default one; aot_eager, eager to debug): the
    networks the optimizers train are compiled in place after the method is built (so after the
    EMA copy), which keeps their state dicts and checkpoints unchanged."""
    log_every_steps: int = 100
    """Every this many steps, rank 0 prints a progress line (step/total, the mean loss so far,
    images/s, the epoch's ETA, the pseudo-label acceptance so far) and a non-finite loss stops the
    run; with `log_every_seconds`, the only times a step's values are read back to the host before
    the epoch ends. 0: off."""
    log_every_seconds: float = 30.0
    """Also print that line when this many seconds passed since the last one (a real epoch is
    thousands of steps; a log must show the run is alive). 0: off."""

    def __post_init__(self) -> None:
        typed.check(self.epochs >= 1, "run.epochs", "must be at least 1")
        typed.check(self.log_every_steps >= 0, "run.log_every_steps", "must be >= 0")
        typed.check(self.log_every_seconds >= 0, "run.log_every_seconds", "must be >= 0")
        typed.check(self.steps_per_epoch >= 1, "run.steps_per_epoch", "must be at least 1")
        typed.check(self.device in ("auto", "cpu", "cuda"), "run.device", "auto, cpu or cuda")
        typed.check(self.precision in ("fp32", "bf16"), "run.precision", "fp32 or bf16")
        typed.check(self.compile == "off" or self.compile in COMPILE_BACKENDS, "run.compile",
                    f"off or one of {', '.join(COMPILE_BACKENDS)}")


@dataclass
class ScalingConfig:
    num_workers: int = 0
    """0: one process (no Ray Train); N: N Ray Train workers."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 3
    gradient_bucket_megabytes: float = 25.0
    """With several workers, gradients are averaged in buckets of about this size, each sent as
    soon as backward has filled it (overlapping the transfer with the rest of backward); 0 sends
    them all in one collective after backward, the plain form."""

    epoch_rule: str = "steps"
    """What N workers keep from one process's run. steps: every worker takes run.steps_per_epoch
    steps of data.labeled_batch, so the global batch is N times one process's and an epoch covers N
    times the images (epochs get no longer, they see more). images: an epoch covers the images of
    one process's epoch, each worker taking ceil(run.steps_per_epoch / N) steps (epochs get about N
    times shorter). Either way each step's global batch is N x data.labeled_batch."""
    lr_rule: str = "none"
    """How the learning rates follow the N-times global batch: none (as configured), linear (x N,
    Goyal et al.'s rule for SGD, with warm-up) or sqrt (x sqrt(N), the usual choice for Adam). Every
    optimizer of the method is scaled, its own rates (the feedback teacher's, say) included."""

    def __post_init__(self) -> None:
        if self.gradient_bucket_megabytes < 0:
            raise typed.ConfigError(f"scaling.gradient_bucket_megabytes must be >= 0, got "
                                    f"{self.gradient_bucket_megabytes}")
        typed.check(self.epoch_rule in ("steps", "images"), "scaling.epoch_rule", "steps or images")
        typed.check(self.lr_rule in ("none", "linear", "sqrt"), "scaling.lr_rule", "none, linear or sqrt")

    def steps_per_worker(self, steps_per_epoch: int, world_size: int) -> int:
        """Steps each of `world_size` workers takes per epoch (see epoch_rule)."""
        if self.epoch_rule == "images" and world_size > 1:
            return max(1, math.ceil(steps_per_epoch / world_size))
        return steps_per_epoch

    def learning_rate_factor(self, world_size: int) -> float:
        """The factor on every learning rate for `world_size` workers (see lr_rule)."""
        if self.lr_rule == "linear":
            return float(world_size)
        if self.lr_rule == "sqrt":
            return math.sqrt(world_size)
        return 1.0


@dataclass
class TrainConfig:
    method: str = "supervised"
    method_options: dict[str, Any] = field(default_factory=dict)
    """Options of the chosen method (validated against its own Options dataclass)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    run: RunConfig = field(default_factory=RunConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    def method_class(self):
        return find_method(self.method)

    def options(self):
        """The method's typed options (unknown keys fail with `method_options.<key>`)."""
        return typed.from_mapping(self.method_class().Options, self.method_options, "method_options")

    @property
    def total_steps(self) -> int:
        return self.run.epochs * self.run.steps_per_epoch


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], value parsed as YAML, so numbers/bools/lists work)."""
    if "=" not in text:
        raise typed.ConfigError(f"--set {text!r}: expected key=value")
    key, value = text.split("=", 1)
    if not key.strip():
        raise typed.ConfigError(f"--set {text!r}: empty key")
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(mapping: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    result = copy.deepcopy(mapping)
    for override in overrides:
        path, value = parse_override(override)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise typed.ConfigError(f"--set {override!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return result


def recipe_mapping(path: str | None = None, overrides: list[str] | None = None,
                   base: dict[str, Any] | None = None) -> dict[str, Any]:
    """`base`, updated by the recipe YAML at `path`, then the `--set` overrides (not yet typed)."""
    mapping: dict[str, Any] = dict(base or {})
    if path:
        with open(path) as handle:
            loaded = yaml.safe_load(handle) or {}
        if not isinstance(loaded, dict):
            raise typed.ConfigError(f"{path}: a recipe must be a mapping")
        mapping.update(loaded)
    return apply_overrides(mapping, overrides or [])


def load_config(path: str | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> TrainConfig:
    """Recipe YAML (or `base`) + overrides -> a validated TrainConfig."""
    config = typed.from_mapping(TrainConfig, recipe_mapping(path, overrides, base))
    config.options()  # validate the method's own options now, not mid-run
    needs = config.method_class().views
    typed.check(not needs.unlabeled_required
                or (config.data.use_unlabeled and config.data.unlabeled_ratio > 0),
                "data.use_unlabeled", f"{config.method} learns from unlabeled images and cannot run "
                "without them (needs data.use_unlabeled=true and data.unlabeled_ratio > 0)")
    return config


RETIRED_KEYS: tuple[tuple[str, str], ...] = (
    ("data", "decode_threads"),  # never read by the loop; removed 2026-11-23
)
"""Keys older checkpoints carry in their saved config that no longer exist. Only checkpoint
configs drop them (`without_retired_keys`); a recipe that sets one still fails loudly."""


def without_retired_keys(mapping: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(mapping)
    for section, key in RETIRED_KEYS:
        if isinstance(result.get(section), dict):
            result[section].pop(key, None)
    return result


def to_mapping(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
