"""CIFAR-10-C-style corruptions: shapes, severity ordering, exact effects, determinism, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cifar_assets.data.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from cifar_assets.data.synthetic import generate_synthetic


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return generate_synthetic(200, seed=11).images


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_shape_and_dtype_are_kept_and_change_grows_with_severity(
    images: np.ndarray, name: str
) -> None:
    changes = []
    for severity in SEVERITIES:
        out = corrupt(images, name, severity, seed=0)
        assert out.shape == images.shape
        assert out.dtype == np.uint8
        changes.append(float(np.abs(out.astype(np.int16) - images).mean()))
    assert changes[0] > 0.5, (name, changes)
    assert all(b > a for a, b in itertools.pairwise(changes)), (name, changes)


def test_contrast_shrinks_spread_around_the_mean_colour(images: np.ndarray) -> None:
    out = corrupt(images, "contrast", 5).astype(np.float64)
    before = images.astype(np.float64).std(axis=(1, 2))
    after = out.std(axis=(1, 2))
    # Severity 5 keeps 15% of the spread; rounding to whole pixel values adds a little.
    np.testing.assert_allclose(after, 0.15 * before, atol=0.6)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=0.6)


def test_brightness_raises_hsv_value_and_keeps_hue() -> None:
    black = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    assert np.all(corrupt(black, "brightness", 4) == 51)  # grey 0.20 * 255
    colour = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    colour[..., 0], colour[..., 1], colour[..., 2] = 100, 50, 0
    out = corrupt(colour, "brightness", 1).astype(np.float64)
    # Value 100/255 + 0.05 -> 112.75; channels scale together, so hue and saturation stay.
    np.testing.assert_allclose(out[0, 0, 0], [113, 56, 0], atol=0.5)


def test_blur_and_pixelate_leave_flat_images_alone() -> None:
    flat = np.full((3, 32, 32, 3), 120, dtype=np.uint8)
    for name in ("gaussian_blur", "pixelate", "contrast"):
        np.testing.assert_array_equal(corrupt(flat, name, 5), flat)


def test_noise_has_the_table_standard_deviation() -> None:
    grey = np.full((50, 32, 32, 3), 128, dtype=np.uint8)
    out = corrupt(grey, "gaussian_noise", 3, seed=5).astype(np.float64)
    assert out.std() == pytest.approx(0.08 * 255, rel=0.03)


def test_seed_fixes_noise_and_other_corruptions_ignore_it(images: np.ndarray) -> None:
    first = corrupt(images, "gaussian_noise", 2, seed=1)
    np.testing.assert_array_equal(first, corrupt(images, "gaussian_noise", 2, seed=1))
    assert not np.array_equal(first, corrupt(images, "gaussian_noise", 2, seed=2))
    for name in ("gaussian_blur", "brightness", "contrast", "pixelate", "jpeg"):
        np.testing.assert_array_equal(
            corrupt(images, name, 3, seed=1), corrupt(images, name, 3, seed=2)
        )


def test_bad_arguments_say_what_is_allowed(images: np.ndarray) -> None:
    with pytest.raises(ValueError) as caught:
        corrupt(images, "fog", 1)
    for name in CORRUPTIONS:
        assert name in str(caught.value)
    for severity in (0, 6, -1):
        with pytest.raises(ValueError, match=f"severity {severity} is outside 1..5"):
            corrupt(images, "jpeg", severity)
    for wrong in (2.5, True, "3"):
        with pytest.raises(ValueError, match="is not a whole number"):
            corrupt(images, "jpeg", wrong)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"uint8 images shaped \(N, H, W, 3\), got float32"):
        corrupt(images.astype(np.float32), "contrast", 1)
    with pytest.raises(ValueError, match=r"got uint8 \(32, 32, 3\)"):
        corrupt(images[0], "contrast", 1)
