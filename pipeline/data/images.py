"""Image byte checks and face crops used at ingest time (Pillow only, no torch).

Two levels of checking: `probe` reads the container header (JPEG frame header or PNG IHDR) and the
JPEG end marker in microseconds, which is enough to reject non-image and cut-off bytes at MS1MV2
scale; `decode` fully decodes and is used where pixels are needed anyway (crops) or on request.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

from PIL import Image

JPEG_START = b"\xff\xd8"
JPEG_END = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) are not frames.
START_OF_FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD9)}
# Some encoders leave a few bytes after the end-of-image marker; decoders ignore them.
_TRAILING_SLACK = 32
# Real face crops are far below this; anything larger is a decompression bomb or a corrupt header.
MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """Bytes that are not a usable image; the message is the skip reason."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    height: int
    width: int


def probe(data: bytes) -> ImageInfo:
    """Format and size from the header; rejects non-images and JPEGs without an end marker."""
    if data.startswith(JPEG_START):
        return _probe_jpeg(data)
    if data.startswith(PNG_SIGNATURE):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ImageError("corrupt PNG header")
        width, height = struct.unpack_from(">II", data, 16)
        if not data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82"):
            raise ImageError("truncated PNG (no IEND chunk)")
        return _checked(ImageInfo("png", height, width))
    head = data[:8].hex() if data else "empty"
    raise ImageError(f"not a JPEG or PNG image (first bytes {head})")


def _probe_jpeg(data: bytes) -> ImageInfo:
    if JPEG_END not in data[-_TRAILING_SLACK:]:
        raise ImageError("truncated JPEG (no end-of-image marker)")
    position = 2
    size = len(data)
    while position + 4 <= size:
        if data[position] != 0xFF:
            raise ImageError(f"corrupt JPEG: expected a marker at byte {position}")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in STANDALONE_MARKERS:
            position += 2
            continue
        if marker == 0xD9 or marker == 0xDA:
            break  # end of image / start of scan before any frame header
        (segment_length,) = struct.unpack_from(">H", data, position + 2)
        if marker in START_OF_FRAME_MARKERS:
            if position + 9 > size:
                break
            height, width = struct.unpack_from(">HH", data, position + 5)
            return _checked(ImageInfo("jpeg", height, width))
        if segment_length < 2:
            raise ImageError(f"corrupt JPEG: segment length {segment_length} at byte {position}")
        position += 2 + segment_length
    raise ImageError("corrupt JPEG: no frame header")


def _checked(info: ImageInfo) -> ImageInfo:
    if info.height <= 0 or info.width <= 0:
        raise ImageError(f"{info.format} header gives an empty image {info.width}x{info.height}")
    if info.height * info.width > MAX_PIXELS:
        raise ImageError(f"{info.format} header gives an implausible size {info.width}x{info.height}")
    return info


def open_image(data: bytes) -> Image.Image:
    """Decode fully to RGB; any decoder complaint becomes an ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(f"implausible image size {image.width}x{image.height}")
            image.load()
    except ImageError:
        raise
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError... for bad bytes
        raise ImageError(f"undecodable image: {type(error).__name__}: {error}") from None
    return image.convert("RGB") if image.mode != "RGB" else image


def decode(data: bytes) -> ImageInfo:
    """Full decode check (catches damage inside the entropy-coded data that `probe` cannot see)."""
    info = probe(data)
    image = open_image(data)
    return ImageInfo(info.format, image.height, image.width)


def check(data: bytes, full_decode: bool) -> ImageInfo:
    return decode(data) if full_decode else probe(data)


def clamp_box(left: float, top: float, right: float, bottom: float, width: int, height: int
              ) -> tuple[int, int, int, int]:
    """Round a face box to pixels and clamp it to the image; raises ImageError when empty."""
    clamped = (
        max(0, min(width, int(round(left)))),
        max(0, min(height, int(round(top)))),
        max(0, min(width, int(round(right)))),
        max(0, min(height, int(round(bottom)))),
    )
    if clamped[2] - clamped[0] < 2 or clamped[3] - clamped[1] < 2:
        raise ImageError(
            f"degenerate face box ({left}, {top}, {right}, {bottom}) in a {width}x{height} image"
        )
    return clamped


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def crop_faces(data: bytes, boxes: list[tuple[float, float, float, float]], quality: int = 95
               ) -> list[tuple[bytes, int, int] | ImageError]:
    """Decode once and crop each (left, top, right, bottom) box to JPEG bytes.

    Returns, per box, (jpeg bytes, height, width) or the ImageError saying why that box is unusable;
    a whole-image decode failure raises.
    """
    image = open_image(data)
    crops: list[tuple[bytes, int, int] | ImageError] = []
    for box in boxes:
        try:
            left, top, right, bottom = clamp_box(*box, image.width, image.height)
        except ImageError as error:
            crops.append(error)
            continue
        face = image.crop((left, top, right, bottom))
        crops.append((encode_jpeg(face, quality), face.height, face.width))
    return crops
