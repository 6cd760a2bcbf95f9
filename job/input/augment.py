"""Per-image decode and augmentation, written straight into a batch buffer.

Training: random crop of the network size (images smaller than the crop are enlarged
first; large images are never shrunk to the network size), horizontal flip, and colour
jitter (brightness, contrast, saturation, hue) in a random order. Evaluation: shorter side
resized to ``image_size / 0.875``, then the center crop, or five crops (4 corners + center).

Colour jitter, BGR→RGB and mean/std normalisation are all affine maps of a pixel's colour,
so they are composed into one 3×4 matrix and applied in a single ``cv2.transform`` pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD_RGB = np.array([0.229, 0.224, 0.225], np.float32) * 255
GRAY = np.array([0.299, 0.587, 0.114], np.float32)  # luma weights, RGB
EVAL_CROP_FRACTION = 0.875
BGR_TO_RGB = np.eye(3, dtype=np.float32)[::-1]
# RGB <-> YIQ, for hue rotation (as mx.image.HueJitterAug).
_TYIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]], np.float32
)
_ITYIQ = np.linalg.inv(_TYIQ).astype(np.float32)


@dataclass(frozen=True)
class Jitter:
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0


def decode(buf: bytes, reduce: int = 1) -> np.ndarray | None:
    """BGR uint8 image, or None when the bytes are not an image. ``reduce`` (2, 4, 8) lets
    libjpeg-turbo decode at 1/reduce size straight from the DCT, for images much larger than
    needed."""
    flag = {
        1: cv2.IMREAD_COLOR,
        2: cv2.IMREAD_REDUCED_COLOR_2,
        4: cv2.IMREAD_REDUCED_COLOR_4,
        8: cv2.IMREAD_REDUCED_COLOR_8,
    }[reduce]
    img = cv2.imdecode(np.frombuffer(buf, np.uint8), flag)
    return img if img is not None and img.ndim == 3 else None


def resize_shorter(img: np.ndarray, size: int, enlarge: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Scale so the shorter side is ``size`` (aspect kept): area averaging to shrink,
    ``enlarge`` interpolation to grow (prepare uses cubic; on-the-fly, linear is cheaper)."""
    h, w = img.shape[:2]
    if min(h, w) == size:
        return img
    scale = size / min(h, w)
    shape = (max(size, round(w * scale)), max(size, round(h * scale)))
    return cv2.resize(img, shape, interpolation=cv2.INTER_AREA if scale < 1 else enlarge)


def random_crop_box(h: int, w: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a uniformly placed ``size``² crop inside an h×w image."""
    return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))


def center_box(h: int, w: int, size: int) -> tuple[int, int]:
    return (h - size) // 2, (w - size) // 2


def five_boxes(h: int, w: int, size: int) -> list[tuple[int, int]]:
    """Top-left corners of the 4 corner crops and the center crop."""
    return [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), center_box(h, w, size)]


def eval_resize(image_size: int) -> int:
    return int(round(image_size / EVAL_CROP_FRACTION))


# The hue rotation R(theta) of YIQ's chroma plane, taken back to RGB, is
# HUE_0 + cos(theta) HUE_COS + sin(theta) HUE_SIN (R is linear in cos and sin).
def _hue_part(rot: list[list[float]]) -> list[list[float]]:
    return (_ITYIQ @ np.array(rot, np.float32) @ _TYIQ).astype(float).tolist()


HUE_0 = _hue_part([[1, 0, 0], [0, 0, 0], [0, 0, 0]])
HUE_COS = _hue_part([[0, 0, 0], [0, 1, 0], [0, 0, 1]])
HUE_SIN = _hue_part([[0, 0, 0], [0, 0, -1], [0, 1, 0]])
_GRAY = GRAY.astype(float).tolist()
_JITTERS = ("brightness", "contrast", "saturation", "hue")
_MEAN = MEAN_RGB.astype(float).tolist()
_INV_STD = (1.0 / STD_RGB.astype(float)).tolist()


def jitter_matrix(jitter: Jitter, mean_rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 3×4 affine colour map (RGB in, RGB out) doing the jitters in a random order.

    One draw of 2n+1 uniforms from ``rng`` (n: the jitters that are on) decides the order,
    each jitter's factor 1 ± amount and the hue angle; :func:`jitter_from_draws` builds the
    map from them.
    """
    steps = _steps(jitter)
    if not steps:
        return np.eye(3, 4, dtype=np.float32)
    draws = rng.random(2 * len(steps) + 1).tolist()
    return np.array(jitter_from_draws(steps, draws, mean_rgb.tolist()), np.float32)


def _steps(jitter: Jitter) -> list[tuple[str, float]]:
    return [(name, getattr(jitter, name)) for name in _JITTERS if getattr(jitter, name) > 0]


def jitter_normalize(
    jitter: Jitter, mean_rgb: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """``normalize_matrix(jitter_matrix(...))`` in one step, in plain floats: BGR in, the
    jittered and normalised RGB out (what :func:`write_chw` applies)."""
    steps = _steps(jitter)
    if not steps:
        return IDENTITY_NORMALIZE
    m = jitter_from_draws(steps, rng.random(2 * len(steps) + 1).tolist(), list(mean_rgb))
    return np.array(
        [
            [row[2] * k, row[1] * k, row[0] * k, (row[3] - mu) * k]
            for row, mu, k in zip(m, _MEAN, _INV_STD, strict=True)
        ],
        np.float32,
    )


def jitter_from_draws(
    steps: list[tuple[str, float]], draws: list[float], mean_rgb: list[float]
) -> list[list[float]]:
    """The map of :func:`jitter_matrix` from its uniforms, in plain floats: the per-sample
    work holds the GIL, and numpy's per-call cost on 3×4 arrays is most of it.

    draws[:n] order the steps (ascending), draws[n + i] gives step i's factor
    1 + amount·(2u - 1), draws[2n] the hue angle amount·(2u - 1)·π. Brightness scales;
    contrast blends with the mean gray of the image so far; saturation blends each pixel
    with its gray; hue rotates the chroma plane of YIQ (as ``mx.image.HueJitterAug``).
    """
    n = len(steps)
    m = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
    for i in sorted(range(n), key=lambda k: draws[k]):
        name, amount = steps[i]
        alpha = 1.0 + amount * (2.0 * draws[n + i] - 1.0)
        if name == "brightness":
            m = [[alpha * v for v in row] for row in m]
        elif name == "contrast":
            now = [sum(row[j] * mean_rgb[j] for j in range(3)) + row[3] for row in m]
            shift = (1.0 - alpha) * sum(g * v for g, v in zip(_GRAY, now, strict=True))
            m = [[alpha * row[0], alpha * row[1], alpha * row[2], alpha * row[3] + shift]
                 for row in m]  # fmt: skip
        elif name == "saturation":
            # alpha·m + (1 - alpha)·(the gray of m's output, in every channel)
            gray = [sum(_GRAY[r] * m[r][j] for r in range(3)) for j in range(4)]
            m = [[alpha * row[j] + (1.0 - alpha) * gray[j] for j in range(4)] for row in m]
        else:
            theta = amount * (2.0 * draws[2 * n] - 1.0) * math.pi
            c, s = math.cos(theta), math.sin(theta)
            hue = [[HUE_0[r][k] + c * HUE_COS[r][k] + s * HUE_SIN[r][k] for k in range(3)]
                   for r in range(3)]  # fmt: skip
            m = [[sum(hue[r][k] * m[k][j] for k in range(3)) for j in range(4)] for r in range(3)]
    return m


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 3×4 affine map x ↦ outer(inner(x))."""
    out = np.empty((3, 4), np.float32)
    out[:, :3] = outer[:, :3] @ inner[:, :3]
    out[:, 3] = outer[:, :3] @ inner[:, 3] + outer[:, 3]
    return out


def normalize_matrix(rgb_map: np.ndarray) -> np.ndarray:
    """Fold BGR→RGB before and (x - mean) / std after an RGB colour map."""
    bgr_in = np.zeros((3, 4), np.float32)
    bgr_in[:, :3] = BGR_TO_RGB
    norm = np.zeros((3, 4), np.float32)
    norm[:, :3] = np.diag(1 / STD_RGB)
    norm[:, 3] = -MEAN_RGB / STD_RGB
    return compose(norm, compose(rgb_map, bgr_in))


IDENTITY_NORMALIZE = normalize_matrix(np.eye(3, 4, dtype=np.float32))
NO_JITTER = Jitter()


def write_chw(crop_bgr: np.ndarray, matrix: np.ndarray, out: np.ndarray) -> None:
    """Apply the colour map to a BGR crop and store it as CHW float32 in ``out``.

    ``cv2.split`` writes the planes straight into ``out``'s (contiguous) channel views: 4×
    faster than numpy's strided HWC→CHW copy, and outside the GIL.
    """
    hwc = cv2.transform(crop_bgr.astype(np.float32), matrix)
    planes = [out[0], out[1], out[2]]
    if out.flags.c_contiguous:
        written = cv2.split(hwc, planes)
        if all(w.ctypes.data == p.ctypes.data for w, p in zip(written, planes, strict=True)):
            return
    np.copyto(out, hwc.transpose(2, 0, 1))


def train_sample(
    img: np.ndarray,
    size: int,
    flip_prob: float,
    jitter: Jitter,
    rng: np.random.Generator,
    out: np.ndarray,
) -> None:
    """Random crop (enlarging small images first), flip, jitter, normalise into ``out``."""
    if min(img.shape[:2]) < size:
        img = resize_shorter(img, size)
    y, x = random_crop_box(img.shape[0], img.shape[1], size, rng)
    crop = img[y : y + size, x : x + size]
    if rng.random() < flip_prob:
        crop = cv2.flip(crop, 1)
    matrix = IDENTITY_NORMALIZE
    if jitter != NO_JITTER:
        # Contrast blends with the crop's mean gray; every 4th pixel of every 4th row gives
        # it to within a gray level at 1/16 of the cost (a full cv2.mean is ~40 µs a crop).
        blue, green, red = cv2.mean(crop[::4, ::4])[:3]
        matrix = jitter_normalize(jitter, (red, green, blue), rng)
    write_chw(crop, matrix, out)


def eval_sample(
    img: np.ndarray, size: int, out: np.ndarray, five: np.ndarray | None = None
) -> None:
    """Center crop into ``out``; with ``five``, also the five crops into five[0..4]."""
    img = resize_shorter(img, eval_resize(size))
    h, w = img.shape[:2]
    y, x = center_box(h, w, size)
    write_chw(img[y : y + size, x : x + size], IDENTITY_NORMALIZE, out)
    if five is not None:
        for k, (y, x) in enumerate(five_boxes(h, w, size)):
            write_chw(img[y : y + size, x : x + size], IDENTITY_NORMALIZE, five[k])
