import cv2
import numpy as np
import pytest

from job.input import augment
from job.input.augment import Jitter


def image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def to_bgr_uint8(chw):
    """Undo normalisation: CHW float RGB → HWC BGR in 0..255."""
    rgb = chw.transpose(1, 2, 0) * augment.STD_RGB + augment.MEAN_RGB
    return rgb[..., ::-1]


NO_JITTER = Jitter()


def sample(img, size, flip_prob=0.0, jitter=NO_JITTER, seed=0):
    out = np.empty((3, size, size), np.float32)
    augment.train_sample(img, size, flip_prob, jitter, np.random.default_rng(seed), out)
    return out


def find_crop(img, crop_bgr):
    """Top-left corner where ``crop_bgr`` lies in ``img`` (exact match)."""
    res = cv2.matchTemplate(img.astype(np.float32), crop_bgr.astype(np.float32), cv2.TM_SQDIFF)
    y, x = np.unravel_index(np.argmin(res), res.shape)
    assert res[y, x] < 0.05 * crop_bgr.size  # float rounding only
    return y, x


def test_normalisation_is_imagenet_mean_std_in_rgb():
    img = image(8, 8)
    out = sample(img, 8)
    rgb = img[..., ::-1].astype(np.float32)
    expected = ((rgb - augment.MEAN_RGB) / augment.STD_RGB).transpose(2, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_flip_is_the_mirror_image():
    img = image(20, 20)
    plain, flipped = sample(img, 20, flip_prob=0.0), sample(img, 20, flip_prob=1.0)
    np.testing.assert_allclose(flipped, plain[:, :, ::-1], atol=1e-5)


def test_random_crops_lie_inside_the_image_and_cover_it():
    img = image(40, 60)
    corners = set()
    for seed in range(200):
        crop = to_bgr_uint8(sample(img, 24, seed=seed))
        y, x = find_crop(img, crop)
        assert 0 <= y <= 40 - 24 and 0 <= x <= 60 - 24
        corners.add((y, x))
    assert len(corners) > 100  # uniformly placed, not a fixed crop


def test_large_images_are_cropped_not_shrunk():
    img = image(100, 120)
    crop = to_bgr_uint8(sample(img, 32))
    find_crop(img, crop)  # an exact window of the original pixels


def test_small_images_are_enlarged_then_cropped():
    img = image(20, 30)
    crop = to_bgr_uint8(sample(img, 24, seed=3))
    enlarged = augment.resize_shorter(img, 24)
    assert enlarged.shape[:2] == (24, 36)
    y, x = find_crop(enlarged, crop)
    assert y == 0 and 0 <= x <= 12


def test_five_crops_are_the_corners_and_center():
    size = 16
    img = image(augment.eval_resize(size), augment.eval_resize(size) + 6)  # already eval-sized
    center, five = np.empty((3, size, size), np.float32), np.empty((5, 3, size, size), np.float32)
    augment.eval_sample(img, size, center, five)
    h, w = img.shape[:2]
    expected = [
        (0, 0),
        (0, w - size),
        (h - size, 0),
        (h - size, w - size),
        ((h - size) // 2, (w - size) // 2),
    ]
    for k, (y, x) in enumerate(expected):
        np.testing.assert_allclose(
            to_bgr_uint8(five[k]), img[y : y + size, x : x + size], atol=1e-3
        )
    np.testing.assert_allclose(center, five[4])


def test_eval_resizes_the_shorter_side_then_center_crops():
    img = image(64, 96)
    out = np.empty((3, 32, 32), np.float32)
    augment.eval_sample(img, 32, out)
    resized = augment.resize_shorter(img, augment.eval_resize(32))
    assert resized.shape[:2] == (37, 56)
    y, x = (37 - 32) // 2, (56 - 32) // 2
    np.testing.assert_allclose(to_bgr_uint8(out), resized[y : y + 32, x : x + 32], atol=1e-3)


@pytest.mark.parametrize("kind", ["brightness", "contrast", "saturation", "hue"])
def test_each_colour_jitter_changes_colours_and_zero_disables_it(kind):
    img = image(16, 16)
    plain = sample(img, 16, jitter=Jitter())
    changed = [
        not np.allclose(sample(img, 16, jitter=Jitter(**{kind: 0.4}), seed=s), plain, atol=1e-3)
        for s in range(5)
    ]
    assert sum(changed) >= 4
    np.testing.assert_allclose(sample(img, 16, jitter=Jitter(**{kind: 0.0}), seed=1), plain)


def test_brightness_scales_every_channel_alike():
    rng = np.random.default_rng(0)
    m = augment.jitter_matrix(Jitter(brightness=0.5), np.zeros(3, np.float32), rng)
    alpha = m[0, 0]
    np.testing.assert_allclose(m, np.eye(3, 4) * alpha, atol=1e-6)
    assert 0.5 <= alpha <= 1.5


@pytest.mark.parametrize("kind", ["saturation", "hue"])
def test_saturation_and_hue_leave_gray_pixels_gray(kind):
    rng = np.random.default_rng(1)
    m = augment.jitter_matrix(Jitter(**{kind: 0.5}), np.zeros(3, np.float32), rng)
    gray = np.array([100.0, 100.0, 100.0])
    np.testing.assert_allclose(m[:, :3] @ gray + m[:, 3], gray, atol=0.5)


def test_contrast_keeps_the_mean_gray():
    rng = np.random.default_rng(2)
    mean_rgb = np.array([40.0, 120.0, 200.0], np.float32)
    m = augment.jitter_matrix(Jitter(contrast=0.5), mean_rgb, rng)
    gray_before = augment.GRAY @ mean_rgb
    assert augment.GRAY @ (m[:, :3] @ mean_rgb + m[:, 3]) == pytest.approx(gray_before, rel=1e-4)


def test_decode_reduced_size_and_garbage():
    img = image(64, 80)
    ok, buf = cv2.imencode(".jpg", img)
    assert augment.decode(buf.tobytes()).shape == (64, 80, 3)
    assert augment.decode(buf.tobytes(), reduce=2).shape == (32, 40, 3)
    assert augment.decode(b"not a jpeg") is None


def test_same_seed_same_sample_different_seed_differs():
    img = image(50, 50)
    j = Jitter(0.4, 0.4, 0.4, 0.1)
    a, b = sample(img, 32, 0.5, j, seed=7), sample(img, 32, 0.5, j, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, sample(img, 32, 0.5, j, seed=8))


def reference_jitter(steps, draws, mean_rgb):
    """The jitter map composed step by step with numpy 3×4 matrices: the plain formula that
    augment.jitter_from_draws computes in floats."""
    n = len(steps)
    m = np.eye(3, 4)
    for i in np.argsort(draws[:n], kind="stable"):
        name, amount = steps[i]
        alpha = 1 + amount * (2 * draws[n + i] - 1)
        step = np.eye(3, 4) * alpha
        if name == "contrast":
            step[:, 3] = (1 - alpha) * (augment.GRAY @ (m[:, :3] @ mean_rgb + m[:, 3]))
        elif name == "saturation":
            step = np.zeros((3, 4))
            step[:, :3] = alpha * np.eye(3) + (1 - alpha) * np.outer(np.ones(3), augment.GRAY)
        elif name == "hue":
            theta = amount * (2 * draws[2 * n] - 1) * np.pi
            c, s = np.cos(theta), np.sin(theta)
            rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
            step = np.zeros((3, 4))
            step[:, :3] = np.linalg.inv(augment._TYIQ) @ rot @ augment._TYIQ
        m = np.hstack([step[:, :3] @ m[:, :3], (step[:, :3] @ m[:, 3] + step[:, 3])[:, None]])
    return m


@pytest.mark.parametrize("seed", range(6))
def test_the_fast_jitter_is_the_reference_formula(seed):
    rng = np.random.default_rng(seed)
    jitter = Jitter(0.4, 0.4, 0.4, 0.1)
    steps = [(k, getattr(jitter, k)) for k in ("brightness", "contrast", "saturation", "hue")]
    draws = rng.random(2 * len(steps) + 1).tolist()
    mean_rgb = rng.uniform(0, 255, 3)
    fast = np.array(augment.jitter_from_draws(steps, draws, mean_rgb.tolist()))
    # float32 constants on both sides; the maps agree to float32 precision
    np.testing.assert_allclose(fast, reference_jitter(steps, draws, mean_rgb), rtol=1e-5, atol=1e-4)


def test_jitter_normalize_is_the_normalised_jitter_matrix_of_bgr_input():
    jitter = Jitter(0.4, 0.4, 0.4, 0.1)
    mean_rgb = np.array([40.0, 120.0, 200.0])
    for seed in range(5):
        one = augment.jitter_normalize(jitter, mean_rgb.tolist(), np.random.default_rng(seed))
        rgb_map = augment.jitter_matrix(
            jitter, mean_rgb.astype(np.float32), np.random.default_rng(seed)
        )
        np.testing.assert_allclose(one, augment.normalize_matrix(rgb_map), rtol=1e-5, atol=1e-5)


def test_the_sampled_mean_of_a_crop_is_its_mean_within_a_gray_level():
    """train_sample estimates the crop's mean colour (for contrast) from every 4th pixel of
    every 4th row; on a photo-like image that is the full mean to within one level."""
    rng = np.random.default_rng(3)
    small = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
    crop = cv2.resize(small, (224, 224), interpolation=cv2.INTER_CUBIC)
    crop = np.clip(crop + rng.normal(0, 8, crop.shape), 0, 255).astype(np.uint8)
    full, sampled = np.array(cv2.mean(crop)[:3]), np.array(cv2.mean(crop[::4, ::4])[:3])
    assert np.abs(full - sampled).max() < 1.0
