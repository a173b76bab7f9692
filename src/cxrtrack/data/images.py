"""Decoding one chest X-ray file into a grayscale uint8 tensor of a fixed size.

The real dataset mixes RGB and 8-bit grayscale JPEG, grayscale/RGB/RGBA PNG (one with real
transparency) and a 16-bit RGBA PNG, from ~340 px to 4200 px. Every one of them ends here as the
same representation: a ``(1, size, size)`` uint8 tensor (grayscale, since the content is grayscale).

- 16-bit data is scaled down by its range (16-bit, or 12-bit when no value exceeds 4095), never clipped (Pillow's ``convert("L")`` on a
  16-bit grayscale image saturates almost everything to white).
- Transparency is composited onto black (the colour of air on a radiograph), never dropped.
- RGB is converted to luma (ITU-R 601-2), so an RGB file with grey content equals its grayscale twin.
- EXIF orientation is applied.
- Large JPEGs are decoded at a reduced scale (``Image.draft``), which is several times faster than
  decoding a 4000-px image in full and then shrinking it.
"""

from __future__ import annotations

import io
import re

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as F

_HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


class UnreadableImageError(Exception):
    """The file is not an image we can decode (corrupt, truncated, empty or another format)."""


def to_grayscale(img: Image.Image) -> Image.Image:
    """Any Pillow image -> mode ``L`` (8-bit grayscale), handling bit depth and transparency."""
    if img.mode in _HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        peak = float(np.nanmax(arr)) if arr.size else 0.0
        if peak > 255:
            # 16-bit containers hold either full-range 16-bit data or 12-bit data (common for X-ray
            # detectors). Scale by the container's range, never by the image's own peak, so that two
            # images of the same depth keep their relative brightness.
            arr = arr * (255.0 / (4095.0 if peak <= 4095 else 65535.0))
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
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


def check_pixels(size: tuple[int, int]) -> None:
    """Refuse an image over Pillow's decompression-bomb limit before decoding it (Pillow itself only
    warns between 1x and 2x its limit, and a 1 MB PNG can decode to gigabytes)."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = size
    if limit is not None and width * height > limit:
        raise UnreadableImageError(
            f"refused as a decompression bomb: {width}x{height} = {width * height:,} pixels is over Pillow's limit of "
            f"{limit:,} (PIL.Image.MAX_IMAGE_PIXELS)"
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
            check_pixels(img.size)
            if img.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the size we need.
                img.draft("L" if img.mode in ("L", "RGB") else None, (size, size))
            img.load()  # raises on truncated data (we never set LOAD_TRUNCATED_IMAGES)
            gray = to_grayscale(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(f"refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise UnreadableImageError("not an image Pillow can identify (another format, or damaged)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImageError(f"cannot decode it ({_readable(exc)})") from None
    tensor = torch.from_numpy(np.array(gray, dtype=np.uint8, copy=True)).unsqueeze(0)
    return F.resize(tensor, [size, size], antialias=True)
