"""The input path: CPU decode and geometry, batched colour jitter and RandAugment (each op against
Pillow), the weak and strong views, and the posterize guard on timm's RandAugment."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import rand_augment_transform
from torchvision.transforms import functional as tv_functional

from pipeline.config import ConfigError, from_mapping
from pipeline.core import randaugment, views

from conftest import make_jpeg

FILL = tuple(round(255 * value) for value in IMAGENET_DEFAULT_MEAN)
FILL_UNIT = tuple(value / 255 for value in FILL)
# Python/NumPy seed on which timm's unguarded `rand-m9-mstd0.5-inc1` asks Pillow for a 0-bit
# posterize on its first image (found by scanning seeds; timm's draws do not depend on the pixels).
CRASHING_SEED = 22


def smooth_image(size: int = 48, seed: int = 0) -> np.ndarray:
    """A smooth, colourful uint8 image with a few edges: what the Pillow comparisons need."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    phases = rng.uniform(0, 2 * np.pi, 3)
    channels = [0.5 + 0.35 * np.sin(2 * np.pi * (x * (1 + c) + y * (2 - c) / 2) + phases[c])
                for c in range(3)]
    image = Image.fromarray((np.stack(channels, -1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.rectangle((size // 4, size // 3, size // 2, size // 2), fill=(230, 40, 60))
    draw.ellipse((size // 2, size // 2, size - 6, size - 4), fill=(20, 90, 200))
    return np.asarray(image).copy()


def unit_batch(*arrays: np.ndarray) -> torch.Tensor:
    return views.to_unit(np.stack(arrays)).contiguous()


def as_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def one(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64)


def encode(array: np.ndarray, format: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format, quality=92)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ CPU side


def test_decode_resize_shapes_values_and_bad_rows():
    good = [make_jpeg(seed, (40, 30)) for seed in range(3)]
    png = encode(smooth_image(24), "PNG")
    grey = encode(smooth_image(24)[:, :, 0])
    deep = io.BytesIO()
    Image.fromarray((smooth_image(24)[:, :, 0].astype(np.uint16) * 257)).save(deep, "PNG")
    payloads = [good[0], b"not an image", good[1], good[2][:-300], png, grey, b"", deep.getvalue()]
    pixels, ok = views.decode_resize(payloads, 32)
    assert pixels.shape == (8, 32, 32, 3) and pixels.dtype == np.uint8
    assert ok.tolist() == [True, False, True, False, True, True, False, True]
    assert not pixels[~ok].any()
    reference = np.asarray(Image.open(io.BytesIO(good[1])).convert("RGB").resize((32, 32), Image.BILINEAR))
    assert np.abs(pixels[2].astype(int) - reference).mean() < 3
    assert (pixels[5, :, :, 0] == pixels[5, :, :, 1]).all()  # grey JPEG comes back as RGB


def test_decode_resize_draft_path_for_large_jpegs():
    big = smooth_image(160)
    pixels, ok = views.decode_resize([encode(big)], 64)  # 160 >= 2 * 64: Pillow's DCT scaling
    assert ok.all()
    reference = np.asarray(Image.fromarray(big).resize((64, 64), Image.BILINEAR))
    assert np.abs(pixels[0].astype(int) - reference).mean() < 3


def test_weak_geometry_flip_mirrors_the_drawn_rows():
    batch = np.stack([smooth_image(20, seed) for seed in range(16)])
    out = views.weak_geometry(batch, np.random.default_rng(3))
    flipped = np.random.default_rng(3).random(16) < 0.5
    assert 0 < flipped.sum() < 16
    np.testing.assert_array_equal(out[flipped], batch[flipped, :, ::-1])
    np.testing.assert_array_equal(out[~flipped], batch[~flipped])
    np.testing.assert_array_equal(views.weak_geometry(batch, np.random.default_rng(3), flip=False), batch)


def test_weak_geometry_resize_then_crop_windows_and_seeds():
    batch = np.stack([smooth_image(40, seed) for seed in range(8)])
    out = views.weak_geometry(batch, np.random.default_rng(5), crop=24, resize=32)
    assert out.shape == (8, 24, 24, 3) and out.dtype == np.uint8
    resized = views.weak_geometry(batch, np.random.default_rng(5), resize=32, flip=False)
    assert resized.shape == (8, 32, 32, 3)
    rng = np.random.default_rng(5)
    flips, tops, lefts = rng.random(8) < 0.5, rng.integers(0, 9, 8), rng.integers(0, 9, 8)
    for row in range(8):
        window = resized[row, tops[row]:tops[row] + 24, lefts[row]:lefts[row] + 24]
        np.testing.assert_array_equal(out[row], window[:, ::-1] if flips[row] else window)
    again = views.weak_geometry(batch, np.random.default_rng(5), crop=24, resize=32)
    other = views.weak_geometry(batch, np.random.default_rng(6), crop=24, resize=32)
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, other)
    assert views.centre_crop(resized, 24).shape == (8, 24, 24, 3)
    with pytest.raises(ValueError, match="crop 48"):
        views.weak_geometry(batch, np.random.default_rng(0), crop=48)


# --------------------------------------------------------------------------------- device side


def test_to_float_layouts_and_range():
    batch = np.stack([smooth_image(16, seed) for seed in range(2)])
    batch[0, 0, 0] = (0, 0, 0)
    batch[0, 0, 1] = (255, 255, 255)
    nhwc = views.to_float(batch)
    nchw = views.to_float(torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous(), channels_last=False)
    assert nhwc.shape == (2, 3, 16, 16) and nhwc.dtype == torch.float32
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and nchw.is_contiguous()
    torch.testing.assert_close(nhwc, nchw)
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(nhwc[0, :, 0, 0], -mean / std)
    torch.testing.assert_close(nhwc[0, :, 0, 1], (1 - mean) / std)
    unit = views.to_unit(batch)
    assert unit.min() == 0 and unit.max() == 1
    with pytest.raises(ValueError, match="uint8"):
        views.to_float(torch.zeros(1, 3, 4, 4))


def test_colour_jitter_identity_determinism_and_brightness():
    images = unit_batch(*[smooth_image(24, seed) for seed in range(6)])
    torch.testing.assert_close(views.ColourJitter(0, 0, 0, 0)(images), images)
    jitter = views.ColourJitter(0.4, 0.4, 0.4, 0.1)
    first = jitter(images, torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, jitter(images, torch.Generator().manual_seed(1)))
    assert not torch.allclose(first, jitter(images, torch.Generator().manual_seed(2)))
    assert first.min() >= 0 and first.max() <= 1
    brighter = views.ColourJitter(brightness=0.5, contrast=0, saturation=0, hue=0)
    factors = brighter.matrices(6, torch.Generator().manual_seed(3))[1]
    change = brighter(images, torch.Generator().manual_seed(3)).mean((1, 2, 3)) - images.mean((1, 2, 3))
    assert ((change > 0) == (factors > 1)).all() and (factors > 1).any() and (factors < 1).any()
    skipped = views.ColourJitter(0.4, 0.4, 0.4, 0.1, probability=0.0)
    torch.testing.assert_close(skipped(images), images)


def test_hue_keeps_grey_and_luma_and_turns_like_torchvision():
    jitter = views.ColourJitter(0, 0, 0, hue=0.05)
    greys = torch.full((4, 3, 8, 8), 0.4)
    torch.testing.assert_close(jitter(greys, torch.Generator().manual_seed(0)), greys)
    images = unit_batch(*[smooth_image(24, seed) for seed in range(4)]) * 0.8 + 0.1
    turned = views.ColourJitter(0, 0, 0, hue=0.1)(images, torch.Generator().manual_seed(0))
    luma_change = (randaugment.grey(turned) - randaugment.grey(images)).abs().mean()
    assert luma_change < 2 / 255 < (turned - images).abs().mean()
    # Same direction as torchvision's HSV shift, for colours all around the hue circle.
    hues = torch.tensor([-0.1, -0.03, 0.03, 0.1], dtype=torch.float64)
    matrices = views.colour_matrix(torch.ones(4, dtype=torch.float64), hues)
    for colour in ([0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.3, 0.9], [0.8, 0.5, 0.4]):
        pixel = torch.tensor(colour, dtype=torch.float64)
        ours = matrices @ pixel - pixel
        for hue, change in zip(hues.tolist(), ours):
            reference = tv_functional.adjust_hue(pixel.float().view(3, 1, 1), hue).view(3).double() - pixel
            assert torch.dot(change, reference) > 0, (colour, hue)


@pytest.mark.parametrize("name, ours, pillow", [
    ("brightness", lambda x: randaugment.brightness(x, one(1.6)),
     lambda image: ImageEnhance.Brightness(image).enhance(1.6)),
    ("colour", lambda x: randaugment.colour(x, one(0.2)),
     lambda image: ImageEnhance.Color(image).enhance(0.2)),
    ("contrast", lambda x: randaugment.contrast(x, one(1.7)),
     lambda image: ImageEnhance.Contrast(image).enhance(1.7)),
    ("sharpness", lambda x: randaugment.sharpness(x, one(1.9)),
     lambda image: ImageEnhance.Sharpness(image).enhance(1.9)),
    ("solarize", lambda x: randaugment.solarize(x, one(100 / 255)),
     lambda image: ImageOps.solarize(image, 100)),
    ("posterize", lambda x: randaugment.posterize(x, one(2)), lambda image: ImageOps.posterize(image, 2)),
    ("auto_contrast", randaugment.auto_contrast, ImageOps.autocontrast),
    ("equalize", randaugment.equalize, ImageOps.equalize),
    ("invert", randaugment.invert, ImageOps.invert),
    ("rotate", lambda x: randaugment.rotate(x, one(25.0), FILL_UNIT),
     lambda image: image.rotate(25, resample=Image.BILINEAR, fillcolor=FILL)),
    ("shear_x", lambda x: randaugment.shear_x(x, one(0.3), FILL_UNIT),
     lambda image: image.transform(image.size, Image.AFFINE, (1, 0.3, 0, 0, 1, 0), Image.BILINEAR,
                                   fillcolor=FILL)),
    ("shear_y", lambda x: randaugment.shear_y(x, one(-0.3), FILL_UNIT),
     lambda image: image.transform(image.size, Image.AFFINE, (1, 0, 0, -0.3, 1, 0), Image.BILINEAR,
                                   fillcolor=FILL)),
    ("translate_x", lambda x: randaugment.translate_x(x, one(0.3), FILL_UNIT),
     lambda image: image.transform(image.size, Image.AFFINE, (1, 0, 0.3 * 48, 0, 1, 0), Image.BILINEAR,
                                   fillcolor=FILL)),
    ("translate_y", lambda x: randaugment.translate_y(x, one(-0.2), FILL_UNIT),
     lambda image: image.transform(image.size, Image.AFFINE, (1, 0, 0, 0, 1, -0.2 * 48), Image.BILINEAR,
                                   fillcolor=FILL)),
])
def test_each_op_matches_pillow(name, ours, pillow):
    array = smooth_image(48)
    expected = np.asarray(pillow(Image.fromarray(array))).astype(int)
    result = as_uint8(ours(unit_batch(array)))[0].astype(int)
    assert np.abs(expected - array).mean() > 1, f"{name} should change the test image"
    # Pillow rounds to 8 bits after every op and samples edges slightly differently.
    assert np.abs(result - expected).mean() < 1.0, name


def test_ops_change_the_image_in_the_expected_direction():
    array = smooth_image(48)
    images = unit_batch(array)
    assert randaugment.brightness(images, one(1.5)).mean() > images.mean()
    assert randaugment.brightness(images, one(0.5)).mean() < images.mean()
    assert randaugment.contrast(images, one(0.5)).std() < images.std()
    assert randaugment.colour(images, one(0.0)).std(1).max() < 1e-6  # no saturation left
    solarized = randaugment.solarize(images, one(0.5))
    high = images >= 0.5
    torch.testing.assert_close(solarized[high], 1 - images[high])
    torch.testing.assert_close(solarized[~high], images[~high])
    for bits in (1, 0):  # 0 bits is clamped to 1, never an error
        posterized = as_uint8(randaugment.posterize(images, one(bits)))[0]
        assert all(set(np.unique(posterized[..., channel])) == {0, 128} for channel in range(3))
    stretched = randaugment.auto_contrast(images * 0.5 + 0.2)
    torch.testing.assert_close(stretched.amin((2, 3)), torch.zeros(1, 3))
    torch.testing.assert_close(stretched.amax((2, 3)), torch.ones(1, 3))


def test_geometric_ops_move_a_marked_pixel_where_pillow_does():
    array = np.full((64, 64, 3), 60, dtype=np.uint8)
    array[10:13, 44:47] = 255
    images = unit_batch(array)
    for ours, pillow in [
        (randaugment.rotate(images, one(90.0), FILL_UNIT), Image.fromarray(array).rotate(90)),
        (randaugment.translate_x(images, one(0.25), FILL_UNIT),
         Image.fromarray(array).transform((64, 64), Image.AFFINE, (1, 0, 16, 0, 1, 0))),
        (randaugment.shear_x(images, one(-0.5), FILL_UNIT),
         Image.fromarray(array).transform((64, 64), Image.AFFINE, (1, -0.5, 0, 0, 1, 0))),
    ]:
        mark = np.unravel_index(np.argmax(as_uint8(ours)[0, ..., 0]), (64, 64))
        expected = np.unravel_index(np.argmax(np.asarray(pillow)[..., 0]), (64, 64))
        assert np.hypot(mark[0] - 11, mark[1] - 45) > 5
        assert np.hypot(mark[0] - expected[0], mark[1] - expected[1]) <= 1.5


def test_rand_augment_is_seeded_and_keeps_shape_range_and_input():
    images = unit_batch(*[smooth_image(32, seed) for seed in range(16)])
    before = images.clone()
    augment = views.RandAugment()
    first = augment(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(first, augment(images, torch.Generator().manual_seed(0)))
    assert not torch.allclose(first, augment(images, torch.Generator().manual_seed(1)))
    torch.testing.assert_close(images, before)
    assert first.shape == images.shape and first.min() >= 0 and first.max() <= 1
    changed = (first - images).abs().flatten(1).amax(1) > 0
    assert 0 < changed.sum() < 16  # each op is applied with probability 1/2
    torch.testing.assert_close(views.RandAugment(num_ops=0)(images), images)
    with pytest.raises(ValueError, match="unknown RandAugment ops"):
        views.RandAugment(ops=("cutout",))


def test_rand_augment_magnitude_ten_posterize_never_fails():
    images = unit_batch(*[smooth_image(24, seed) for seed in range(8)])
    only_posterize = views.RandAugment(num_ops=1, magnitude=10, magnitude_std=0, probability=1.0,
                                       ops=("posterize",))
    posterized = as_uint8(only_posterize(images))  # timm's scale gives 0 bits here; 1 bit is kept
    assert set(np.unique(posterized)) == {0, 128}
    everything = views.RandAugment(num_ops=3, magnitude=10, magnitude_std=0.5, probability=1.0,
                                   ops=randaugment.TIMM_OPS)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        out = everything(images, generator)
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def seeded_call(transform, image: Image.Image, seed: int) -> Image.Image:
    random.seed(seed)
    np.random.seed(seed)
    return transform(image)


def test_timm_posterize_guard_survives_the_seed_that_crashes_timm():
    image = Image.fromarray(smooth_image(32))
    unguarded = rand_augment_transform("rand-m9-mstd0.5-inc1", {"img_mean": FILL})
    with pytest.raises(ValueError, match="bits must be"):
        seeded_call(unguarded, image, CRASHING_SEED)
    guarded = views.timm_strong_transform()
    assert seeded_call(guarded, image, CRASHING_SEED).size == image.size
    strongest = views.timm_strong_transform(magnitude=10)
    unguarded_strongest = rand_augment_transform("rand-m10-mstd0.5-inc1", {"img_mean": FILL})
    crashes = 0
    for seed in range(200):
        seeded_call(strongest, image, seed)
        try:
            seeded_call(unguarded_strongest, image, seed)
        except ValueError:
            crashes += 1
    assert crashes > 0


def test_random_erasing_rectangles():
    images = torch.zeros(8, 3, 32, 32)
    erased = views.random_erasing(images, 1.0, torch.Generator().manual_seed(0))
    assert not images.any()
    for row in erased:
        rows, columns = torch.nonzero(row[0] != 0, as_tuple=True)
        area = (rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1)
        assert 0 < len(rows) <= area <= 32 * 32 / 3 * 1.2
    torch.testing.assert_close(views.random_erasing(images, 0.0, torch.Generator()), images)


def test_weak_and_strong_views_end_to_end():
    payloads = [make_jpeg(seed, (40, 40)) for seed in range(6)]
    config = views.StrongViewConfig(weak=views.WeakViewConfig(resize=36, crop=32), erasing_probability=0.5)
    strong, weak = views.StrongView(config), views.WeakView(config.weak)
    decoded, ok = strong.decode(payloads)
    assert ok.all() and decoded.shape == (6, 36, 36, 3)
    crops = strong.geometry(decoded, np.random.default_rng(0))
    assert crops.shape == (6, 32, 32, 3)
    for view in (weak, strong):
        out = view(crops, torch.Generator().manual_seed(0))
        assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, view(torch.from_numpy(crops), torch.Generator().manual_seed(0)))
        assert not torch.allclose(out, view(crops, torch.Generator().manual_seed(1)))
    # strong = weak jitter (same draws for the same seed) + RandAugment + erasing
    assert not torch.allclose(weak(crops, torch.Generator().manual_seed(0)),
                              strong(crops, torch.Generator().manual_seed(0)))
    no_extras = views.StrongView(views.StrongViewConfig(weak=config.weak, num_ops=0))
    torch.testing.assert_close(weak(crops, torch.Generator().manual_seed(0)),
                               no_extras(crops, torch.Generator().manual_seed(0)))


def test_view_configs_fail_loudly():
    with pytest.raises(ConfigError, match="crop"):
        views.WeakViewConfig(resize=224, crop=256)
    with pytest.raises(ConfigError, match="ops"):
        views.StrongViewConfig(ops=("identity", "cutout"))
    config = from_mapping(views.StrongViewConfig, {"weak": {"resize": 256, "crop": 224}, "magnitude": 10})
    assert config.weak.output_size == 224 and config.magnitude == 10.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_views_on_cuda_match_cpu():
    crops = np.stack([smooth_image(64, seed) for seed in range(16)])
    view = views.StrongView(views.StrongViewConfig(erasing_probability=0.0))
    cpu = view(crops, torch.Generator().manual_seed(0))
    cuda = view(torch.from_numpy(crops).cuda(), torch.Generator().manual_seed(0))
    assert cuda.device.type == "cuda"
    assert (cuda.cpu() - cpu).abs().mean() < 1e-3
    erased = views.StrongView(views.StrongViewConfig(erasing_probability=1.0))
    on_device = torch.from_numpy(crops).cuda()
    first = erased(on_device, torch.Generator().manual_seed(0))
    torch.testing.assert_close(first, erased(on_device, torch.Generator().manual_seed(0)))
