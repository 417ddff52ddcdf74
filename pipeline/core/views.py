"""The training and inference input path: decode, resize, crop and flip to uint8 on the CPU (pure
functions for Ray Data's map_batches), then batched colour jitter, RandAugment, normalisation and
erasing in torch on whatever device the batch is on (weak and strong views)."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.io import ImageReadMode, decode_image

from pipeline.config import check
from pipeline.core import devices
from pipeline.core.randaugment import DEFAULT_OPS, LUMA, OPERATIONS, RandAugment, timm_strong_transform
from pipeline.data import images as image_checks

__all__ = [
    "ColourJitter", "RandAugment", "StrongView", "StrongViewConfig", "WeakView", "WeakViewConfig",
    "centre_crop", "colour_matrix", "decode_resize", "normalise", "random_erasing", "timm_strong_transform",
    "to_float", "to_unit", "weak_geometry",
]

# ------------------------------------------------------------------------------------ CPU side


def _resize_into(pixels: torch.Tensor, size: int, out: torch.Tensor) -> None:
    """Resize one HWC uint8 image into `out` (size, size, 3)."""
    if pixels.shape[0] == size and pixels.shape[1] == size:
        out.copy_(pixels)
        return
    # unsqueeze-then-permute gives strides torch reads as channels_last, which selects its fast
    # uint8 antialiased kernel (~10x Pillow's resize); [None] on the CHW view does not.
    batch = pixels.unsqueeze(0).permute(0, 3, 1, 2)
    resized = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True)
    out.copy_(resized[0].permute(1, 2, 0))


def _pillow_pixels(data: bytes, size: int) -> torch.Tensor:
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (size, size))  # libjpeg's DCT scaling: 1/2..1/8 of the work; no-op for PNG
    image = image.convert("RGB") if image.mode != "RGB" else image
    return torch.from_numpy(np.array(image))


def _decode_one(data: bytes, size: int) -> torch.Tensor:
    # The header check rejects non-images, cut-off JPEGs and implausible sizes in microseconds.
    info = image_checks.probe(data)
    if info.format == "jpeg" and min(info.height, info.width) >= 2 * size:
        return _pillow_pixels(data, size)
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    # decode_image returns a CHW view of an HWC buffer, so this permute is free.
    pixels = decode_image(encoded, mode=ImageReadMode.RGB).permute(1, 2, 0)
    if pixels.dtype != torch.uint8:  # 16-bit PNG: Pillow's 8-bit conversion, as ingest checks use
        return _pillow_pixels(data, size)
    return pixels


def decode_resize(images: list[bytes], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode JPEG/PNG bytes and resize to (N, size, size, 3) uint8 (faces are aligned crops).

    Returns (pixels, ok): rows whose bytes do not decode are zeros and `ok` is False there, so one
    bad row never stops a long job (`pipeline.data.images.decode` says why for a given row).

    torchvision's libjpeg-turbo decoder plus torch's uint8 antialiased bilinear resize; JPEGs at
    least twice `size` go through Pillow's draft (DCT-domain downscaling) instead, 16-bit PNGs
    through Pillow. One core, 64 rendered faces, JPEG q92, best of 5, images/s, Pillow
    open/convert/resize in brackets: 112->112 16.8k (8.5k), 112->224 8.8k (2.4k), 256->224 3.1k
    (1.3k), 256->112 4.1k (1.7k), 512->224 1.1k (0.9k torchvision without draft). simplejpeg (not
    installed) is reported to decode 112 px about 1.4x faster again (not measured here). torchvision 0.29 deprecates its image
    decoders for TorchCodec; the pinned version has them.
    """
    pixels = torch.zeros((len(images), size, size, 3), dtype=torch.uint8)
    ok = np.zeros(len(images), dtype=bool)
    for row, data in enumerate(images):
        try:
            _resize_into(_decode_one(data, size), size, pixels[row])
        except (image_checks.ImageError, RuntimeError, OSError, ValueError, SyntaxError):
            continue
        ok[row] = True
    return pixels.numpy(), ok


def _as_tensor(batch: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(batch, np.ndarray) and min(batch.strides, default=0) < 0:
        batch = np.ascontiguousarray(batch)  # torch cannot view flipped numpy arrays
    if isinstance(batch, np.ndarray) and not batch.flags.writeable:
        # Ray Data hands out read-only (zero-copy) arrays; everything here only reads its input,
        # so torch's one-time "not writable" warning would be noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(batch)
    return torch.as_tensor(batch)


def _resize_batch(batch: np.ndarray, size: int) -> np.ndarray:
    tensor = _as_tensor(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True)
    return resized.permute(0, 2, 3, 1).contiguous().numpy()


def weak_geometry(batch: np.ndarray, rng: np.random.Generator, crop: int | None = None,
                  resize: int | None = None, flip: bool = True) -> np.ndarray:
    """The weak view's geometry on (N, H, W, 3) uint8: optional square resize, then an optional
    random square crop, then a random horizontal flip (probability 1/2), per sample.

    ABAW6: resize=256, crop=224; ABAW5: resize=224, no crop. Draws from `rng` in a fixed order
    (flips, then crop rows, then crop columns), so one seed gives one result.
    """
    if resize is not None and batch.shape[1:3] != (resize, resize):
        batch = _resize_batch(batch, resize)
    count, height, width, _ = batch.shape
    flips = rng.random(count) < 0.5 if flip else np.zeros(count, dtype=bool)
    if crop is None:
        if not flips.any():
            return batch.copy()
        out = batch.copy()
        out[flips] = out[flips, :, ::-1]
        return out
    if crop > min(height, width):
        raise ValueError(f"crop {crop} is larger than the {height}x{width} images")
    tops = rng.integers(0, height - crop + 1, count)
    lefts = rng.integers(0, width - crop + 1, count)
    out = np.empty((count, crop, crop, 3), dtype=np.uint8)
    for row in range(count):
        window = batch[row, tops[row]:tops[row] + crop, lefts[row]:lefts[row] + crop]
        out[row] = window[:, ::-1] if flips[row] else window
    return out


def centre_crop(batch: np.ndarray, crop: int) -> np.ndarray:
    """The evaluation counterpart of weak_geometry's random crop."""
    height, width = batch.shape[1:3]
    top, left = (height - crop) // 2, (width - crop) // 2
    return np.ascontiguousarray(batch[:, top:top + crop, left:left + crop])


# --------------------------------------------------------------------------------- device side


def to_unit(batch: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 NHWC or NCHW -> float32 (N, 3, H, W) in [0, 1] on the batch's device, in the layout the
    input has: NHWC gives channels_last memory, with no relayout pass. Channels are read from dim 1
    when it is 3, else from the last dim (so 3-pixel-high NHWC images are not supported)."""
    batch = _as_tensor(batch)
    if batch.dtype != torch.uint8 or batch.dim() != 4:
        raise ValueError(f"expected a 4-d uint8 batch, got {batch.dtype} {tuple(batch.shape)}")
    if batch.shape[1] != 3:
        if batch.shape[3] != 3:
            raise ValueError(f"expected 3 channels in dim 1 or 3, got {tuple(batch.shape)}")
        batch = batch.permute(0, 3, 1, 2)
    return batch.to(torch.float32).mul_(1.0 / 255.0)


def normalise(images: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
              channels_last: bool = True, in_place: bool = False) -> torch.Tensor:
    """(images - mean) / std from [0, 1] floats, in channels_last (or contiguous) memory; in place
    when allowed and the layout already fits, else written straight into the new layout."""
    scale = devices.constant(tuple(1.0 / value for value in std), images.device, images.dtype).view(1, 3, 1, 1)
    shift = devices.constant(tuple(m / s for m, s in zip(mean, std)), images.device, images.dtype).view(1, 3, 1, 1)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if in_place and images.is_contiguous(memory_format=layout):
        return images.mul_(scale).sub_(shift)
    out = torch.empty_like(images, memory_format=layout)
    torch.mul(images, scale, out=out)
    return out.sub_(shift)


def to_float(batch: torch.Tensor | np.ndarray, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
             channels_last: bool = True) -> torch.Tensor:
    """uint8 NHWC or NCHW -> normalised float32 (N, 3, H, W), channels_last memory by default."""
    return normalise(to_unit(batch), mean, std, channels_last, in_place=True)


def _draw(generator: torch.Generator | None, count: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)


# RGB -> YIQ (NTSC). Y is the luma Pillow and torchvision blend towards; I and Q span chroma.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                    dtype=torch.float64)


def colour_matrix(saturation: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Per-sample RGB matrices (N, 3, 3) that scale chroma by `saturation` and turn hue by `hue` (a
    fraction of a full turn, positive turning red towards yellow as torchvision), keeping luma."""
    # In YIQ, saturation scales (I, Q) and hue rotates them; neither moves Y.
    angle = -2 * math.pi * hue.double()
    cos, sin = torch.cos(angle) * saturation, torch.sin(angle) * saturation
    chroma = torch.zeros(len(hue), 3, 3, dtype=torch.float64)
    chroma[:, 0, 0] = 1.0
    chroma[:, 1, 1], chroma[:, 1, 2], chroma[:, 2, 1], chroma[:, 2, 2] = cos, -sin, sin, cos
    return torch.linalg.inv(_YIQ) @ chroma @ _YIQ


class ColourJitter:
    """Per-sample brightness, contrast, saturation and hue jitter of (N, 3, H, W) floats in [0, 1].

    Factors are drawn as torchvision's ColorJitter (brightness in [max(0, 1 - b), 1 + b], hue
    in [-h, h] of a full turn) from a CPU `generator`, and a sample is jittered with
    `probability`. Unlike torchvision, which applies the four in a random order and clips after
    each, the four compose into one per-sample 3x3 colour matrix plus offset, applied in a single
    batched matmul and clipped once (order brightness, contrast, saturation, hue): one pass over
    the batch, ~100x faster on CPU than torchvision's batched HSV adjust_hue alone (6 vs 690 ms
    for 64 images at 224 px). Hue rotates the chroma (I, Q) plane of YIQ (as TensorFlow Addons'
    adjust_hsv_in_yiq) instead of shifting HSV hue, so it is a different colour change, not an
    approximation of torchvision's: same direction (positive turns red towards yellow), similar
    size (mean channel change 24 vs 18 levels of 255 at hue 0.1 on rendered faces), but it keeps
    luma (0.6 levels moved, by clipping) where HSV keeps the largest channel and moves luma by ~19
    levels on skin tones.
    """

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.1, probability: float = 1.0):
        if min(brightness, contrast, saturation, hue) < 0 or hue > 0.5 or not 0 <= probability <= 1:
            raise ValueError(f"bad ColourJitter settings: brightness={brightness}, contrast="
                             f"{contrast}, saturation={saturation}, hue={hue}, probability={probability}")
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.hue = hue
        self.probability = probability

    def matrices(self, count: int, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample (colour matrix (N, 3, 3), brightness (N,), contrast (N,)), float64 on CPU."""
        brightness = _draw(generator, count, max(0.0, 1 - self.brightness), 1 + self.brightness)
        contrast = _draw(generator, count, max(0.0, 1 - self.contrast), 1 + self.contrast)
        saturation = _draw(generator, count, max(0.0, 1 - self.saturation), 1 + self.saturation)
        hue = _draw(generator, count, -self.hue, self.hue)
        skipped = torch.rand(count, generator=generator, dtype=torch.float64) >= self.probability
        brightness[skipped], contrast[skipped], saturation[skipped], hue[skipped] = 1.0, 1.0, 1.0, 0.0
        colour = colour_matrix(saturation, hue)
        return colour, brightness, contrast

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        count, channels, height, width = images.shape
        colour, brightness, contrast = self.matrices(count, generator)
        # contrast blends the brightened image towards its mean grey (b * m); saturation and hue fix
        # grey, so the whole jitter is c * b * colour @ x + (1 - c) * b * m. All on the device: no sync.
        # The host-drawn parameters cross in one copy, queued without waiting (core.devices).
        packed = torch.cat([brightness[:, None], contrast[:, None], colour.reshape(count, 9)], dim=1)
        packed = devices.to_device(packed.to(images.dtype), images.device)
        brightness, contrast, colour = packed[:, 0], packed[:, 1], packed[:, 2:].view(count, 3, 3)
        grey_mean = images.mean((2, 3)) @ devices.constant(LUMA, images.device, images.dtype)
        matrix = (contrast * brightness).view(-1, 1, 1) * colour
        offset = ((1 - contrast) * brightness * grey_mean).view(-1, 1, 1)
        if images.is_contiguous(memory_format=torch.channels_last):
            # (N, H*W, 3) rows times the transposed matrix keep channels_last without a relayout.
            pixels = images.permute(0, 2, 3, 1).reshape(count, height * width, channels)
            out = torch.baddbmm(offset, pixels, matrix.transpose(1, 2))
            return out.clamp_(0.0, 1.0).view(count, height, width, channels).permute(0, 3, 1, 2)
        pixels = images.reshape(count, channels, height * width)
        out = torch.baddbmm(offset, matrix, pixels)
        return out.clamp_(0.0, 1.0).view(count, channels, height, width)


def _normal_noise(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None
                  ) -> torch.Tensor:
    if device.type == "cpu" or generator is None:
        return torch.randn(shape, generator=generator, device=device)
    # Noise is drawn where it is used; its seed comes from the CPU generator, so runs repeat.
    seed = int(torch.randint(2**62, (1,), generator=generator))
    device_generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=device_generator, device=device)


def random_erasing(images: torch.Tensor, probability: float, generator: torch.Generator | None = None,
                   area: tuple[float, float] = (0.02, 1 / 3), aspect: tuple[float, float] = (0.3, 1 / 0.3),
                   in_place: bool = False) -> torch.Tensor:
    """timm's RandomErasing (mode "pixel": per-pixel N(0, 1) noise in normalised units), batched.

    One rectangle per erased sample, its area fraction and log aspect ratio uniform in the ranges;
    where timm retries a rectangle that does not fit, this one clips its sides to the image.
    """
    count, channels, height, width = images.shape
    draws = torch.rand(5, count, generator=generator, dtype=torch.float64)
    rows = torch.nonzero(draws[0] < probability).flatten()
    if rows.numel() == 0:
        return images
    target = height * width * (area[0] + (area[1] - area[0]) * draws[1, rows])
    ratio = torch.exp(math.log(aspect[0]) + (math.log(aspect[1]) - math.log(aspect[0])) * draws[2, rows])
    erase_height = torch.sqrt(target * ratio).round().clamp(1, height).long()
    erase_width = torch.sqrt(target / ratio).round().clamp(1, width).long()
    top = (draws[3, rows] * (height - erase_height + 1)).long()
    left = (draws[4, rows] * (width - erase_width + 1)).long()
    device = images.device
    y = torch.arange(height, device=device).view(1, 1, -1, 1)
    x = torch.arange(width, device=device).view(1, 1, 1, -1)
    # The rectangles (drawn on the host) cross in one copy, queued without waiting (core.devices).
    packed = devices.to_device(torch.stack([rows, top, left, erase_height, erase_width]), device)
    device_rows = packed[0]
    top, left, erase_height, erase_width = (column.view(-1, 1, 1, 1) for column in packed[1:])
    inside = (y >= top) & (y < top + erase_height) & (x >= left) & (x < left + erase_width)
    noise = _normal_noise((rows.numel(), channels, height, width), device, generator).to(images.dtype)
    erased = torch.where(inside, noise, images[device_rows])
    out = images if in_place else images.clone()
    out[device_rows] = erased
    return out


# --------------------------------------------------------------------------------------- views


@dataclass(frozen=True)
class WeakViewConfig:
    """The weak view (docs/methods.md, "Views"): geometry on the CPU, colour jitter on the device."""

    resize: int = 224
    """Square size images are decoded to (ABAW5: 224; ABAW6: 256, then cropped)."""
    crop: int | None = None
    """Random square crop after the resize (ABAW6: 224); None keeps the resized image."""
    flip: bool = True
    """Random horizontal flip with probability 1/2."""
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    """Colour jitter ranges, as torchvision's ColorJitter (the papers give none; timm's 0.4)."""
    jitter_probability: float = 1.0
    """Chance a sample is colour-jittered at all."""
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    channels_last: bool = True
    """Output memory layout; channels_last is commonly 1.3-1.8x faster for CNNs on CPU (not re-measured in BENCHMARKS.md)."""

    def __post_init__(self) -> None:
        check(self.resize > 0, "resize", f"must be positive, got {self.resize}")
        check(self.crop is None or 0 < self.crop <= self.resize, "crop",
              f"must be in (0, resize={self.resize}], got {self.crop}")
        check(0 <= self.hue <= 0.5, "hue", f"must be in [0, 0.5], got {self.hue}")
        check(min(self.brightness, self.contrast, self.saturation) >= 0, "brightness",
              "brightness, contrast and saturation must be >= 0")
        check(0 <= self.jitter_probability <= 1, "jitter_probability", "must be in [0, 1]")

    @property
    def output_size(self) -> int:
        return self.crop or self.resize


@dataclass(frozen=True)
class StrongViewConfig:
    """The strong view: the weak view's jitter, then RandAugment, then optional random erasing."""

    weak: WeakViewConfig = field(default_factory=WeakViewConfig)
    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    """timm's `mstd`: magnitude noise per op; above 100 means uniform in [0, magnitude]."""
    op_probability: float = 0.5
    """Chance each drawn op is applied (timm's RandAugment default)."""
    ops: tuple[str, ...] = DEFAULT_OPS
    erasing_probability: float = 0.0
    """Random erasing after normalisation (the ABAW6 text adds erasing; timm's usual value 0.25)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.ops) - set(OPERATIONS))
        check(not unknown, "ops", f"unknown {unknown}; known: {sorted(OPERATIONS)}")
        check(len(self.ops) > 0, "ops", "must name at least one op")
        check(self.num_ops >= 0, "num_ops", f"must be >= 0, got {self.num_ops}")
        check(0 <= self.magnitude <= 10, "magnitude", f"must be in [0, 10], got {self.magnitude}")
        check(self.magnitude_std >= 0, "magnitude_std", "must be >= 0")
        check(0 <= self.op_probability <= 1, "op_probability", "must be in [0, 1]")
        check(0 <= self.erasing_probability <= 1, "erasing_probability", "must be in [0, 1]")


class WeakView:
    """`decode` and `geometry` run on the CPU (numpy uint8); calling the view maps a uint8 batch on
    any device to the normalised float weak view. Move uint8 to the GPU, not floats (4x fewer bytes)."""

    def __init__(self, config: WeakViewConfig | None = None):
        self.config = config or WeakViewConfig()
        self.jitter = ColourJitter(self.config.brightness, self.config.contrast, self.config.saturation,
                                   self.config.hue, self.config.jitter_probability)

    def decode(self, images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        return decode_resize(images, self.config.resize)

    def geometry(self, batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return weak_geometry(batch, rng, crop=self.config.crop, resize=self.config.resize,
                             flip=self.config.flip)

    def colour(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The jitter alone, on [0, 1] floats."""
        return self.jitter(images, generator)

    def __call__(self, batch: torch.Tensor | np.ndarray, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        config = self.config
        return normalise(self.colour(to_unit(batch), generator), config.mean, config.std,
                         config.channels_last, in_place=True)


class StrongView:
    """Weak jitter + batched RandAugment (+ erasing) of the same CPU crop as the weak view: an SSL
    step decodes each unlabeled image once and makes both views on the device. For independent
    crops call `geometry` twice on the decoded batch."""

    def __init__(self, config: StrongViewConfig | None = None):
        self.config = config or StrongViewConfig()
        self.weak = WeakView(self.config.weak)
        weak = self.config.weak
        self.rand_augment = RandAugment(self.config.num_ops, self.config.magnitude,
                                        self.config.magnitude_std, self.config.op_probability,
                                        self.config.ops, fill=weak.mean)

    def decode(self, images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        return self.weak.decode(images)

    def geometry(self, batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.weak.geometry(batch, rng)

    def __call__(self, batch: torch.Tensor | np.ndarray, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        weak = self.config.weak
        images = self.weak.colour(to_unit(batch), generator)
        images = self.rand_augment(images, generator, in_place=True)
        images = normalise(images, weak.mean, weak.std, weak.channels_last, in_place=True)
        if self.config.erasing_probability > 0:
            images = random_erasing(images, self.config.erasing_probability, generator, in_place=True)
        return images
