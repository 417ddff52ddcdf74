"""RandAugment for image batches: batched torch ops on whatever device the batch is on (timm's
`rand-m9-mstd0.5-inc1` semantics, each sample drawing its own ops and magnitudes), and timm's
per-image PIL RandAugment, guarded against Pillow 13's posterize crash, as the CPU reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN
from timm.data.auto_augment import rand_augment_transform

from pipeline.core import devices

# ITU-R 601 luma, the weights of Pillow's convert("L") that ImageEnhance blends towards.
LUMA = (0.299, 0.587, 0.114)
# timm's magnitude scale: level = magnitude / 10, and magnitudes are clipped to [0, 10].
MAGNITUDE_SCALE = 10.0


def _per_sample(parameter: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return parameter.to(images.device, images.dtype).view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ImageEnhance: degenerate + factor * (image - degenerate), clipped to [0, 1]."""
    return torch.lerp(degenerate, images, _per_sample(factor, images)).clamp_(0.0, 1.0)


def grey(images: torch.Tensor) -> torch.Tensor:
    """Luma of an (N, 3, H, W) batch in [0, 1], shape (N, 1, H, W)."""
    weights = devices.constant(LUMA, images.device, images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


# Colour ops: (N, 3, H, W) floats in [0, 1] and one parameter per sample, Pillow's meaning.

def brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * _per_sample(factor, images)).clamp_(0.0, 1.0)


def colour(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(grey(images).expand_as(images), images, factor)


def contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # Pillow blends towards the mean grey level (it rounds that mean to an integer level; we do not).
    mean = grey(images).mean((2, 3), keepdim=True)
    return _blend(mean.expand_as(images), images, factor)


def sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # Pillow's SMOOTH kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 inside the one-pixel border,
    # which keeps its pixels (as Pillow). Separable box sums: ~8x faster than a depthwise conv2d on CPU.
    rows = images[:, :, :, :-2] + images[:, :, :, 1:-1] + images[:, :, :, 2:]
    box = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]
    degenerate = images.clone()
    degenerate[:, :, 1:-1, 1:-1] = (box + 4.0 * images[:, :, 1:-1, 1:-1]) / 13.0
    return _blend(degenerate, images, factor)


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert values at or above `threshold` (in [0, 1]; above 1 leaves the image unchanged)."""
    return torch.where(images >= _per_sample(threshold, images), 1.0 - images, images)


def solarize_add(images: torch.Tensor, addition: torch.Tensor) -> torch.Tensor:
    """Add `addition` to values below the middle grey level 128/255, as timm's SolarizeAdd."""
    added = (images + _per_sample(addition, images)).clamp_(max=1.0)
    return torch.where(images < 128 / 255, added, images)


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` bits of each 8-bit level; bits are clamped to [1, 8] so a magnitude-10
    draw (0 bits in timm's increasing scale) is the strongest posterize, never a crash or black image."""
    step = torch.exp2(8.0 - bits.clamp(1, 8).to(torch.float32))
    step = _per_sample(step, images)
    levels = (images * 255.0).round_()
    return (levels - torch.remainder(levels, step)).div_(255.0)


def auto_contrast(images: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to [0, 1]; flat channels are left alone (as Pillow)."""
    low = images.amin((2, 3), keepdim=True)
    high = images.amax((2, 3), keepdim=True)
    flat = high <= low
    scale = torch.where(flat, torch.ones_like(high), 1.0 / (high - low).clamp_(min=1e-6))
    low = torch.where(flat, torch.zeros_like(low), low)
    return ((images - low) * scale).clamp_(0.0, 1.0)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """Pillow's per-channel histogram equalisation, batched: one bincount over every (image,
    channel) histogram. Exact on the 8-bit grid (inputs are rounded to 256 levels first)."""
    count, channels, height, width = images.shape
    levels = (images.contiguous() * 255.0).round_().clamp_(0, 255).long()
    levels = levels.reshape(count * channels, height * width)
    offsets = torch.arange(count * channels, device=images.device).view(-1, 1) * 256
    bins = (levels + offsets).view(-1)
    if images.device.type == "cpu":
        histogram = torch.bincount(bins, minlength=count * channels * 256)
    else:
        # A device bincount reads the largest bin back to size its output (a host wait); the
        # size is known, so count with index_add instead.
        histogram = torch.zeros(count * channels * 256, dtype=torch.int64, device=images.device)
        histogram.index_add_(0, bins, torch.ones_like(bins))
    histogram = histogram.view(count * channels, 256)
    last_used = 255 - (histogram > 0).flip(1).int().argmax(1, keepdim=True)
    step = (histogram.sum(1, keepdim=True) - histogram.gather(1, last_used)) // 255
    lookup = (histogram.cumsum(1) + step // 2) // step.clamp(min=1)
    lookup = F.pad(lookup, (1, 0))[:, :-1].clamp_(0, 255)
    identity = torch.arange(256, device=images.device).expand_as(lookup)
    lookup = torch.where(step == 0, identity, lookup)
    return lookup.gather(1, levels).view(count, channels, height, width).to(images.dtype).div_(255.0)


def invert(images: torch.Tensor) -> torch.Tensor:
    return 1.0 - images


# Geometric ops: per-sample 3x3 matrices in pixel coordinates mapping an output point to the
# input point it samples (Pillow's Image.transform(AFFINE) convention, pixel i spans [i, i + 1]).

def _matrices(rows: list[list[torch.Tensor | float]], like: torch.Tensor) -> torch.Tensor:
    count = like.shape[0]
    filled = [[entry if torch.is_tensor(entry) else like.new_full((count,), float(entry))
               for entry in row] for row in rows]
    return torch.stack([torch.stack(row, -1) for row in filled], -2)


def rotation_matrix(degrees: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Counter-clockwise rotation about the image centre, as Pillow's Image.rotate."""
    angle = torch.deg2rad(-degrees.double())
    cos, sin = torch.cos(angle), torch.sin(angle)
    centre_x, centre_y = width / 2.0, height / 2.0
    return _matrices([[cos, sin, centre_x - cos * centre_x - sin * centre_y],
                      [-sin, cos, centre_y + sin * centre_x - cos * centre_y],
                      [0, 0, 1]], angle)


def shear_x_matrix(factor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # About the top-left corner, as timm and torchvision's RandAugment (the TF reference).
    return _matrices([[1, factor.double(), 0], [0, 1, 0], [0, 0, 1]], factor.double())


def shear_y_matrix(factor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return _matrices([[1, 0, 0], [factor.double(), 1, 0], [0, 0, 1]], factor.double())


def translate_x_matrix(fraction: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Sample `fraction` of the width to the right: positive moves the content left."""
    return _matrices([[1, 0, fraction.double() * width], [0, 1, 0], [0, 0, 1]], fraction.double())


def translate_y_matrix(fraction: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return _matrices([[1, 0, 0], [0, 1, fraction.double() * height], [0, 0, 1]], fraction.double())


def normalised_theta(matrices: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel-space (N, 3, 3) matrices as grid_sample's (N, 2, 3) thetas in normalised coordinates;
    on the host, where the matrices are drawn (a device matrix inverse checks its result on the
    host)."""
    to_pixels = matrices.new_tensor([[width / 2, 0, width / 2], [0, height / 2, height / 2], [0, 0, 1]])
    to_normalised = torch.linalg.inv(to_pixels)
    return (to_normalised @ matrices @ to_pixels)[:, :2]


def affine(images: torch.Tensor, matrices: torch.Tensor, fill: tuple[float, float, float]
           ) -> torch.Tensor:
    """Warp each image by its pixel-space matrix in one grid_sample; outside pixels get `fill`."""
    _, _, height, width = images.shape
    theta = devices.to_device(normalised_theta(matrices, height, width), images.device)
    return warp(images, theta, fill)


def warp(images: torch.Tensor, theta: torch.Tensor, fill: tuple[float, float, float]) -> torch.Tensor:
    """`affine` from thetas already on the images' device."""
    count, _, height, width = images.shape
    theta = theta.to(images.dtype)
    # affine_grid's equivalent by broadcasting: its (H*W, 3) x (3, 2) bmm is ~10x slower on CPU.
    xs = (torch.arange(width, device=images.device, dtype=images.dtype) * 2 + 1) / width - 1
    ys = ((torch.arange(height, device=images.device, dtype=images.dtype) * 2 + 1) / height - 1).view(-1, 1)
    theta = theta.view(count, 2, 3, 1, 1)
    grid = torch.empty(count, height, width, 2, device=images.device, dtype=images.dtype)
    grid[..., 0] = theta[:, 0, 0] * xs + (theta[:, 0, 1] * ys + theta[:, 0, 2])
    grid[..., 1] = theta[:, 1, 0] * xs + (theta[:, 1, 1] * ys + theta[:, 1, 2])
    # Zero padding around (image - fill) is padding with `fill`, blended bilinearly at the edges.
    fill_tensor = devices.constant(tuple(fill), images.device, images.dtype).view(1, 3, 1, 1)
    warped = F.grid_sample(images - fill_tensor, grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    return warped.add_(fill_tensor).clamp_(0.0, 1.0)


def rotate(images: torch.Tensor, degrees: torch.Tensor, fill=IMAGENET_DEFAULT_MEAN) -> torch.Tensor:
    return affine(images, rotation_matrix(degrees, *images.shape[2:]), fill)


def shear_x(images: torch.Tensor, factor: torch.Tensor, fill=IMAGENET_DEFAULT_MEAN) -> torch.Tensor:
    return affine(images, shear_x_matrix(factor, *images.shape[2:]), fill)


def shear_y(images: torch.Tensor, factor: torch.Tensor, fill=IMAGENET_DEFAULT_MEAN) -> torch.Tensor:
    return affine(images, shear_y_matrix(factor, *images.shape[2:]), fill)


def translate_x(images: torch.Tensor, fraction: torch.Tensor, fill=IMAGENET_DEFAULT_MEAN) -> torch.Tensor:
    return affine(images, translate_x_matrix(fraction, *images.shape[2:]), fill)


def translate_y(images: torch.Tensor, fraction: torch.Tensor, fill=IMAGENET_DEFAULT_MEAN) -> torch.Tensor:
    return affine(images, translate_y_matrix(fraction, *images.shape[2:]), fill)


# Magnitude -> parameter, timm's increasing (`inc1`) scales; `level` = magnitude / 10, `sign` = +-1.

def _signed(scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda level, sign: sign * scale * level


def _enhance_factor(level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return (1.0 + sign * 0.9 * level).clamp(min=0.1)


def _posterize_bits(level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return 4 - torch.floor(4 * level)


def _solarize_threshold(level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return (256 - torch.floor(256 * level).clamp(max=256)) / 255


def _solarize_addition(level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return torch.floor(110 * level).clamp(max=128) / 255


def _no_parameter(level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return level


@dataclass(frozen=True)
class Operation:
    """One RandAugment op: a colour `apply(images, parameter)` or a geometric `matrix(parameter,
    height, width)` (geometric ops of one layer share a single warp), and its magnitude scale."""

    parameter: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    matrix: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None


OPERATIONS: dict[str, Operation] = {
    "identity": Operation(_no_parameter, apply=lambda images, _: images),
    "auto_contrast": Operation(_no_parameter, apply=lambda images, _: auto_contrast(images)),
    "equalize": Operation(_no_parameter, apply=lambda images, _: equalize(images)),
    "invert": Operation(_no_parameter, apply=lambda images, _: invert(images)),
    "rotate": Operation(_signed(30.0), matrix=rotation_matrix),
    "solarize": Operation(_solarize_threshold, apply=solarize),
    "solarize_add": Operation(_solarize_addition, apply=solarize_add),
    "colour": Operation(_enhance_factor, apply=colour),
    "posterize": Operation(_posterize_bits, apply=posterize),
    "contrast": Operation(_enhance_factor, apply=contrast),
    "brightness": Operation(_enhance_factor, apply=brightness),
    "sharpness": Operation(_enhance_factor, apply=sharpness),
    "shear_x": Operation(_signed(0.3), matrix=shear_x_matrix),
    "shear_y": Operation(_signed(0.3), matrix=shear_y_matrix),
    "translate_x": Operation(_signed(0.45), matrix=translate_x_matrix),
    "translate_y": Operation(_signed(0.45), matrix=translate_y_matrix),
}
# torchvision's RandAugment op set (timm's minus invert and solarize_add, plus identity): inverting a
# face is not an expression-preserving change.
DEFAULT_OPS: tuple[str, ...] = (
    "identity", "auto_contrast", "equalize", "rotate", "solarize", "colour", "posterize", "contrast",
    "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
)
# timm's `rand-...-inc1` op set, for like-for-like comparisons with timm_strong_transform.
TIMM_OPS: tuple[str, ...] = (
    "auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add",
    "colour", "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
)


class RandAugment:
    """Batched RandAugment on (N, 3, H, W) floats in [0, 1] (before normalisation).

    For each of `num_ops` layers every sample draws an op uniformly (with replacement), applies it
    with `probability` (timm's default 0.5), at a magnitude drawn from N(magnitude, magnitude_std)
    (uniform on [0, magnitude] when magnitude_std > 100, as timm) clipped to [0, 10]; signed ops
    flip sign with probability 1/2. All draws come from `generator` (a CPU torch.Generator, so one
    seed gives the same ops on CPU and CUDA), a fixed number per call.
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5,
                 probability: float = 0.5, ops: tuple[str, ...] = DEFAULT_OPS,
                 fill: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN):
        unknown = sorted(set(ops) - set(OPERATIONS))
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; known: {sorted(OPERATIONS)}")
        if not ops or num_ops < 0 or not 0.0 <= probability <= 1.0:
            raise ValueError(f"bad RandAugment settings: ops={ops}, num_ops={num_ops}, "
                             f"probability={probability}")
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.probability = probability
        self.ops = tuple(ops)
        self.fill = tuple(fill)

    def _magnitudes(self, count: int, generator: torch.Generator | None) -> torch.Tensor:
        noise = torch.randn(count, generator=generator, dtype=torch.float64)
        uniform = torch.rand(count, generator=generator, dtype=torch.float64)
        if self.magnitude_std > 100:
            drawn = uniform * self.magnitude
        else:
            drawn = self.magnitude + self.magnitude_std * noise
        return drawn.clamp(0.0, MAGNITUDE_SCALE)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 in_place: bool = False) -> torch.Tensor:
        """Augment (N, 3, H, W) floats in [0, 1], any memory layout; `in_place` writes into
        `images` (a full-batch allocation costs more than most ops on CPU)."""
        count, _, height, width = images.shape
        if not in_place:
            images = images.clone()
        for _ in range(self.num_ops):
            choice = torch.randint(len(self.ops), (count,), generator=generator)
            applied = torch.rand(count, generator=generator) < self.probability
            level = self._magnitudes(count, generator) / MAGNITUDE_SCALE
            sign = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0).double()
            # The round's plan (which rows take which op, with what parameter) is drawn on the host
            # and crosses to the device in one packed float64 copy; sizes stay host-known, so no
            # op reads anything back.
            colour_ops, warped_rows, thetas = [], [], []
            for index, name in enumerate(self.ops):
                rows = torch.nonzero(applied & (choice == index)).flatten()
                if rows.numel() == 0 or name == "identity":
                    continue
                operation = OPERATIONS[name]
                parameter = operation.parameter(level[rows], sign[rows])
                if operation.matrix is not None:
                    warped_rows.append(rows)
                    thetas.append(normalised_theta(operation.matrix(parameter, height, width), height, width))
                else:
                    colour_ops.append((operation, rows, parameter.double()))
            pieces = [rows.double() for _, rows, _ in colour_ops] + [parameter for _, _, parameter in colour_ops]
            if warped_rows:
                pieces += [torch.cat(warped_rows).double(), torch.cat(thetas).reshape(-1)]
            if not pieces:
                continue
            device_pieces = devices.to_device(torch.cat(pieces), images.device).split([len(p) for p in pieces])
            ops = len(colour_ops)
            for number, (operation, _, _) in enumerate(colour_ops):
                device_rows = device_pieces[number].long()
                images.index_copy_(0, device_rows, operation.apply(images[device_rows], device_pieces[ops + number]))
            if warped_rows:
                device_rows = device_pieces[2 * ops].long()
                theta = device_pieces[2 * ops + 1].view(-1, 2, 3)
                images.index_copy_(0, device_rows, warp(images[device_rows], theta, self.fill))
        return images


def _posterize_at_least_one_bit(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    # Pillow 13 raises ValueError below 1 bit; timm asks for 0 bits at magnitude 10 with `inc1`
    # (and below magnitude 2.5 without). One bit is the strongest posterize Pillow allows and what
    # the batched RandAugment does; old Pillow's 0-bit result, a black image, is no training sample.
    if bits_to_keep >= 8:
        return image
    return ImageOps.posterize(image, max(1, int(bits_to_keep)))


def timm_strong_transform(magnitude: int = 9, magnitude_std: float = 0.5, num_ops: int = 2,
                          increasing: bool = True,
                          fill: tuple[int, int, int] | None = None) -> Callable[[Image.Image], Image.Image]:
    """timm's `rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-inc1` (`inc0` when not
    `increasing`) on one PIL image, with its posterize ops clamped to at least 1 bit so Pillow 13
    cannot crash a run; every other op is timm's own. Draws from Python's `random` and NumPy's
    global state (timm's choice): seed those per worker for reproducibility."""
    fill = fill or tuple(round(255 * value) for value in IMAGENET_DEFAULT_MEAN)
    config = f"rand-m{int(magnitude)}-n{num_ops}-mstd{magnitude_std}-inc{int(increasing)}"
    transform = rand_augment_transform(config, {"img_mean": fill})
    for op in transform.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize_at_least_one_bit
    return transform
