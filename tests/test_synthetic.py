"""Tests for the synthetic chest-radiograph dataset generator (cxrtrack.data.synthetic).

Datasets here are tiny (a few images per class, ~100-160 px) so the whole file runs in seconds;
only the 4200x4095 "large image" test is marked slow.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrtrack.data import synthetic as syn
from cxrtrack.data.synthetic import (
    CLASS_DIRS,
    GENERATOR_VERSION,
    KAGGLE_COUNTS,
    SYNTHETIC_MARKER,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
    render_radiograph,
    write_png16,
)

SMALL = {split: {c: 6 for c in CLASS_DIRS} for split in ("train", "test")}
FAST = {"counts": SMALL, "size_range": (96, 160), "n_large": 0}
TINY = {
    "counts": {split: {c: 2 for c in CLASS_DIRS} for split in ("train", "test")},
    "size_range": (64, 96),
    "n_large": 0,
}
NAME_RE = re.compile(r"^synthetic_\d{4}\.(jpeg|jpg|png)$")


def _files(dataset: Path) -> dict[str, bytes]:
    """relative path -> bytes of every file under a generated dataset dir."""
    return {str(p.relative_to(dataset)): p.read_bytes() for p in sorted(dataset.rglob("*")) if p.is_file()}


def _open(path: Path) -> Image.Image:
    """Decoded copy of an image file, with the file closed again (keeps ``.format``)."""
    with Image.open(path) as img:
        img.load()
        out = img.copy()
        out.format = img.format
    return out


def _png_ihdr(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, color type) straight from the IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height, depth, color_type = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, color_type


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("syn") / "root", seed=0, **FAST)


# ---------------------------------------------------------------------------------------------
# layout, marker, formats
# ---------------------------------------------------------------------------------------------


def test_layout_counts_and_marker(small_dataset: Path):
    assert small_dataset.name == "Covid19-dataset"
    assert sorted(p.name for p in small_dataset.iterdir()) == ["test", "train"]
    for split in ("train", "test"):
        assert sorted(p.name for p in (small_dataset / split).iterdir()) == sorted(CLASS_DIRS)
        for label in CLASS_DIRS:
            names = [p.name for p in (small_dataset / split / label).iterdir()]
            assert len(names) == 6
            assert all(NAME_RE.match(n) for n in names), names
            assert sorted(int(n[10:14]) for n in names) == list(range(1, 7))

    marker = small_dataset.parent / SYNTHETIC_MARKER
    text = marker.read_text(encoding="utf-8")
    assert "SYNTHETIC" in text and "NOTHING clinically" in text
    params = json.loads(re.search(r"<!-- cxrtrack-synthetic (\{.*\}) -->", text).group(1))
    assert params["generator_version"] == GENERATOR_VERSION
    assert params["seed"] == 0 and params["counts"] == SMALL
    assert params["size_range"] == [96, 160] and params["n_large"] == 0
    # nothing but the dataset and the marker at the root, no leftover temp folders beside it
    assert sorted(p.name for p in small_dataset.parent.iterdir()) == ["Covid19-dataset", SYNTHETIC_MARKER]
    assert [p.name for p in small_dataset.parent.parent.iterdir()] == ["root"]


def test_sizes_within_range_and_not_all_square(small_dataset: Path):
    sizes = [_open(p).size for p in small_dataset.rglob("synthetic_*")]
    assert all(96 <= w <= 160 and 96 <= h <= 160 for w, h in sizes)
    assert sum(w != h for w, h in sizes) > len(sizes) // 2


def test_normal_and_viral_are_grayscale_rgb_jpeg(small_dataset: Path):
    for label in ("Normal", "Viral Pneumonia"):
        for path in small_dataset.glob(f"*/{label}/*"):
            img = _open(path)
            assert img.format == "JPEG" and img.mode == "RGB" and path.suffix in (".jpeg", ".jpg")
            rgb = np.asarray(img).astype(int)
            # grey content: R = G = B up to JPEG chroma rounding
            assert (
                np.abs(rgb[..., 0] - rgb[..., 1]).max() <= 3 and np.abs(rgb[..., 1] - rgb[..., 2]).max() <= 3
            )


def test_covid_format_mix_small_counts(small_dataset: Path):
    kinds = Counter()
    for path in small_dataset.glob("*/Covid/*"):
        img = _open(path)
        kind = (img.format, img.mode)
        if path.suffix == ".png":
            _, _, depth, color_type = _png_ihdr(path)
            kind += (depth,)
            if depth == 16:
                assert color_type == 6  # 16-bit RGBA
        kinds[kind] += 1
    assert kinds[("JPEG", "RGB")] >= 1
    assert kinds[("JPEG", "L")] >= 1
    assert kinds[("PNG", "L", 8)] >= 1
    assert kinds[("PNG", "RGBA", 8)] >= 1  # the one with transparency
    assert kinds[("PNG", "RGBA", 16)] == 1  # PIL opens 16-bit RGBA as 8-bit RGBA


def test_exactly_one_transparent_png_with_real_alpha(small_dataset: Path):
    alpha_min = {}
    for path in small_dataset.glob("*/Covid/*.png"):
        img = _open(path)
        if img.mode == "RGBA":
            alpha_min[path.name] = int(np.asarray(img)[..., 3].min())
    transparent = [name for name, a in alpha_min.items() if a < 255]
    assert len(transparent) == 1, alpha_min
    alpha = np.asarray(_open(next(small_dataset.glob(f"*/Covid/{transparent[0]}"))))[..., 3]
    assert (alpha == 0).mean() > 0.05 and (alpha == 255).mean() > 0.5  # a border, not the picture


def test_full_default_plan_matches_real_format_mix():
    # the file plan for KAGGLE_COUNTS, without rendering 317 images
    exts, kinds = Counter(), Counter()
    for split_id, split in enumerate(("train", "test")):
        for class_id, label in enumerate(CLASS_DIRS):
            n_large = 1 if (split, label) == ("train", "Covid") else 0  # as the generator does
            plan = syn._file_plan(
                0, split_id, class_id, KAGGLE_COUNTS[split][label], split == "train", n_large
            )
            assert len(plan) == KAGGLE_COUNTS[split][label]
            for kind, ext, large in plan:
                exts[ext] += 1
                kinds[(label, kind)] += 1
                kinds["large"] += large
                assert not large or (ext == ".jpeg" and kind == "rgb_jpeg")
    assert exts == {".jpeg": 238, ".jpg": 68, ".png": 11}
    assert kinds["large"] == 1
    assert kinds[("Covid", "rgba16_png")] == 1 and kinds[("Covid", "rgba_transparent_png")] == 1
    assert (
        kinds[("Covid", "l_png")] >= 3
        and kinds[("Covid", "rgb_png")] >= 1
        and kinds[("Covid", "rgba_png")] >= 1
    )
    assert kinds[("Covid", "l_jpeg")] >= 5
    assert all(kinds[(label, "rgb_jpeg")] == 90 for label in ("Normal", "Viral Pneumonia"))


# ---------------------------------------------------------------------------------------------
# determinism and ensure_synthetic_dataset
# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes(small_dataset: Path, tmp_path: Path):
    again = generate_synthetic_dataset(tmp_path / "again", seed=0, **FAST)
    assert _files(again) == _files(small_dataset)
    assert (again.parent / SYNTHETIC_MARKER).read_bytes() == (
        small_dataset.parent / SYNTHETIC_MARKER
    ).read_bytes()


def test_different_seed_differs(small_dataset: Path, tmp_path: Path):
    other = _files(generate_synthetic_dataset(tmp_path / "other", seed=1, **FAST))
    base = _files(small_dataset)
    assert len(other) == len(base)
    # compare images by (split, class, index) since the extension mix may move around
    strip = lambda files: {re.sub(r"\.\w+$", "", k): v for k, v in files.items()}  # noqa: E731
    a, b = strip(base), strip(other)
    assert set(a) == set(b)
    assert sum(a[k] != b[k] for k in a) == len(a)


def test_render_is_deterministic_and_well_formed():
    for label in CLASS_DIRS:
        a = render_radiograph(label, np.random.default_rng([7, 1]), size=128)
        b = render_radiograph(label, np.random.default_rng([7, 1]), size=128)
        assert a.shape == (128, 128) and a.dtype == np.float32
        assert 0.0 <= a.min() and a.max() <= 1.0
        np.testing.assert_array_equal(a, b)
        # dark air at the top corners, brighter body in the middle
        assert a[:8, :8].mean() < a[100:120, 54:74].mean()
    with pytest.raises(ValueError):
        render_radiograph("Pneumonia", np.random.default_rng(0))


def test_ensure_reuses_then_regenerates(tmp_path: Path):
    root = tmp_path / "synthetic"
    dataset = ensure_synthetic_dataset(root, seed=3, **TINY)
    first = lambda: next(dataset.glob("train/Normal/synthetic_0001.*"))  # noqa: E731
    probe = first()
    stamps = {p: p.stat().st_mtime_ns for p in [root / SYNTHETIC_MARKER, probe]}

    # same parameters: nothing is rewritten
    assert ensure_synthetic_dataset(root, seed=3, **TINY) == dataset
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # different seed: regenerated (new marker, new pixels)
    before = probe.read_bytes()
    assert ensure_synthetic_dataset(root, seed=4, **TINY) == dataset
    marker = (root / SYNTHETIC_MARKER).read_text(encoding="utf-8")
    assert json.loads(re.search(r"(\{.*\})", marker).group(1))["seed"] == 4
    assert first().read_bytes() != before

    # different counts: regenerated into a clean folder, only the requested files exist
    fewer = {"train": {c: 1 for c in CLASS_DIRS}}
    ensure_synthetic_dataset(root, seed=4, counts=fewer, size_range=(64, 96), n_large=0)
    assert len(list(dataset.rglob("synthetic_*"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]  # no temp/old folders left


def test_ensure_regenerates_when_files_missing(tmp_path: Path):
    root = tmp_path / "synthetic"
    dataset = ensure_synthetic_dataset(root, seed=0, **TINY)
    next(dataset.glob("test/Covid/*")).unlink()
    ensure_synthetic_dataset(root, seed=0, **TINY)
    assert len(list((dataset / "test" / "Covid").iterdir())) == 2


def test_refuses_to_overwrite_foreign_folder(tmp_path: Path):
    root = tmp_path / "real_data"
    root.mkdir()
    (root / "precious.txt").write_text("do not delete")
    with pytest.raises(FileExistsError):
        generate_synthetic_dataset(root, **TINY)
    assert (root / "precious.txt").read_text() == "do not delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real_data"]


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch):
    calls = {"n": 0}
    real_render = syn.render_radiograph

    def flaky(label, rng, size=256):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C half way
        return real_render(label, rng, size=size)

    monkeypatch.setattr(syn, "render_radiograph", flaky)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_dataset(tmp_path / "synthetic", **TINY)
    assert list(tmp_path.iterdir()) == []  # no half dataset, no temp folder


# ---------------------------------------------------------------------------------------------
# write_png16
# ---------------------------------------------------------------------------------------------


def test_write_png16_rgba_reads_back_as_high_byte(tmp_path: Path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65536, size=(37, 53, 4), dtype=np.uint16)
    arr[..., 3] = np.linspace(0, 65535, 53).astype(np.uint16)  # includes real transparency
    path = tmp_path / "rgba16.png"
    write_png16(path, arr)
    assert _png_ihdr(path) == (53, 37, 16, 6)
    img = _open(path)
    assert img.mode == "RGBA" and img.size == (53, 37)
    got = np.asarray(img).astype(int)
    assert np.abs(got - (arr >> 8).astype(int)).max() <= 1  # PIL keeps (about) the high byte


def test_write_png16_gray_reads_back_exactly(tmp_path: Path):
    arr = (np.arange(40 * 30, dtype=np.uint32) * 54).reshape(40, 30).astype(np.uint16)
    arr[0, 0], arr[-1, -1] = 0, 65535
    path = tmp_path / "gray16.png"
    write_png16(path, arr)
    assert _png_ihdr(path) == (30, 40, 16, 0)
    img = _open(path)
    assert img.mode in ("I;16", "I;16B", "I")
    np.testing.assert_array_equal(np.asarray(img).astype(np.int64), arr.astype(np.int64))


def test_write_png16_rejects_bad_input(tmp_path: Path):
    with pytest.raises(TypeError):
        write_png16(tmp_path / "x.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError):
        write_png16(tmp_path / "x.png", np.zeros((4, 4, 5), dtype=np.uint16))


# ---------------------------------------------------------------------------------------------
# the classes are visibly different
# ---------------------------------------------------------------------------------------------


def _region(img: np.ndarray, ax0: float, ax1: float, y0: float, y1: float) -> np.ndarray:
    """Pixels of both hemithoraces with ax0 <= |x| <= ax1, y0 <= y <= y1 (image coords in [-1, 1])."""
    n = img.shape[0]
    px = lambda v: int(round((v + 1) / 2 * n))  # noqa: E731
    rows = slice(px(y0), px(y1))
    return np.concatenate([img[rows, px(-ax1) : px(-ax0)].ravel(), img[rows, px(ax0) : px(ax1)].ravel()])


def _box_mean(img: np.ndarray, w: int) -> np.ndarray:
    """w x w moving average (edge-padded), via a 2-D cumulative sum."""
    n = img.shape[0]
    c = np.cumsum(np.cumsum(np.pad(img, w // 2 + 1, mode="edge"), axis=0), axis=1)
    return (c[w : w + n, w : w + n] - c[:n, w : w + n] - c[w : w + n, :n] + c[:n, :n]) / (w * w)


def _class_stats(label: str, n: int = 10) -> tuple[float, float]:
    """Averaged over n renders: (texture energy inside the mid lungs, lower-lateral minus upper lung brightness)."""
    texture, basal = [], []
    for i in range(n):
        img = render_radiograph(label, np.random.default_rng([2024, i]), size=256).astype(np.float64)
        band = _box_mean(img, 3) - _box_mean(img, 9)  # band-pass: fine lines, not pixel noise
        texture.append(np.mean(_region(band, 0.3, 0.6, -0.4, 0.0) ** 2) * 1e4)
        basal.append(_region(img, 0.5, 0.72, 0.1, 0.35).mean() - _region(img, 0.3, 0.55, -0.45, -0.2).mean())
    return float(np.mean(texture)), float(np.mean(basal))


@pytest.fixture(scope="module")
def class_stats() -> dict[str, tuple[float, float]]:
    return {label: _class_stats(label) for label in CLASS_DIRS}


def test_viral_pneumonia_has_interstitial_texture(class_stats):
    vp, normal, covid = (class_stats[c][0] for c in ("Viral Pneumonia", "Normal", "Covid"))
    assert vp > 1.3 * normal and vp > 1.3 * covid, class_stats


def test_covid_has_basal_peripheral_opacities(class_stats):
    covid, normal, vp = (class_stats[c][1] for c in ("Covid", "Normal", "Viral Pneumonia"))
    assert covid > normal + 0.04 and covid > vp + 0.04, class_stats


# ---------------------------------------------------------------------------------------------
# the 4200x4095 image like the real maximum (a second or two)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_large_image(tmp_path: Path):
    counts = {"train": {"Covid": 5}}
    dataset = generate_synthetic_dataset(tmp_path / "big", counts=counts, size_range=(96, 160), n_large=1)
    sizes = Counter(_open(p).size for p in dataset.glob("train/Covid/*"))
    assert sizes[(4200, 4095)] == 1 and sum(sizes.values()) == 5
    big = next(p for p in dataset.glob("train/Covid/*") if _open(p).size == (4200, 4095))
    assert big.suffix == ".jpeg" and _open(big).mode == "RGB"
    # the empty classes/splits still exist as folders, like the real layout
    assert all((dataset / s / c).is_dir() for s in ("train", "test") for c in CLASS_DIRS)
