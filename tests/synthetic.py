"""Shared helpers of the method tests: synthetic colour-blob images and labels, their views and batches,
tiny method contexts, and the training and scoring loop of the learning checks."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import nn

from pipeline.core.models import ModelConfig
from pipeline.methods.base import Collectives, Method, MethodContext, OptimizerConfig, StepResult, TrainBatch

CLASSES = 4


# ------------------------------------------------------------------------- stubs and contexts

class FixedLogits(nn.Module):
    """Returns its own parameter whatever the input: known logits, and one gradient row per sample."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.shape[0] == self.logits.shape[0]
        return self.logits


class StubBackbone(nn.Module):
    """A stand-in timm feature extractor with one linear classifier `fc` on average-pooled maps; its
    feature maps are the images themselves, or with ramp the images times a horizontal ramp (column
    w weighs w + 1), which is not flip-equivariant."""

    def __init__(self, channels: int, classes: int, ramp: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, classes)
        self.num_features = channels
        self.ramp = ramp

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        if not self.ramp:
            return images
        return images * torch.arange(1, images.shape[-1] + 1, dtype=images.dtype)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3))
        return pooled if pre_logits else self.fc(pooled)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


@dataclass
class StubContext(MethodContext):
    """A context whose create_model hands out the given networks first (a stub, say), in order."""

    networks: list = field(default_factory=list)

    def create_model(self, config: ModelConfig | None = None) -> nn.Module:
        return self.networks.pop(0) if self.networks else super().create_model(config)


def make_context(backbone: str = "test_resnet", total_steps: int = 100, lr: float = 1e-3, *,
                 optimizer: OptimizerConfig | None = None, context_class: type = MethodContext,
                 **fields) -> MethodContext:
    """A CPU context for CLASSES classes; `optimizer` replaces OptimizerConfig(lr=lr), `fields` go
    to `context_class` (networks=[...] for a StubContext, collectives=...)."""
    return context_class(model=ModelConfig(backbone=backbone, channels_last=False, num_classes=CLASSES),
                         optimizer=optimizer or OptimizerConfig(lr=lr), total_steps=total_steps,
                         num_classes=CLASSES, **fields)


def build_method(method_class: type, networks=(), collectives: Collectives | None = None,
                 optimizer: OptimizerConfig | None = None, total_steps: int = 10, seed: int = 0,
                 **options) -> Method:
    """`method_class` with `method_class.Options(**options)` on the test ResNet, seeded with `seed`;
    its first networks are `networks`."""
    torch.manual_seed(seed)
    context = make_context(total_steps=total_steps, optimizer=optimizer, context_class=StubContext,
                           networks=list(networks), collectives=collectives or Collectives())
    return method_class(method_class.Options(**options), context)


def save_and_load(state: dict) -> dict:
    """`state` after a trip through torch.save and torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def resume_and_step(build: Callable[[], Method], next_batch: Callable[[], TrainBatch], steps: int = 2,
                    before_save: Callable[[Method], None] | None = None
                    ) -> tuple[Method, Method, StepResult, StepResult]:
    """Trains build() (torch seed 0) for `steps` steps, then before_save(it); loads its saved state
    into a twin built under seed 123; steps both on one batch: (method, twin, result, twin's result)."""
    torch.manual_seed(0)
    method = build()
    for step in range(steps):
        method.train_step(next_batch(), step)
    if before_save is not None:
        before_save(method)
    state = save_and_load(method.state_dict())
    torch.manual_seed(123)
    twin = build()
    twin.load_state_dict(state)
    batch = next_batch()
    return method, twin, method.train_step(batch, steps), twin.train_step(batch, steps)


# ------------------------------------------------------------------------- random batches

def random_batch(generator: torch.Generator, labeled: int = 8, unlabeled: int = 0, *, size: int = 32,
                 strong_noise: float | None = None, cycle_labels: bool = False) -> TrainBatch:
    """Gaussian-noise images of `size` pixels: `labeled` labeled ones (random labels, or 0, 1, 2, ...
    with cycle_labels), a labeled strong view `strong_noise` times more noise away when given, and
    `unlabeled` unlabeled weak and strong ones (drawn independently) when nonzero."""
    weak = torch.randn(labeled, 3, size, size, generator=generator)
    if cycle_labels:
        labels = torch.arange(labeled) % CLASSES
    else:
        labels = torch.randint(0, CLASSES, (labeled,), generator=generator)
    batch = TrainBatch(labeled_weak=weak, labels=labels)
    if strong_noise is not None:
        batch.labeled_strong = weak + strong_noise * torch.randn(weak.shape, generator=generator)
    if unlabeled:
        batch.unlabeled_weak = torch.randn(unlabeled, 3, size, size, generator=generator)
        batch.unlabeled_strong = torch.randn(unlabeled, 3, size, size, generator=generator)
    return batch


def seeded_batch(seed: int, labeled: int = 8, unlabeled: int = 8) -> TrainBatch:
    """random_batch with cycled labels and unlabeled images, from a generator seeded with `seed`."""
    return random_batch(torch.Generator().manual_seed(seed), labeled, unlabeled, cycle_labels=True)


# --------------------------------------------------------------------------- colour blobs

def class_colours(bright: float = 1.0) -> torch.Tensor:
    """(CLASSES, 3) RGB offsets: red, green, blue and yellow, `bright` on and -1 off."""
    return torch.tensor([[bright, -1.0, -1.0], [-1.0, bright, -1.0], [-1.0, -1.0, bright],
                         [bright, bright, -1.0]])


def make_blobs(count: int, generator: torch.Generator, size: int = 32, noise: float = 1.5, radius: int = 6
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images and labels (the classes equally often, shuffled): a disc of the class's colour
    at a random place, under Gaussian noise."""
    labels = (torch.arange(count) % CLASSES)[torch.randperm(count, generator=generator)]
    centres = torch.randint(radius, size - radius, (count, 2), generator=generator).float()
    grid = torch.arange(size).float()
    inside = ((grid[None, :, None] - centres[:, 0, None, None]) ** 2
              + (grid[None, None, :] - centres[:, 1, None, None]) ** 2) <= radius ** 2
    images = noise * torch.randn(count, 3, size, size, generator=generator)
    return images + inside[:, None] * class_colours()[labels][:, :, None, None], labels


def colour_blobs(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """32x32 unit-noise images of the given labels, each with a small bright disc (radius 3) of its
    class colour near the middle; other random draws than make_blobs."""
    count = labels.shape[0]
    images = torch.randn(count, 3, 32, 32, generator=generator)
    rows, columns = torch.arange(32).view(1, 32, 1), torch.arange(32).view(1, 1, 32)
    centre_row = torch.randint(8, 24, (count, 1, 1), generator=generator)
    centre_column = torch.randint(8, 24, (count, 1, 1), generator=generator)
    inside = ((rows - centre_row) ** 2 + (columns - centre_column) ** 2 <= 9).unsqueeze(1)
    return torch.where(inside, images + class_colours(1.5)[labels].view(count, 3, 1, 1), images)


def flip_labels(labels: torch.Tensor, share: float, generator: torch.Generator) -> None:
    """Relabels a share `share` of `labels`, in place, each to another class at random."""
    count = int(share * len(labels))
    chosen = torch.randperm(len(labels), generator=generator)[:count]
    offsets = torch.randint(1, CLASSES, (count,), generator=generator)
    labels[chosen] = (labels[chosen] + offsets) % CLASSES


# ------------------------------------------------------------------------------------ views

def weak_view(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random horizontal flip per image, then one random shift of up to 2 pixels for the batch."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images.roll(torch.randint(-2, 3, (2,), generator=generator).tolist(), dims=(2, 3))


def strong_view(weak: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Photometric changes and erasing on the weak view's geometry, as the input path makes it."""
    images = weak + 0.5 * torch.randn(weak.shape, generator=generator)
    images = images * (0.7 + 0.6 * torch.rand(len(weak), 3, 1, 1, generator=generator))
    top, left = torch.randint(0, 22, (2,), generator=generator).tolist()
    images[:, :, top:top + 10, left:left + 10] = 0.0
    return images


def independent_strong_view(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A strong view with a weak view of its own: flip and shift, scale, noise and an 8x8 erasing."""
    scale = 0.6 + 0.8 * torch.rand(images.shape[0], 1, 1, 1, generator=generator)
    images = weak_view(images, generator) * scale + 0.5 * torch.randn(images.shape, generator=generator)
    top, left = torch.randint(0, 24, (2,), generator=generator).tolist()
    images[:, :, top:top + 8, left:left + 8] = 0
    return images


# ---------------------------------------------------------------------------------- batches

def blob_batch(generator: torch.Generator, labeled: torch.Tensor, labels: torch.Tensor,
               batch_size: int = 16, unlabeled: torch.Tensor | None = None,
               labeled_strong: bool = False) -> TrainBatch:
    """A batch drawn with replacement: weak views of labeled images, with a strong view of those
    (labeled_strong) or weak and strong views of as many `unlabeled` images."""
    chosen = torch.randint(0, len(labeled), (batch_size,), generator=generator)
    if unlabeled is None:
        weak = weak_view(labeled[chosen], generator)
        return TrainBatch(labeled_weak=weak, labels=labels[chosen],
                          labeled_strong=strong_view(weak, generator) if labeled_strong else None)
    drawn = torch.randint(0, len(unlabeled), (batch_size,), generator=generator)
    unlabeled_weak = weak_view(unlabeled[drawn], generator)
    return TrainBatch(labeled_weak=weak_view(labeled[chosen], generator), labels=labels[chosen],
                      unlabeled_weak=unlabeled_weak, unlabeled_strong=strong_view(unlabeled_weak, generator))


class ColourBlobProblem(NamedTuple):
    labels: torch.Tensor
    labeled: torch.Tensor
    unlabeled: torch.Tensor
    test_labels: torch.Tensor
    test_images: torch.Tensor


def colour_blob_problem(generator: torch.Generator) -> ColourBlobProblem:
    """8 labeled colour_blobs per class, 200 unlabeled and 400 test ones."""
    labels = torch.arange(CLASSES).repeat(8)
    labeled = colour_blobs(labels, generator)
    unlabeled = colour_blobs(torch.randint(0, CLASSES, (200,), generator=generator), generator)
    test_labels = torch.randint(0, CLASSES, (400,), generator=generator)
    return ColourBlobProblem(labels, labeled, unlabeled, test_labels, colour_blobs(test_labels, generator))


def colour_blob_batch(problem: ColourBlobProblem, generator: torch.Generator,
                      batch_size: int = 16) -> TrainBatch:
    """`batch_size` distinct labeled images and as many unlabeled ones (with replacement), the
    unlabeled strong view made independently of the weak one."""
    chosen = torch.randperm(problem.labels.shape[0], generator=generator)[:batch_size]
    unlabeled = problem.unlabeled
    drawn = unlabeled[torch.randint(0, unlabeled.shape[0], (batch_size,), generator=generator)]
    return TrainBatch(labeled_weak=weak_view(problem.labeled[chosen], generator),
                      labels=problem.labels[chosen], unlabeled_weak=weak_view(drawn, generator),
                      unlabeled_strong=independent_strong_view(drawn, generator))


# ------------------------------------------------------------------------- learning checks

def train(method: Method, steps: int, next_batch: Callable[[], TrainBatch],
          on_epoch: Callable[[int], None] | None = None, epoch_steps: int = 20) -> list[StepResult]:
    """`steps` train steps on `next_batch()`, calling on_epoch(epoch) after every `epoch_steps`."""
    results = []
    for step in range(steps):
        results.append(method.train_step(next_batch(), step))
        if on_epoch is not None and (step + 1) % epoch_steps == 0:
            on_epoch((step + 1) // epoch_steps)
    return results


def accuracy(method: Method, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (method.predict(images).argmax(dim=1) == labels).float().mean().item()


def refresh_thresholds(method: Method, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> None:
    """The loop's per-epoch threshold pass: the threshold network, in eval mode, on `images`."""
    network = method.threshold_model()
    was_training = network.training
    with torch.no_grad():
        probabilities = network.eval()(images).float().softmax(dim=1)
    network.train(was_training)
    method.update_thresholds(method.threshold_statistics(probabilities, labels), epoch)


def train_and_score(build: Callable[[int], Method], seed: int, steps: int, *, labeled_per_class: int = 8,
                    unlabeled: int = 0, flipped: float | None = None, labeled_strong: bool = False,
                    thresholds: bool = False, batch_size: int = 16) -> float:
    """Held-out accuracy on 200 make_blobs after `steps` steps of build(steps) on `labeled_per_class`
    labeled blobs per class (a share `flipped` of them relabeled; None skips that draw) and
    `unlabeled` unlabeled ones; thresholds: a threshold pass every 20 steps."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    labeled, labels = make_blobs(labeled_per_class * CLASSES, generator)
    unlabeled_images = make_blobs(unlabeled, generator)[0] if unlabeled else None
    if flipped is not None:
        flip_labels(labels, flipped, generator)
    held_out, held_out_labels = make_blobs(200, generator)
    method = build(steps)
    train(method, steps,
          lambda: blob_batch(generator, labeled, labels, batch_size, unlabeled_images, labeled_strong),
          on_epoch=(lambda epoch: refresh_thresholds(method, labeled, labels, epoch)) if thresholds else None)
    return accuracy(method, held_out, held_out_labels)


# ------------------------------------------------------------------ Gaussian clusters (SSL gain)
#
# The learning checks of the SSL methods need a problem on which the unlabeled data measurably
# helps, so that each can be compared with the same run with its unlabeled part switched off.
# Colour blobs on the test ResNet are learned from the labels alone; here a few labels leave a
# linear classifier far from the best one, while the unlabeled points show where the clusters are:
# the cluster assumption every pseudo-labeling method rests on. Images are (D, 1, 1) "pictures"
# read by StubBackbone (a linear layer on them), so hundreds of steps take about a second.

CLUSTER_DIMENSIONS = 32
CLUSTER_DISTANCE = 4.5
"""Each class mean is CLUSTER_DISTANCE along its own axis, under unit Gaussian noise in
CLUSTER_DIMENSIONS dimensions: a linear model knowing the means scores about 0.99; one fitted to
two labeled points per class about 0.7, because the 32-dimensional noise of so few points tilts it."""


class ClusterProblem(NamedTuple):
    labels: torch.Tensor
    labeled: torch.Tensor
    unlabeled: torch.Tensor
    test_labels: torch.Tensor
    test_images: torch.Tensor
    unlabeled_labels: torch.Tensor
    """The hidden labels of `unlabeled` (for scoring pseudo labels only; never trained on)."""


def cluster_problem(seed: int, labeled_per_class: int = 2, unlabeled: int = 2000, test: int = 2000,
                    flipped: float = 0.0) -> ClusterProblem:
    """Gaussian clusters, one per class; a share `flipped` of the labeled points is relabeled."""
    generator = torch.Generator().manual_seed(seed)
    means = CLUSTER_DISTANCE * torch.eye(CLASSES, CLUSTER_DIMENSIONS)

    def draw(labels: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(len(labels), CLUSTER_DIMENSIONS, generator=generator)
        return (means[labels] + noise).view(-1, CLUSTER_DIMENSIONS, 1, 1)

    labels = torch.arange(CLASSES).repeat(labeled_per_class)
    labeled = draw(labels)
    if flipped:
        flip_labels(labels, flipped, generator)
    unlabeled_labels = torch.randint(0, CLASSES, (unlabeled,), generator=generator)
    unlabeled_images = draw(unlabeled_labels)
    test_labels = torch.randint(0, CLASSES, (test,), generator=generator)
    return ClusterProblem(labels, labeled, unlabeled_images, test_labels, draw(test_labels), unlabeled_labels)


def cluster_network() -> StubBackbone:
    return StubBackbone(CLUSTER_DIMENSIONS, CLASSES)


def cluster_batch(problem: ClusterProblem, generator: torch.Generator, *, use_unlabeled: bool = True,
                  labeled_batch: int | None = None, unlabeled_batch: int = 64,
                  labeled_strong: bool = False) -> TrainBatch:
    """Weak views (0.1 noise) of `labeled_batch` labeled points (all of them when None) and, with
    use_unlabeled, weak and strong (0.7 noise) views of `unlabeled_batch` unlabeled points drawn
    with replacement; the generator draws the same numbers either way, so a run without the
    unlabeled data sees exactly the labeled batches of the run with it."""
    count = len(problem.labels)
    chosen = (torch.arange(count) if labeled_batch is None
              else torch.randperm(count, generator=generator)[:labeled_batch])
    weak = problem.labeled[chosen] + 0.1 * torch.randn(problem.labeled[chosen].shape, generator=generator)
    strong = weak + 0.5 * torch.randn(weak.shape, generator=generator)
    drawn = problem.unlabeled[torch.randint(0, len(problem.unlabeled), (unlabeled_batch,), generator=generator)]
    unlabeled_weak = drawn + 0.1 * torch.randn(drawn.shape, generator=generator)
    unlabeled_strong = drawn + 0.7 * torch.randn(drawn.shape, generator=generator)
    return TrainBatch(labeled_weak=weak, labels=problem.labels[chosen],
                      labeled_strong=strong if labeled_strong else None,
                      unlabeled_weak=unlabeled_weak if use_unlabeled else None,
                      unlabeled_strong=unlabeled_strong if use_unlabeled else None)


def cluster_accuracy(build: Callable[[], Method], seed: int, *, steps: int = 150, use_unlabeled: bool = True,
                     threshold_every: int = 10, **problem_and_batch) -> float:
    """Test accuracy of build() (torch seeded with `seed`) after `steps` steps on cluster_problem(seed),
    with the loop's threshold pass (the threshold network on the labeled set) every
    `threshold_every` steps for methods that have thresholds."""
    problem_keys = {"labeled_per_class", "flipped"}
    problem = cluster_problem(seed, **{key: value for key, value in problem_and_batch.items()
                                       if key in problem_keys})
    batch_options = {key: value for key, value in problem_and_batch.items() if key not in problem_keys}
    generator = torch.Generator().manual_seed(1000 + seed)
    torch.manual_seed(seed)
    method = build()
    for step in range(steps):
        method.train_step(cluster_batch(problem, generator, use_unlabeled=use_unlabeled, **batch_options), step)
        if (step + 1) % threshold_every == 0 and method.thresholds() is not None:
            refresh_thresholds(method, problem.labeled, problem.labels, (step + 1) // threshold_every)
    return accuracy(method, problem.test_images, problem.test_labels)


def cluster_method(method_class: type, lr: float = 0.05, steps: int = 150, optimizer_name: str = "adam",
                   networks: int = 1, **options) -> Callable[[], Method]:
    """A builder of `method_class` on cluster networks (one per network the method makes)."""
    def build() -> Method:
        context = make_context(optimizer=OptimizerConfig(name=optimizer_name, lr=lr), total_steps=steps,
                               context_class=StubContext,
                               networks=[cluster_network() for _ in range(networks)])
        return method_class(method_class.Options(**options), context)
    return build


def with_and_without_unlabeled(build: Callable[[], Method], seeds, **options
                               ) -> tuple[list[float], list[float], list[float]]:
    """cluster_accuracy of build() on each seed with the unlabeled data and without it (the same
    seeds, labeled batches and steps): (with, without, paired gains)."""
    with_unlabeled = [cluster_accuracy(build, seed, **options) for seed in seeds]
    without = [cluster_accuracy(build, seed, use_unlabeled=False, **options) for seed in seeds]
    return with_unlabeled, without, [left - right for left, right in zip(with_unlabeled, without)]
