"""Tests for decoding one chest X-ray file (cxrtrack.data.images).

Every image-mode quirk of the real Kaggle dataset (RGB/L JPEG, RGB/L/RGBA PNG, real transparency,
16-bit PNG, EXIF orientation, very large JPEGs, broken files) must end up as the same
``(1, size, size)`` uint8 grayscale tensor. All images are small and generated here, in memory.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, JpegImagePlugin
from torchvision.transforms.v2 import functional as F

from cxrtrack.data.images import UnreadableImageError, decode_image, to_grayscale
from cxrtrack.data.synthetic import write_png16

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png16_bytes(tmp_path, array: np.ndarray, name: str = "img16.png") -> bytes:
    path = tmp_path / name
    write_png16(path, array)
    return path.read_bytes()


def grey_picture(height: int = 96, width: int = 112) -> np.ndarray:
    """A smooth, non-symmetric uint8 picture (gradient + bright disc): JPEG-friendly, easy to compare."""
    y, x = np.mgrid[0:height, 0:width]
    img = 40 + 150 * x / (width - 1)
    img += 60 * (((x - width * 0.3) ** 2 + (y - height * 0.4) ** 2) < (min(height, width) * 0.2) ** 2)
    return np.clip(img, 0, 255).astype(np.uint8)


def reference(gray_u8: np.ndarray, size: int) -> torch.Tensor:
    """What decode_image should produce for an 8-bit grayscale array: antialiased resize to size x size."""
    return F.resize(
        torch.from_numpy(np.array(gray_u8, dtype=np.uint8, copy=True))[None], [size, size], antialias=True
    )


def max_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


def horizontal_gradient_u16(lo: int, hi: int, height: int = 120, width: int = 160) -> np.ndarray:
    return np.tile(np.linspace(lo, hi, width).round().astype(np.uint16), (height, 1))


# ---------------------------------------------------------------------------------------------
# every mode -> (1, size, size) uint8
# ---------------------------------------------------------------------------------------------


def _all_kinds(tmp_path) -> dict[str, bytes]:
    g = grey_picture()
    g16 = g.astype(np.uint16) * 257
    alpha = np.full_like(g, 255)
    return {
        "rgb_jpeg": encode(Image.fromarray(g).convert("RGB"), "JPEG", quality=95),
        "l_jpeg": encode(Image.fromarray(g), "JPEG", quality=95),
        "rgb_png": encode(Image.fromarray(g).convert("RGB"), "PNG"),
        "l_png": encode(Image.fromarray(g), "PNG"),
        "rgba_png": encode(Image.fromarray(np.dstack([g, g, g, alpha]), "RGBA"), "PNG"),
        "la_png": encode(Image.fromarray(np.dstack([g, alpha]), "LA"), "PNG"),
        "palette_png": encode(
            Image.fromarray(g).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE), "PNG"
        ),
        "gray16_png": png16_bytes(tmp_path, g16, "g16.png"),
        "rgba16_png": png16_bytes(
            tmp_path, np.dstack([g16, g16, g16, np.full_like(g16, 65535)]), "rgba16.png"
        ),
    }


@pytest.mark.parametrize("size", [64, 128])
def test_every_mode_decodes_to_1xSxS_uint8_matching_the_content(tmp_path, size):
    g = grey_picture()
    expected = reference(g, size)
    for kind, data in _all_kinds(tmp_path).items():
        out = decode_image(data, size)
        assert out.shape == (1, size, size), kind
        assert out.dtype == torch.uint8, kind
        # every container of the same grey picture decodes to (nearly) the same pixels
        tolerance = 12 if "jpeg" in kind else 3
        assert max_diff(out, expected) <= tolerance, kind


def test_small_image_is_upscaled_to_size():
    g = grey_picture(30, 40)
    out = decode_image(encode(Image.fromarray(g), "PNG"), 64)
    assert out.shape == (1, 64, 64)
    assert torch.equal(out, reference(g, 64))


# ---------------------------------------------------------------------------------------------
# RGB vs grayscale twins
# ---------------------------------------------------------------------------------------------


def test_rgb_jpeg_and_l_jpeg_of_same_grey_content_match():
    g = grey_picture()
    rgb = decode_image(encode(Image.fromarray(g).convert("RGB"), "JPEG", quality=95), 64)
    gray = decode_image(encode(Image.fromarray(g), "JPEG", quality=95), 64)
    assert max_diff(rgb, gray) <= 6
    assert abs(rgb.float().mean() - gray.float().mean()) < 1.5
    assert max_diff(gray, reference(g, 64)) <= 6  # and both are the picture itself


def test_rgb_png_and_l_png_of_same_grey_content_are_identical():
    g = grey_picture()
    rgb = decode_image(encode(Image.fromarray(g).convert("RGB"), "PNG"), 64)
    gray = decode_image(encode(Image.fromarray(g), "PNG"), 64)
    assert torch.equal(rgb, gray)
    assert torch.equal(gray, reference(g, 64))


def test_rgb_is_converted_to_luma_not_one_channel():
    # pure red / green / blue bands: luma weights 0.299 / 0.587 / 0.114
    rgb = np.zeros((30, 90, 3), np.uint8)
    rgb[:, :30, 0] = rgb[:, 30:60, 1] = rgb[:, 60:, 2] = 255
    out = decode_image(encode(Image.fromarray(rgb), "PNG"), 90)[0]
    row = out[45]
    assert abs(int(row[15]) - 76) <= 2
    assert abs(int(row[45]) - 150) <= 2
    assert abs(int(row[75]) - 29) <= 2


# ---------------------------------------------------------------------------------------------
# 16-bit data is scaled, never clipped
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["write_png16", "pillow"])
def test_16bit_full_range_gradient_is_scaled_not_clipped(tmp_path, writer):
    grad = horizontal_gradient_u16(0, 65535)
    if writer == "write_png16":
        data = png16_bytes(tmp_path, grad)
    else:
        data = encode(Image.fromarray(grad), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"  # the quirk under test is really exercised

    out = decode_image(data, 64)[0].float()
    assert abs(out.mean().item() - 127.5) < 4  # clipping would give ~255
    assert out.min() < 10 and out.max() > 245
    columns = out.mean(dim=0)
    assert torch.all(columns[1:] >= columns[:-1])  # still a left-to-right gradient
    assert columns[-1] - columns[0] > 230


def test_16bit_mid_range_is_not_saturated_to_white(tmp_path):
    grad = horizontal_gradient_u16(1000, 40000)
    out = decode_image(png16_bytes(tmp_path, grad), 64)[0].float()
    # scaled by the 16-bit depth: 1000 -> ~4, 40000 -> ~156
    assert (out == 255).sum() == 0
    assert out.max() < 170
    assert out.min() < 10
    assert abs(out.mean().item() - (1000 + 40000) / 2 * 255 / 65535) < 5


def test_16bit_container_with_12bit_data_stays_visible(tmp_path):
    grad = horizontal_gradient_u16(0, 4095)
    out = decode_image(png16_bytes(tmp_path, grad), 64)[0].float()
    assert out.max() > 245  # scaled by 4095, not by 65535 (which would give a black image)
    assert abs(out.mean().item() - 127.5) < 5


def test_to_grayscale_of_16bit_image_matches_value_shift(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, size=(40, 50), dtype=np.uint16)
    values[0, 0] = 65535  # full 16-bit range
    gray = to_grayscale(Image.open(io.BytesIO(png16_bytes(tmp_path, values))))
    assert gray.mode == "L"
    assert np.abs(np.asarray(gray, dtype=int) - (values >> 8)).max() <= 1


def test_16bit_rgba_png_decodes_to_high_byte_luma(tmp_path):
    g = grey_picture(80, 80)
    u16 = g.astype(np.uint16) * 257 + np.random.default_rng(1).integers(0, 200, g.shape, dtype=np.uint16)
    rgba16 = np.dstack([u16, u16, u16, np.full_like(u16, 65535)])
    out = decode_image(png16_bytes(tmp_path, rgba16), 80)
    expected = (u16 >> 8).astype(np.uint8)
    assert max_diff(out, reference(expected, 80)) <= 1


# ---------------------------------------------------------------------------------------------
# transparency is composited onto black, never dropped
# ---------------------------------------------------------------------------------------------

# three vertical bands of 20 px in a 60x60 image: transparent | half transparent | opaque
BANDS_ALPHA = (0, 128, 255)
BAND_CENTRES = (10, 30, 50)


def _bands(alpha_values=BANDS_ALPHA) -> np.ndarray:
    alpha = np.zeros((60, 60), np.uint8)
    for i, a in enumerate(alpha_values):
        alpha[:, 20 * i : 20 * (i + 1)] = a
    return alpha


def _band_values(out: torch.Tensor) -> list[int]:
    return [int(out[0, 30, x]) for x in BAND_CENTRES]


def test_rgba_transparent_white_becomes_black_and_half_transparent_is_half():
    white = np.full((60, 60), 255, np.uint8)
    rgba = np.dstack([white, white, white, _bands()])
    transparent, half, opaque = _band_values(decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), 60))
    assert transparent <= 2  # dropping alpha would leave it white (255)
    assert 115 <= half <= 140
    assert opaque >= 253


def test_la_png_transparency_composited_onto_black():
    lum = np.full((60, 60), 200, np.uint8)
    data = encode(Image.fromarray(np.dstack([lum, _bands()]), "LA"), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    transparent, half, opaque = _band_values(decode_image(data, 60))
    assert transparent <= 2
    assert 90 <= half <= 112
    assert abs(opaque - 200) <= 2


def test_palette_png_with_transparent_index_composited_onto_black():
    index = np.zeros((60, 60), np.uint8)
    index[:, 30:] = 1
    img = Image.fromarray(index, "P")
    img.putpalette([255, 255, 255, 100, 100, 100] + [0] * (256 * 3 - 6))  # index 0 white, 1 grey
    data = encode(img, "PNG", transparency=0)  # white index is transparent
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P" and "transparency" in opened.info
    out = decode_image(data, 60)
    assert int(out[0, 30, 10]) <= 2
    assert abs(int(out[0, 30, 50]) - 100) <= 2


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_trns_colour_key_transparency_composited_onto_black(mode):
    arr = np.where(np.arange(60)[None, :] < 30, 255, 80).repeat(60, 0).astype(np.uint8)
    img = Image.fromarray(arr).convert(mode)
    key = 255 if mode == "L" else (255, 255, 255)
    out = decode_image(encode(img, "PNG", transparency=key), 60)
    assert int(out[0, 30, 10]) <= 2  # the transparent colour
    assert abs(int(out[0, 30, 50]) - 80) <= 2


# ---------------------------------------------------------------------------------------------
# EXIF orientation
# ---------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied():
    # Stored 80 wide x 40 tall, white block in the stored top-left quadrant only.
    stored = np.zeros((40, 80), np.uint8)
    stored[:20, :40] = 255
    img = Image.fromarray(stored).convert("RGB")
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(img, "JPEG", quality=95, exif=exif.tobytes())

    displayed = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert displayed.size == (40, 80)  # sanity: the file really carries orientation 6

    out = decode_image(data, 16)[0].float()
    quadrants = {
        "top_left": out[:8, :8].mean(),
        "top_right": out[:8, 8:].mean(),
        "bottom_left": out[8:, :8].mean(),
        "bottom_right": out[8:, 8:].mean(),
    }
    # rotated clockwise, the stored top-left corner is displayed top-right
    assert quadrants["top_right"] > 200
    assert all(v < 60 for k, v in quadrants.items() if k != "top_right"), quadrants

    without_exif = decode_image(encode(img, "JPEG", quality=95), 16)[0].float()
    assert without_exif[:8, :8].mean() > 200  # unrotated: white stays top-left (the test can tell them apart)


# ---------------------------------------------------------------------------------------------
# large JPEG: reduced-scale decoding
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    y, x = np.mgrid[0:2800, 0:3000].astype(np.float32)
    img = 127 + 90 * np.sin(x / 300) * np.cos(y / 250) + 30 * (x / 3000)
    return encode(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("RGB"), "JPEG", quality=90)


def test_large_jpeg_decodes_with_draft_and_matches_full_decode(large_jpeg, monkeypatch):
    requests = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original_draft(self, mode, size)
        requests.append((mode, size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out = decode_image(large_jpeg, 64)
    assert out.shape == (1, 64, 64) and out.dtype == torch.uint8

    assert len(requests) == 1
    mode, size, decoded_size = requests[0]
    assert size == (64, 64)
    assert decoded_size[0] < 3000 and decoded_size[1] < 2800  # decoded at a reduced scale...
    assert min(decoded_size) >= 64  # ...but never below the size we need

    full = np.asarray(Image.open(io.BytesIO(large_jpeg)).convert("L"))
    expected = reference(full, 64)
    assert max_diff(out, expected) <= 8
    assert (out.float() - expected.float()).abs().mean() < 1.5


# ---------------------------------------------------------------------------------------------
# unreadable files
# ---------------------------------------------------------------------------------------------


def _jpeg() -> bytes:
    return encode(Image.fromarray(grey_picture()).convert("RGB"), "JPEG", quality=90)


def _png() -> bytes:
    noise = np.random.default_rng(0).integers(
        0, 256, (96, 112), dtype=np.uint8
    )  # incompressible: a long IDAT
    return encode(Image.fromarray(noise), "PNG")


UNREADABLE = {
    "zero_bytes": lambda: b"",
    "truncated_jpeg": lambda: _jpeg()[: len(_jpeg()) // 2],
    "truncated_png": lambda: _png()[: len(_png()) // 2],
    "png_signature_only": lambda: _png()[:8],
    "text_file": lambda: b"patient notes, not an image\n" * 20,
    "random_bytes": lambda: np.random.default_rng(0).bytes(2048),
}


@pytest.mark.parametrize("kind", list(UNREADABLE))
def test_unreadable_bytes_raise_unreadable_image_error(kind):
    data = UNREADABLE[kind]()
    with pytest.raises(UnreadableImageError) as info:
        decode_image(data, 64)
    assert str(info.value)  # a reason to report next to the path


def test_16bit_scaling_has_no_jump_at_powers_of_two(tmp_path):
    """Two 16-bit images whose peaks differ by one level decode to the same brightness."""
    decoded = []
    for peak in (32767, 32768):
        arr = np.full((40, 40), peak, dtype=np.uint16)
        write_png16(tmp_path / f"p{peak}.png", arr)
        decoded.append(int(decode_image((tmp_path / f"p{peak}.png").read_bytes(), 32).float().mean()))
    assert decoded == [127, 128]


# ---------------------------------------------------------------------------------------------
# memory: a file is capped relative to the training size, and 16-bit data never becomes a full-size float array
# ---------------------------------------------------------------------------------------------


def _old_float_conversion(img: Image.Image) -> np.ndarray:
    """to_grayscale's high-bit path before issue 14 (a full-size float64 array): the reference for identity."""
    arr = np.asarray(img, dtype=np.float64)
    peak = float(np.nanmax(arr)) if arr.size else 0.0
    if peak > 255:
        arr = arr * (255.0 / (4095.0 if peak <= 4095 else 65535.0))
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("case", ["16-bit, every value", "12-bit, every value", "8-bit in 16", "I with negatives",
                                  "F with a NaN"])
def test_strip_wise_integer_conversion_equals_the_old_float_one_value_for_value(case, monkeypatch):
    import cxrtrack.data.images as images

    if case == "16-bit, every value":
        img = Image.fromarray(np.arange(65536, dtype=np.uint16).reshape(256, 256))
    elif case == "12-bit, every value":
        img = Image.fromarray(np.arange(4096, dtype=np.uint16).reshape(64, 64))
    elif case == "8-bit in 16":
        img = Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16))
    elif case == "I with negatives":
        img = Image.fromarray(np.linspace(-70000, 200000, 97 * 31).round().astype(np.int32).reshape(97, 31))
    else:
        values = np.linspace(-5, 70000, 50 * 40, dtype=np.float32).reshape(50, 40)
        values[3, 3] = np.nan
        img = Image.fromarray(values)
    assert img.mode in images._HIGH_BIT_MODES
    monkeypatch.setattr(images, "_STRIP_PIXELS", 700)  # many strips, the last one short
    with np.errstate(invalid="ignore"):  # NaN -> uint8, as before
        got, want = np.asarray(to_grayscale(img)), _old_float_conversion(img)
    assert got.dtype == np.uint8 and got.shape == want.shape
    mask = np.ones(want.shape, bool) if case != "F with a NaN" else ~np.isnan(np.asarray(img))
    assert np.array_equal(got[mask], want[mask])


def test_a_16bit_image_is_never_converted_as_a_full_size_float_array():
    """Issue 14: to_grayscale made float64 copies of the whole image (8 bytes a pixel, several at once); two
    158 KB 9000x9000 PNGs took peak memory from 1.29 to 5.40 GB. Now one strip at a time: NumPy's largest
    allocations (tracemalloc sees them) stay below a single full-size float64 array."""
    import tracemalloc

    img = Image.fromarray(np.tile(np.arange(3000, dtype=np.uint16) * 20, (3000, 1)))
    full_float64 = 3000 * 3000 * 8
    tracemalloc.start()
    try:
        gray = to_grayscale(img)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert gray.mode == "L" and gray.size == (3000, 3000)
    mb = 2**20
    assert peak < full_float64, f"{peak / mb:.0f} MB traced, a full-size float64 array is {full_float64 / mb:.0f} MB"


def test_a_file_over_the_pixel_cap_for_the_training_size_is_refused_before_it_is_decoded():
    """A 5000x5000 PNG is under Pillow's own limit (89 Mpx) and a few KB on disk; at 64 px it is refused."""
    data = encode(Image.new("1", (5000, 5000)), "PNG")
    assert len(data) < 100_000
    with pytest.raises(UnreadableImageError, match=r"refused as a decompression bomb: 5000x5000 = 25,000,000 pixels is "
                                                   r"over the limit of 24,000,000 for data.image_size=64"):
        decode_image(data, 64)
    from cxrtrack.data.images import MIN_PIXEL_CAP, check_pixels, max_pixels

    assert max_pixels(64) == max_pixels(216) == MIN_PIXEL_CAP  # the floor
    assert max_pixels(256) == 512 * 256 * 256  # relative to the training size above it
    check_pixels((5000, 5000), 256)  # allowed at 256 px
    check_pixels((4200, 4095), 32)  # the real dataset's largest image is never refused
