"""Deterministic SYNTHETIC stand-in for the Kaggle COVID-19 chest X-ray dataset.

The real dataset (``pranavraikokte/covid19-image-dataset``) looks like this on disk::

    Covid19-dataset/
        train/{Covid,Normal,Viral Pneumonia}/   111 / 70 / 70 images
        test/{Covid,Normal,Viral Pneumonia}/     26 / 20 / 20 images

with a messy mix of formats: 238 ``.jpeg``, 68 ``.jpg`` and 11 ``.png`` files; Normal and Viral
Pneumonia are RGB JPEGs, Covid mixes RGB and 8-bit grayscale JPEG/PNG, RGBA PNGs (one with real
transparency) and one 16-bit RGBA PNG; sizes go from ~340 px up to 4200x4095 px.

This module writes a look-alike tree (same folders, same counts, same format mix) filled with
procedurally drawn chest radiographs, so the project's real image-loading path (PIL decoding of
every mode, resizing, class folders with a space in the name, ...) can be exercised offline.

The pictures are *radiologically motivated* but entirely fake:

* anatomy: dark air background, body silhouette, two dark lung fields, bright mediastinum and
  heart shadow (slightly to the patient's left = image right), spine, clavicles, ribs, diaphragm
  domes, hilar vessels, film noise;
* ``Normal``: clear lung fields;
* ``Viral Pneumonia``: diffuse bilateral interstitial (reticulonodular) pattern in both lungs;
* ``Covid``: bilateral, peripheral, lower-zone ground-glass opacities (hazy patches).

Every image gets random pose, anatomy, exposure, severity and noise, so the task is learnable but
not trivial. Everything is deterministic given ``seed``: image ``i`` (0-based; file
``synthetic_{i+1:04d}``) of ``split``/``class`` is drawn from
``np.random.default_rng([seed, split_id, class_id, i])`` with split_id/class_id the positions in
``("train", "test")`` and :data:`CLASS_DIRS`. Files are byte-identical between runs with the same
numpy/Pillow versions on the same machine (other CPUs may differ in the last float bits).

Pictures are rendered at 256 px (384/512 for the few very large files) with numpy + PIL and
upscaled bicubically to the file size, so the default 317-image set takes ~10 s.

A marker file (:data:`SYNTHETIC_MARKER`) at the generated root says loudly that the data is
synthetic and records the generation parameters, so :func:`ensure_synthetic_dataset` can cheaply
decide whether an existing tree can be reused.

Public API: :func:`render_radiograph`, :func:`generate_synthetic_dataset`,
:func:`ensure_synthetic_dataset`, :func:`write_png16` and the constants below.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import uuid
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "CLASS_DIRS",
    "GENERATOR_VERSION",
    "KAGGLE_COUNTS",
    "SYNTHETIC_MARKER",
    "ensure_synthetic_dataset",
    "generate_synthetic_dataset",
    "render_radiograph",
    "write_png16",
]

SYNTHETIC_MARKER = "SYNTHETIC_DATA.md"  # file written at the generated root
GENERATOR_VERSION = 1  # bump whenever the output for a given seed changes
CLASS_DIRS = ("Covid", "Normal", "Viral Pneumonia")
KAGGLE_COUNTS = {
    "train": {"Covid": 111, "Normal": 70, "Viral Pneumonia": 70},
    "test": {"Covid": 26, "Normal": 20, "Viral Pneumonia": 20},
}

DATASET_DIRNAME = "Covid19-dataset"
SPLITS = ("train", "test")  # index = split_id used in the per-image seed
LARGE_SIZE = (4200, 4095)  # (width, height) of the largest real image
JPEG_QUALITY = 90

# Format mix of the real Covid folder (137 images): 11 PNG of which exactly one 16-bit RGBA and
# exactly one RGBA with real transparency. The L-JPEG share is a guess (the real count is unknown).
_REAL_COVID_TOTAL = 137
_REAL_PNG, _REAL_RGBA_OPAQUE, _REAL_RGB_PNG, _REAL_L_JPEG = 11, 2, 2, 20
_JPG_FRACTION = 68 / 306  # share of '.jpg' among the real JPEG files (238 .jpeg + 68 .jpg)

_MARKER_RE = re.compile(r"<!--\s*cxrtrack-synthetic\s+(\{.*\})\s*-->")

# ----------------------------------------------------------------------------------------------
# Small image helpers (PIL does the heavy lifting: its blur/resize are fast and deterministic)
# ----------------------------------------------------------------------------------------------


def _soften(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-blur a [0, 1] mask by ``sigma`` px (PIL works on 8-bit: plenty for masks)."""
    img = Image.fromarray(np.round(np.clip(np.asarray(mask, dtype=np.float32), 0, 1) * 255).astype(np.uint8))
    if sigma >= 0.3:
        img = img.filter(ImageFilter.GaussianBlur(sigma))
    return np.asarray(img, dtype=np.float32) * (1 / 255)


def _ramp(d: np.ndarray, width: float) -> np.ndarray:
    """Soft edge: 0 for d <= -2 width, 0.5 at d = 0, 1 for d >= 2 width (linear in between)."""
    return np.clip(0.5 + d * (0.25 / width), 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, shape, corr: float) -> np.ndarray:
    """Smooth random field (zero mean, unit std) with blobs ~``corr`` px across.

    Made by bicubic upsampling of a coarse white-noise grid (much cheaper than blurring).
    """
    h, w = shape
    grid = rng.standard_normal((max(2, round(h / corr)), max(2, round(w / corr)))).astype(np.float32)
    f = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    return (f - f.mean()) / (f.std() + 1e-8)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
#
# The radiograph is drawn as an *attenuation map* A (how much tissue the X-rays cross) in
# "anatomy units": x to the image right (= patient's left in a PA view), y downwards, the chest
# spanning roughly [-0.9, 0.9]. Each output pixel is mapped back into anatomy units through a
# random pose (rotation, scale, shift), so every shape below is evaluated directly on the
# output grid. The film response is then I = 1 - exp(-gain * A): air black, bone white.


class _Pose:
    """Random patient position: output pixel grid <-> anatomy units."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.theta = math.radians(rng.uniform(-4.0, 4.0))
        self.scale = rng.uniform(0.92, 1.06)
        self.tx, self.ty = rng.uniform(-0.05, 0.05), rng.uniform(-0.04, 0.06)
        self.k = n / 2.0  # output pixels per unit; the field of view is [-1, 1]^2
        self.px_per_unit = self.k * self.scale  # for widths and blur radii
        c, s = math.cos(self.theta), math.sin(self.theta)
        u = (np.arange(n, dtype=np.float32) + 0.5) / self.k - 1.0
        U, V = np.meshgrid(u - self.tx, u - self.ty)
        self.x = ((c * U + s * V) / self.scale).astype(np.float32)
        self.y = ((-s * U + c * V) / self.scale).astype(np.float32)

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        """Anatomy units -> output pixel coordinates (for PIL drawing)."""
        c, s = math.cos(self.theta), math.sin(self.theta)
        u = self.scale * (c * x - s * y) + self.tx
        v = self.scale * (s * x + c * y) + self.ty
        return (u + 1.0) * self.k, (v + 1.0) * self.k


def _sample_anatomy(rng: np.random.Generator) -> dict:
    """Per-patient anatomy: lung height, diaphragm, heart size/position, ribs, body habitus."""
    apex_y = -0.70 + rng.uniform(-0.04, 0.04)
    base_y = 0.50 + rng.uniform(-0.05, 0.06)
    chest_w = rng.uniform(0.78, 0.87)
    return {
        "apex_y": apex_y,  # top of the lung apices
        "base_y": base_y,  # costophrenic angles (lowest lung point)
        "dome": rng.uniform(0.10, 0.16),  # height of the diaphragm domes
        "right_dome_up": rng.uniform(0.02, 0.07),  # patient's right hemidiaphragm sits higher
        "chest_w": chest_w,  # lateral lung edge at the bases
        "body_w": chest_w + rng.uniform(0.07, 0.13),  # soft-tissue half width
        "thickness": rng.uniform(0.9, 1.12),  # patient size -> overall density
        "heart_cx": rng.uniform(0.08, 0.14),
        "heart_cy": base_y - rng.uniform(0.17, 0.23),
        "heart_rx": rng.uniform(0.30, 0.37),
        "heart_ry": rng.uniform(0.20, 0.25),
        "heart_tilt": rng.uniform(0.25, 0.5),  # radians: long axis slopes down to the apex (image right)
        "med_w": rng.uniform(0.10, 0.14),  # half width of the superior mediastinum
        "rib_y0": apex_y + rng.uniform(-0.06, -0.02),  # first posterior rib (medial end)
        "rib_dy": rng.uniform(0.098, 0.115),  # posterior rib spacing
        "clav_y": apex_y + rng.uniform(0.05, 0.11),  # medial end of the clavicles
        "hilum_y": rng.uniform(-0.16, -0.06),
    }


def _lateral_edge(anat: dict, t):
    """|x| of a lung's lateral edge at relative height t (0 = apex, 1 = base): rounded apex."""
    return 0.30 + (anat["chest_w"] - 0.30) * np.clip(t, 0.0, 1.0) ** 0.35


def _lung_geometry(x, y, anat, side: int):
    """Hard mask of one lung field (side -1 = image left = patient's right), t and lateral edge.

    The lung is parametrised by t = 0 at the apex .. 1 at the diaphragm, which is itself a dome
    depending on x; the lateral edge widens like t^0.35, the medial edge follows the mediastinum.
    """
    ax = side * x  # distance from the midline, positive on this side
    dome_up = anat["right_dome_up"] if side < 0 else 0.0
    dome = anat["dome"] * np.clip(1.0 - ((ax - 0.45) / 0.38) ** 2, 0.0, 1.0)
    t = (y - anat["apex_y"]) / (anat["base_y"] - dome_up - dome - anat["apex_y"])
    lateral = _lateral_edge(anat, t)
    medial = 0.30 - 0.24 * np.sqrt(np.clip(t, 0.0, 1.0))
    inside = (t >= 0) & (t <= 1) & (ax > medial) & (ax < lateral)
    return inside, t, lateral


def _draw_vessels(pose: _Pose, anat: dict, rng: np.random.Generator) -> np.ndarray:
    """Pulmonary vessels: tapering branches radiating from each hilum, values in [0, 1]."""
    n = pose.x.shape[0]
    img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(img)
    # random numbers drawn in bulk (far faster than one Generator call per segment)
    wiggle = iter(rng.normal(0.0, 0.2, size=4096))
    unif = iter(rng.random(size=4096))
    step = 0.05
    for side in (-1, 1):
        hx, hy = side * 0.19, anat["hilum_y"] + (0.03 if side < 0 else -0.01)
        for _ in range(int(rng.integers(9, 13))):  # main branches, more towards the lower zones
            ang = -1.2 + 2.7 * next(unif)
            # start somewhere in the hilum, not all from one point
            sx = hx + side * 0.05 * next(unif) * math.cos(ang)
            sy = hy + 0.08 * (next(unif) - 0.5)
            stack = [(sx, sy, ang, 0.3 + 0.3 * next(unif), 0.014, 0.6 + 0.4 * next(unif))]
            while stack:
                px, py, ang, length, width, val = stack.pop()  # ang 0 = lateral, > 0 = downward
                for _ in range(max(1, int(length / step))):
                    ang += next(wiggle)
                    nx, ny = px + side * math.cos(ang) * step, py + math.sin(ang) * step
                    draw.line(
                        [pose.to_px(px, py), pose.to_px(nx, ny)],
                        fill=int(255 * val),
                        width=max(1, int(round(width * pose.px_per_unit))),
                    )
                    px, py, width, val = nx, ny, width * 0.85, val * 0.88
                    if next(unif) < 0.25 and width > 0.004:  # side branch
                        turn = (0.4 + 0.5 * next(unif)) * (1 if next(unif) < 0.5 else -1)
                        stack.append((px, py, ang + turn, length * 0.5, width * 0.8, val * 0.9))
    img = img.filter(ImageFilter.GaussianBlur(0.005 * pose.px_per_unit))
    return np.asarray(img, dtype=np.float32) * (1 / 255)


def _bone(dist: np.ndarray, half_w) -> np.ndarray:
    """Profile across a bone of half width ``half_w``: flat band with brighter cortical rims."""
    r = dist / half_w
    band = 1.0 / (1.0 + r**6)
    cortex = np.exp(-(((np.abs(r) - 1.0) / 0.35) ** 2))
    return band + 0.35 * cortex


def _nearest_rib(u: np.ndarray, anat: dict, n_ribs: int = 10):
    """Rib k sits at u = rib_y0 + rib_dy * (k + 0.03 k^2) (spacing grows downward). Return each
    pixel's vertical distance to its nearest rib and that rib's index (solving for k)."""
    q = (u - anat["rib_y0"]) / anat["rib_dy"]
    k = np.clip(np.round((np.sqrt(np.clip(1 + 0.12 * q, 0, None)) - 1) / 0.06), 0, n_ribs - 1)
    return u - (anat["rib_y0"] + anat["rib_dy"] * (k + 0.03 * k * k)), k


def _anatomy(pose: _Pose, anat: dict, rng: np.random.Generator):
    """Attenuation map of a healthy chest, the soft lung mask and per-side lung geometry."""
    x, y, K = pose.x, pose.y, pose.px_per_unit
    ax = np.abs(x)

    # body silhouette: neck at the top, shoulders/arms running off the upper corners
    bw = anat["body_w"]
    hw = np.interp(
        y,
        [-1.3, -1.0, -0.9, -0.78, -0.6, 0.3, 1.3],
        [0.16, 0.18, 0.40, bw + 0.06, bw + 0.08, bw + 0.02, bw + 0.05],
    )
    hw = hw.astype(np.float32)
    r = ax / hw
    body = _ramp(1.0 - r, 0.015)
    path = np.sqrt(np.clip(1.0 - r**2, 0.0, 1.0))  # path length through an elliptic cross-section
    A = anat["thickness"] * (0.62 + 0.55 * path) * body

    # lungs (hard masks first; mediastinum and heart are carved out of them)
    lung_hard = np.zeros(x.shape, dtype=bool)
    below_diaphragm = np.ones(x.shape, dtype=bool)
    geo = {}
    for side in (-1, 1):
        inside, t, lateral = _lung_geometry(x, y, anat, side)
        lung_hard |= inside
        below_diaphragm &= ~(((side * x) > 0) & (t < 1))
        geo[side] = (t, lateral)

    # mediastinum (with the aortic knob bulging to the image right) and a tilted-ellipse heart
    knob = 0.055 * np.exp(-(((y + 0.30) / 0.07) ** 2)) * (x > 0)
    med = (np.abs(x - 0.012) < anat["med_w"] + knob) & (y < anat["base_y"])
    c, s = math.cos(anat["heart_tilt"]), math.sin(anat["heart_tilt"])
    hx, hy = x - anat["heart_cx"], y - anat["heart_cy"]
    heart_r2 = ((c * hx + s * hy) / anat["heart_rx"]) ** 2 + ((-s * hx + c * hy) / anat["heart_ry"]) ** 2
    lung_hard &= ~(med | (heart_r2 < 1.0))

    lung = _soften(lung_hard, 0.012 * K)  # soft lung mask in [0, 1]
    depth = _soften(lung_hard, 0.07 * K)  # ~1 in the middle of a lung, lower near its edges
    A -= 0.80 * lung * (0.35 + 0.65 * depth) * anat["thickness"]
    # extra soft-tissue density: mediastinum, heart, liver/abdomen (one blur for all three)
    extra = 0.3 * med + 0.25 * np.sqrt(np.clip(1.0 - heart_r2, 0, 1)) + 0.3 * below_diaphragm * body
    A += 0.4 * _soften(extra, 0.01 * K)
    # trachea: a dark air column above the carina
    A -= 0.12 * _ramp(0.022 - np.abs(x - 0.01), 0.006) * _ramp(-0.22 - y, 0.02)

    # spine, with faint vertebral end-plates every ~0.1 units
    spine = _ramp(0.055 - ax, 0.01) * _ramp(y + 1.0, 0.02)
    A += spine * (0.20 + 0.06 * np.cos(2 * np.pi * (y - anat["rib_y0"]) / 0.1))

    # ribs. Posterior ribs leave the spine almost horizontally and curve down laterally:
    # y = y0_k - 0.10|x| + 0.62|x|^2. Anterior ribs run from the lateral end down towards the
    # midline (fainter). Distances are measured vertically (fine for gentle slopes).
    lat = anat["chest_w"] + 0.07
    thorax = body * _ramp(anat["base_y"] + 0.05 - y, 0.05)  # ribs fade out below the diaphragm
    dist, k = _nearest_rib(y - (-0.10 * ax + 0.62 * ax**2), anat)
    ribs = _bone(dist, 0.021 + 0.0015 * k) * _ramp(ax - 0.06, 0.03)
    y_lat = -0.10 * lat + 0.62 * lat**2
    dist, _ = _nearest_rib(y - (y_lat - 0.05 + 0.30 * (lat - ax) - 0.10 * (lat - ax) ** 2), anat)
    ribs += 0.45 * _bone(dist, 0.018) * _ramp(ax - 0.28, 0.03)
    A += 0.065 * ribs * thorax * _ramp(lat - ax, 0.03)

    # clavicles: from the sternal end up and out to the shoulders, slightly S-shaped
    clav_dist = y - (anat["clav_y"] - 0.26 * (ax - 0.08) + 0.035 * np.sin((ax - 0.08) / 0.55 * 2 * np.pi))
    A += 0.28 * _bone(clav_dist, 0.028) * _ramp(ax - 0.07, 0.03) * _ramp(0.68 - ax, 0.03)

    # hila and vessels (vessels only show against lung air)
    for side in (-1, 1):
        A += 0.14 * np.exp(((x - side * 0.17) ** 2 + (y - anat["hilum_y"]) ** 2) * (-1 / (2 * 0.045**2)))
    A += 0.22 * _draw_vessels(pose, anat, rng) * lung
    return A, lung, geo


def _ground_glass(pose: _Pose, lung, geo, anat, rng) -> np.ndarray:
    """Covid: bilateral, peripheral, lower-zone ground-glass opacities (hazy patches)."""
    x, y = pose.x, pose.y
    severity = rng.uniform(0.45, 1.0)
    field = np.zeros_like(x)
    for side in (-1, 1):  # bilateral
        for _ in range(int(rng.integers(2, 5))):
            tb = rng.uniform(0.45, 0.95)  # lower zones
            # patch centre just inside the lateral edge of the lung at that height (periphery)
            cx = side * (float(_lateral_edge(anat, tb)) - rng.uniform(0.05, 0.14))
            cy = anat["apex_y"] + tb * (anat["base_y"] - anat["dome"] * 0.5 - anat["apex_y"])
            sx, sy = rng.uniform(0.08, 0.15), rng.uniform(0.10, 0.18)
            field += rng.uniform(0.6, 1.0) * np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))
    # patchy texture inside the haze, and a peripheral bias (subpleural distribution)
    texture = np.clip(1.0 + 0.35 * _smooth_noise(rng, x.shape, 0.11 * pose.px_per_unit), 0.2, None)
    periph = np.zeros_like(x)
    for side in (-1, 1):
        _, lateral = geo[side]
        periph = np.maximum(periph, np.clip(1.0 - (lateral - side * x) / 0.35, 0, 1) * (side * x > 0))
    field = np.clip(field, 0, 1.3) * texture * (0.55 + 0.45 * periph)
    return 0.36 * severity * field * lung


def _interstitial(pose: _Pose, lung, anat, rng) -> np.ndarray:
    """Viral pneumonia: diffuse bilateral reticular / reticulonodular interstitial pattern."""
    x, y, K = pose.x, pose.y, pose.px_per_unit
    severity = rng.uniform(0.5, 1.0)
    # zero-crossings of band-limited noise form a network of curvy lines ("reticulation"): a fine
    # and a coarser net, with patchy strength so it does not look like a uniform overlay
    lines = np.zeros_like(x)
    for corr, weight in ((0.03, 0.6), (0.06, 0.5)):
        band = _smooth_noise(rng, x.shape, corr * K) - 0.5 * _smooth_noise(rng, x.shape, 3 * corr * K)
        lines += weight * np.exp(-((band / (0.45 * (band.std() + 1e-8))) ** 2))
    lines *= np.clip(1.0 + 0.4 * _smooth_noise(rng, x.shape, 0.2 * K), 0.3, None)
    # small nodules scattered through both lungs
    n = x.shape[0]
    canvas = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(canvas)
    count = int(rng.integers(250, 600))
    centres, radii = rng.uniform(0, n, size=(count, 2)), rng.uniform(0.005, 0.011, size=count) * K
    for (cx, cy), rad in zip(centres, radii, strict=True):
        draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=255)
    dots = np.asarray(canvas.filter(ImageFilter.GaussianBlur(0.004 * K)), dtype=np.float32) * (1 / 255)
    # mild perihilar / basal predominance, but present everywhere in both lungs
    haze = 0.6 + 0.4 * np.exp(-((np.abs(x) - 0.22) ** 2 + (y - anat["hilum_y"] - 0.15) ** 2) / (2 * 0.3**2))
    return 0.26 * severity * (0.75 * lines + 0.6 * dots + 0.2) * haze * lung


def render_radiograph(label: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """float32 array in [0,1], shape (size,size): a frontal chest radiograph of class label (one of CLASS_DIRS).

    All randomness (pose, anatomy, pathology, exposure, noise) comes from ``rng``, so the same
    generator state always gives the same picture.
    """
    if label not in CLASS_DIRS:
        raise ValueError(f"unknown label {label!r}; expected one of {CLASS_DIRS}")
    n = int(size)
    if n < 32:
        raise ValueError("size must be >= 32")

    pose = _Pose(n, rng)
    anat = _sample_anatomy(rng)
    A, lung, geo = _anatomy(pose, anat, rng)
    if label == "Covid":
        A += _ground_glass(pose, lung, geo, anat, rng)
    elif label == "Viral Pneumonia":
        A += _interstitial(pose, lung, anat, rng)

    # film response + exposure / contrast variation
    img = 1.0 - np.exp(-rng.uniform(0.85, 1.25) * np.clip(A, 0, None))
    fog = rng.uniform(0.02, 0.07)
    img = np.clip(fog + (1.0 - fog) * img, 0, 1) ** rng.uniform(0.85, 1.25)
    img = (img - 0.5) * rng.uniform(0.9, 1.1) + 0.5 + rng.uniform(-0.04, 0.04)
    # a faint vertical exposure gradient (heel effect) and film/quantum noise
    img += rng.uniform(-0.03, 0.03) * np.linspace(-1, 1, n, dtype=np.float32)[:, None]
    img += rng.uniform(0.006, 0.018) * rng.standard_normal((n, n), dtype=np.float32)
    img += rng.uniform(0.004, 0.012) * _smooth_noise(rng, (n, n), 0.025 * n)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Writing files
# ----------------------------------------------------------------------------------------------


def write_png16(path, array_uint16: np.ndarray) -> None:
    """Write a 16-bit PNG (HxW gray -> color type 0, or HxWx4 RGBA -> color type 6, bit depth 16) with
    zlib+struct (Pillow cannot write 16-bit RGBA). Tests elsewhere use this too.

    HxWx2 (gray+alpha, color type 4) and HxWx3 (RGB, color type 2) are accepted as well. Values
    are stored big-endian as the PNG spec requires; every row uses the "Up" filter.
    """
    arr = np.asarray(array_uint16)
    if arr.dtype != np.uint16:
        raise TypeError(f"expected a uint16 array, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"expected HxW or HxWxC (C in 1..4) array, got shape {np.shape(array_uint16)}")
    height, width, channels = arr.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]

    rows = arr.astype(">u2").reshape(height, width * channels).view(np.uint8)  # big-endian bytes
    # PNG filter type 2 ("Up"): each byte minus the byte above it, modulo 256 (the row above the
    # first one counts as zeros). Smooth images compress much better than unfiltered.
    up = rows.copy()
    up[1:] -= rows[:-1]
    raw = np.concatenate([np.full((height, 1), 2, dtype=np.uint8), up], axis=1)  # filter byte per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + chunk(b"IEND", b"")
    )
    Path(path).write_bytes(png)


# File kinds: (format name, extension family). Covid uses all of them, the others only RGB JPEG.
_RGB_JPEG, _L_JPEG = "rgb_jpeg", "l_jpeg"
_L_PNG, _RGB_PNG, _RGBA_PNG = "l_png", "rgb_png", "rgba_png"
_RGBA_TRANSPARENT, _RGBA16 = "rgba_transparent_png", "rgba16_png"


def _covid_kinds(n: int, with_unique: bool) -> list[str]:
    """Formats for ``n`` Covid images of one split, in proportion to the real folder.

    The two one-off files (16-bit RGBA, RGBA with transparency) go only to the first split that
    has Covid images; every special format gets at least one file when ``n`` allows it. Priority
    order decides what is dropped when ``n`` is tiny.
    """
    frac = n / _REAL_COVID_TOTAL
    n_png = round(_REAL_PNG * frac)
    n_rgba, n_rgb_png = round(_REAL_RGBA_OPAQUE * frac), round(_REAL_RGB_PNG * frac)
    n_unique = 2 if with_unique else 0
    n_l_png = max(1, n_png - n_unique - n_rgba - n_rgb_png)
    n_l_jpeg = max(1, round(_REAL_L_JPEG * frac))
    special = ([_RGBA16, _RGBA_TRANSPARENT] if with_unique else []) + [_L_PNG, _L_JPEG]
    special += (
        [_L_PNG] * (n_l_png - 1) + [_L_JPEG] * (n_l_jpeg - 1) + [_RGBA_PNG] * n_rgba + [_RGB_PNG] * n_rgb_png
    )
    special = special[:n]
    return special + [_RGB_JPEG] * (n - len(special))


def _file_plan(seed: int, split_id: int, class_id: int, n: int, with_unique: bool, n_large: int):
    """Per-image (kind, extension, is_large) for one class folder; deterministic given seed."""
    kinds = _covid_kinds(n, with_unique) if CLASS_DIRS[class_id] == "Covid" else [_RGB_JPEG] * n
    rng = np.random.default_rng([seed, split_id, class_id, 1_000_000])  # separate from image seeds
    kinds = [kinds[j] for j in rng.permutation(n)]  # scatter the special formats
    jpeg_idx = [i for i, k in enumerate(kinds) if k in (_RGB_JPEG, _L_JPEG)]
    n_jpg = round(len(jpeg_idx) * _JPG_FRACTION)
    jpg = {jpeg_idx[j] for j in rng.permutation(len(jpeg_idx))[:n_jpg]}
    # large files: the first n_large RGB JPEGs (always '.jpeg')
    large = [i for i, k in enumerate(kinds) if k == _RGB_JPEG][:n_large]
    jpg -= set(large)
    plan = []
    for i, kind in enumerate(kinds):
        ext = ".png" if kind.endswith("png") else (".jpg" if i in jpg else ".jpeg")
        plan.append((kind, ext, i in large))
    return plan


def _save(path: Path, gray: np.ndarray, kind: str, rng: np.random.Generator) -> None:
    """Save a float [0,1] grayscale picture in the requested file kind (R=G=B for colour kinds)."""
    u8 = np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8)
    if kind == _RGBA16:
        u16 = np.round(np.clip(gray, 0, 1) * 65535).astype(np.uint16)
        alpha = np.full_like(u16, 65535)
        write_png16(path, np.stack([u16, u16, u16, alpha], axis=-1))
        return
    if kind in (_RGB_JPEG, _L_JPEG):
        img = Image.fromarray(u8)  # uint8 2-D -> mode "L"
        if kind == _RGB_JPEG:
            img = img.convert("RGB")
        img.save(path, format="JPEG", quality=JPEG_QUALITY)
        return
    if kind == _L_PNG:
        Image.fromarray(u8).save(path, format="PNG")
        return
    if kind == _RGB_PNG:
        Image.fromarray(u8).convert("RGB").save(path, format="PNG")
        return
    alpha = np.full_like(u8, 255)
    if kind == _RGBA_TRANSPARENT:
        # real transparency: a padded border (like a letter-boxed export) is fully transparent
        h, w = u8.shape
        bx, by = max(2, int(w * rng.uniform(0.04, 0.09))), max(2, int(h * rng.uniform(0.02, 0.05)))
        alpha[:, :bx] = alpha[:, w - bx :] = 0
        alpha[:by, :] = alpha[h - by :, :] = 0
        u8 = np.where(alpha == 0, 0, u8).astype(np.uint8)
    rgba = np.stack([u8, u8, u8, alpha], axis=-1)
    Image.fromarray(rgba).save(path, format="PNG")


def _normalize_counts(counts) -> dict:
    """Full ``{split: {class: int}}`` dict (missing entries = 0), validated."""
    counts = KAGGLE_COUNTS if counts is None else counts
    unknown = set(counts) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected {SPLITS}")
    out = {}
    for split in SPLITS:
        per_class = dict(counts.get(split, {}))
        bad = set(per_class) - set(CLASS_DIRS)
        if bad:
            raise ValueError(f"unknown class(es) {sorted(bad)} in split {split!r}; expected {CLASS_DIRS}")
        out[split] = {c: int(per_class.get(c, 0)) for c in CLASS_DIRS}
        if any(v < 0 for v in out[split].values()):
            raise ValueError("counts must be >= 0")
    return out


def _params(seed, counts, size_range, n_large) -> dict:
    """What the marker records and what ensure_synthetic_dataset compares."""
    lo, hi = (int(v) for v in size_range)
    if not 32 <= lo <= hi:
        raise ValueError(f"size_range must satisfy 32 <= lo <= hi, got {size_range}")
    if int(seed) < 0:
        raise ValueError("seed must be >= 0")
    return {
        "generator": "cxrtrack.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "counts": _normalize_counts(counts),
        "size_range": [lo, hi],
        "n_large": max(0, int(n_large)),
    }


def _marker_text(params: dict) -> str:
    n = sum(sum(c.values()) for c in params["counts"].values())
    return f"""# ⚠️ SYNTHETIC DATA — NOT REAL CHEST X-RAYS ⚠️

**Every image under `{DATASET_DIRNAME}/` in this folder is SYNTHETIC.**

It was generated procedurally by `cxrtrack` (`cxrtrack.data.synthetic`, generator version
{params["generator_version"]}, seed {params["seed"]}, {n} images) to mimic the *layout and file formats* of the Kaggle
dataset `pranavraikokte/covid19-image-dataset`, so that the training pipeline can be exercised
offline. No patient data was used. The "Covid", "Normal" and "Viral Pneumonia" pictures are
cartoons with hand-made patterns (peripheral ground glass / clear lungs / reticular lines).

**Any metric, model or figure produced from this data means NOTHING clinically.** Do not report
it as a result about COVID-19, pneumonia or chest radiography.

Regenerate with `cxrtrack.data.synthetic.ensure_synthetic_dataset(...)`. The line below is read
by that function — do not edit it.

<!-- cxrtrack-synthetic {json.dumps(params, sort_keys=True)} -->
"""


def _read_marker(root: Path):
    """Parameters recorded in root/SYNTHETIC_DATA.md, or None if missing/unreadable."""
    try:
        text = (root / SYNTHETIC_MARKER).read_text(encoding="utf-8")
    except OSError:
        return None
    match = _MARKER_RE.search(text)
    if not match:
        return None
    try:
        return json.loads(match.group(1))
    except json.JSONDecodeError:
        return None


def _render_size(width: int, height: int) -> int:
    """Internal render resolution, then bicubic upscaling to the file size. 256 px keeps the
    default 317-image set at a few seconds; bigger files get a little more detail, files smaller
    than 256 px are rendered at their own size."""
    big = max(width, height)
    return max(32, big) if big <= 256 else 256 if big <= 1400 else 384 if big <= 2400 else 512


def _write_tree(dest: Path, params: dict, progress: bool) -> None:
    """Write dest/Covid19-dataset/... (everything except the marker)."""
    seed, (lo, hi) = params["seed"], params["size_range"]
    first_covid_split = next((s for s in SPLITS if params["counts"][s]["Covid"] > 0), None)
    for split_id, split in enumerate(SPLITS):
        for class_id, label in enumerate(CLASS_DIRS):
            n = params["counts"][split][label]
            folder = dest / DATASET_DIRNAME / split / label
            folder.mkdir(parents=True, exist_ok=True)
            n_large = params["n_large"] if (split == "train" and label == "Covid") else 0
            plan = _file_plan(seed, split_id, class_id, n, split == first_covid_split, n_large)
            for i, (kind, ext, large) in enumerate(plan):
                rng = np.random.default_rng([seed, split_id, class_id, i])
                if large:
                    width, height = LARGE_SIZE
                else:  # not square: the two sides differ a little
                    width = int(rng.integers(lo, hi + 1))
                    height = int(np.clip(round(width * rng.uniform(0.85, 1.15)), lo, hi))
                gray = render_radiograph(label, rng, size=_render_size(width, height))
                if (width, height) != gray.shape[::-1]:
                    gray = np.asarray(Image.fromarray(gray).resize((width, height), Image.Resampling.BICUBIC))
                _save(folder / f"synthetic_{i + 1:04d}{ext}", gray, kind, rng)
            if progress:
                print(f"[synthetic] {split}/{label}: {n} images", file=sys.stderr, flush=True)


def _is_replaceable(root: Path) -> bool:
    """Only ever delete a folder that is empty or was written by this module."""
    if not root.exists():
        return True
    if not root.is_dir():
        return False
    return (root / SYNTHETIC_MARKER).is_file() or not any(root.iterdir())


def generate_synthetic_dataset(
    root, *, seed: int = 0, counts=None, size_range=(340, 1400), n_large: int = 1, progress: bool = False
) -> Path:
    """Write root/Covid19-dataset/{train,test}/<class>/<files> plus root/SYNTHETIC_DATA.md; return
    root/'Covid19-dataset'. counts defaults to KAGGLE_COUNTS. n_large images (Covid, train) are written at
    about 4200x4095 like the real max.

    ``root`` should be dedicated to the synthetic data: an existing ``root`` is replaced only if
    it is empty or carries the synthetic marker (otherwise FileExistsError). Generation happens in
    a hidden temp folder beside ``root`` which is renamed into place at the end, so an interrupted
    run never leaves a half-written dataset that looks complete.
    """
    root = Path(root)
    params = _params(seed, counts, size_range, n_large)
    if not _is_replaceable(root):
        raise FileExistsError(
            f"{root} exists and is not a synthetic dataset folder; refusing to overwrite it"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        os.chmod(tmp, 0o755)
        _write_tree(tmp, params, progress)
        (tmp / SYNTHETIC_MARKER).write_text(_marker_text(params), encoding="utf-8")  # last = complete
        old = None
        if root.exists():
            if not _is_replaceable(root):  # re-check: someone may have written there meanwhile
                raise FileExistsError(f"{root} is not a synthetic dataset folder; refusing to overwrite it")
            old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
            root.rename(old)
        try:
            tmp.rename(root)
        except OSError:
            if old is not None and not root.exists():
                old.rename(root)  # put the previous dataset back
            elif _read_marker(root) == params:  # a concurrent run just finished the same dataset
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / DATASET_DIRNAME


def _tree_matches(dataset: Path, counts: dict) -> bool:
    """Cheap check that every class folder holds the expected number of files."""
    for split in SPLITS:
        for label in CLASS_DIRS:
            folder = dataset / split / label
            try:
                n = sum(1 for e in os.scandir(folder) if e.is_file())
            except OSError:
                return False
            if n != counts[split][label]:
                return False
    return True


def ensure_synthetic_dataset(root, *, seed: int = 0, counts=None, **kw) -> Path:
    """Return the dataset dir, generating it only if the marker is missing or records a different
    seed/version/counts (then regenerate into a clean folder). Cheap when already present.

    ``kw`` is passed on to :func:`generate_synthetic_dataset` (``size_range``, ``n_large``,
    ``progress``); ``size_range`` and ``n_large`` are part of the comparison too.
    """
    root = Path(root)
    progress = kw.pop("progress", False)
    size_range = kw.pop("size_range", (340, 1400))
    n_large = kw.pop("n_large", 1)
    if kw:
        raise TypeError(f"unexpected keyword argument(s): {sorted(kw)}")
    wanted = _params(seed, counts, size_range, n_large)
    if _read_marker(root) == wanted and _tree_matches(root / DATASET_DIRNAME, wanted["counts"]):
        return root / DATASET_DIRNAME
    return generate_synthetic_dataset(
        root, seed=seed, counts=counts, size_range=size_range, n_large=n_large, progress=progress
    )
