"""Per-image decode and augmentation, written straight into a batch buffer.

Training: random crop of the network size (images smaller than the crop are enlarged
first; large images are never shrunk to the network size), horizontal flip, and colour
jitter (brightness, contrast, saturation, hue) in a random order. Evaluation: shorter side
resized to ``image_size / 0.875``, then the center crop, or five crops (4 corners + center).

Colour jitter, BGR→RGB and mean/std normalisation are all affine maps of a pixel's colour,
so they are composed into one 3×4 matrix and applied in a single ``cv2.transform`` pass.
"""

from __future__ import annotations

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


def jitter_matrix(jitter: Jitter, mean_rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 3×4 affine colour map (RGB in, RGB out) doing the jitters in a random order."""
    m = np.eye(3, 4, dtype=np.float32)
    steps = [
        (name, amount)
        for name, amount in (
            ("brightness", jitter.brightness),
            ("contrast", jitter.contrast),
            ("saturation", jitter.saturation),
            ("hue", jitter.hue),
        )
        if amount > 0
    ]
    for i in rng.permutation(len(steps)):
        name, amount = steps[i]
        alpha = np.float32(1 + rng.uniform(-amount, amount))
        if name == "brightness":
            step = np.eye(3, 4, dtype=np.float32) * alpha
        elif name == "contrast":  # blend with the image's mean gray (after the steps so far)
            mean_gray = GRAY @ (m[:, :3] @ mean_rgb + m[:, 3])
            step = np.eye(3, 4, dtype=np.float32) * alpha
            step[:, 3] = (1 - alpha) * mean_gray
        elif name == "saturation":  # blend with each pixel's gray
            step = np.zeros((3, 4), np.float32)
            step[:, :3] = alpha * np.eye(3) + (1 - alpha) * np.outer(np.ones(3), GRAY)
        else:  # hue: rotate the chroma plane of YIQ
            theta = rng.uniform(-amount, amount) * np.pi
            rot = np.array(
                [[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]],
                np.float32,
            )
            step = np.zeros((3, 4), np.float32)
            step[:, :3] = _ITYIQ @ rot @ _TYIQ
        m = compose(step, m)
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
    if jitter != Jitter():
        mean_bgr = np.array(cv2.mean(crop)[:3], np.float32)
        matrix = normalize_matrix(jitter_matrix(jitter, mean_bgr[::-1], rng))
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
