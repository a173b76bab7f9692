"""Decoding one chest X-ray file into a grayscale uint8 tensor of a fixed size.

The real dataset mixes RGB and 8-bit grayscale JPEG, grayscale/RGB/RGBA PNG (one with real
transparency) and a 16-bit RGBA PNG, from ~340 px to 4200 px. Every one of them ends here as the
same representation: a ``(1, size, size)`` uint8 tensor (grayscale, since the content is grayscale).

- 16-bit data is scaled down by its range (16-bit, or 12-bit when no value exceeds 4095), never clipped
  (Pillow's ``convert("L")`` on a 16-bit grayscale image saturates almost everything to white).
- Transparency is composited onto black (the colour of air on a radiograph), never dropped.
- RGB is converted to luma (ITU-R 601-2), so an RGB file with grey content equals its grayscale twin.
- EXIF orientation is applied.
- Large JPEGs are decoded at a reduced scale (``Image.draft``), which is several times faster than
  decoding a 4000-px image in full and then shrinking it.
- Memory is bounded: other formats (PNG) can only be decoded whole, so a file may have at most
  :func:`max_pixels` pixels for the training size (a 158 KB PNG can hold 9000x9000 16-bit pixels); a larger
  one is skipped like an unreadable file. 16-bit data is brought to 8 bits a strip of rows at a time in
  integer arithmetic, never as a full-size float array (the result is the same, value for value).
"""

from __future__ import annotations

import io
import re

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as F

_HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}

# The pixels a file may have, relative to the training size: PIXELS_PER_TRAINING_PIXEL times size x size (about
# 22x the side), never fewer than MIN_PIXEL_CAP, which keeps the real dataset's largest image (4200x4095 = 17.2
# Mpx) at every size. At 64-216 px that is 24 Mpx: at most ~100 MB decoded for RGBA, ~50 MB for 16-bit gray.
PIXELS_PER_TRAINING_PIXEL = 512
MIN_PIXEL_CAP = 24_000_000
_STRIP_PIXELS = 1 << 18  # high-bit images are converted this many pixels at a time (2 MB as float64)


class UnreadableImageError(Exception):
    """The file is not an image we can decode (corrupt, truncated, empty or another format)."""


def max_pixels(size: int) -> int:
    """The most pixels a file may have to be decoded for training at ``size`` x ``size``."""
    return max(MIN_PIXEL_CAP, PIXELS_PER_TRAINING_PIXEL * size * size)


def _strips(img: Image.Image):
    """``(first row, array)`` for consecutive strips of about _STRIP_PIXELS pixels (each a copy of only its rows)."""
    width, height = img.size
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        yield top, np.asarray(img.crop((0, top, width, min(height, top + rows))))


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer / float) image -> mode ``L``, scaled by its container's range.

    16-bit containers hold either full-range 16-bit data or 12-bit data (common for X-ray detectors). Scale by
    the container's range, never by the image's own peak, so that two images of the same depth keep their
    relative brightness. Integer data is scaled in integer arithmetic, ``(v * 255 + d // 2) // d``, which equals
    ``rint(v * 255 / d)`` for every value (d = 4095 or 65535 is odd, so no value falls on a tie); float data
    (mode ``F``) as before, in float64. Either way one strip at a time: never a full-size wider array."""
    is_float = img.mode == "F"
    peak = None
    for _, strip in _strips(img):
        values = strip[~np.isnan(strip)] if is_float else strip
        if values.size:
            top = float(values.max())
            peak = top if peak is None or top > peak else peak
    if peak is None:  # no pixel, or only NaN (as np.nanmax would say)
        peak = 0.0 if img.size[0] * img.size[1] == 0 else float("nan")
    divisor = (4095 if peak <= 4095 else 65535) if peak > 255 else None
    out = np.empty((img.size[1], img.size[0]), dtype=np.uint8)
    for top, strip in _strips(img):
        if is_float:
            arr = strip.astype(np.float64)
            if divisor is not None:
                arr = arr * (255.0 / divisor)
            out[top:top + len(strip)] = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        else:
            arr = strip.astype(np.int64)
            if divisor is not None:
                arr = (arr * 255 + divisor // 2) // divisor
            out[top:top + len(strip)] = np.clip(arr, 0, 255)
    return Image.fromarray(out, mode="L")


def to_grayscale(img: Image.Image) -> Image.Image:
    """Any Pillow image -> mode ``L`` (8-bit grayscale), handling bit depth and transparency."""
    if img.mode in _HIGH_BIT_MODES:
        return _high_bit_to_l(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("L", "RGB") and "transparency" in img.info:  # tRNS chunk: a colour marked transparent
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, img)
    if img.mode == "CMYK":
        img = img.convert("RGB")
    return img if img.mode == "L" else img.convert("L")


def check_pixels(size: tuple[int, int], image_size: int | None = None) -> None:
    """Refuse an image over Pillow's decompression-bomb limit before decoding it (Pillow itself only
    warns between 1x and 2x its limit, and a 1 MB PNG can decode to gigabytes), or over
    :func:`max_pixels` for the training size ``image_size``."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = size
    if limit is not None and width * height > limit:
        raise UnreadableImageError(
            f"refused as a decompression bomb: {width}x{height} = {width * height:,} pixels is over Pillow's limit of "
            f"{limit:,} (PIL.Image.MAX_IMAGE_PIXELS)"
        )
    if image_size is not None and width * height > max_pixels(image_size):
        raise UnreadableImageError(
            f"refused as a decompression bomb: {width}x{height} = {width * height:,} pixels is over the limit of "
            f"{max_pixels(image_size):,} for data.image_size={image_size} (a file is decoded whole before it is shrunk "
            f"to {image_size}x{image_size}, so it may have at most {PIXELS_PER_TRAINING_PIXEL}x the training image's "
            f"pixels, or {MIN_PIXEL_CAP:,} if that is more)"
        )


def _readable(exc: BaseException) -> str:
    """An exception as words, without Python object reprs such as ``<_io.BytesIO object at 0x...>``."""
    text = re.sub(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>", "", str(exc)).strip()
    return text or type(exc).__name__


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """Decode encoded image bytes into a ``(1, size, size)`` uint8 tensor.

    Raises:
        UnreadableImageError: the bytes are empty, truncated or not an image.
    """
    if not data:
        raise UnreadableImageError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            check_pixels(img.size, size)  # from the header, before any pixel is decoded
            if img.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the size we need.
                img.draft("L" if img.mode in ("L", "RGB") else None, (size, size))
            img.load()  # raises on truncated data (we never set LOAD_TRUNCATED_IMAGES)
            ImageOps.exif_transpose(img, in_place=True)  # no full-size copy when there is nothing to turn
            gray = to_grayscale(img)
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(f"refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise UnreadableImageError("not an image Pillow can identify (another format, or damaged)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImageError(f"cannot decode it ({_readable(exc)})") from None
    tensor = torch.from_numpy(np.array(gray, dtype=np.uint8, copy=True)).unsqueeze(0)
    return F.resize(tensor, [size, size], antialias=True)
