"""Image corruptions in the style of CIFAR-10-C, to simulate drift in production batches.

Each corruption takes uint8 images (N, H, W, 3), a severity 1 (mild) to 5 (strong) and a numpy
generator, and returns uint8 images of the same shape. The parameters are those of Hendrycks &
Dietterich's CIFAR-10-C ("Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019, ``make_cifar_c.py``), on pixel values scaled to [0, 1]:

==============  =========================================  ====  ====  ====  ====  ====
corruption      parameter                                     1     2     3     4     5
==============  =========================================  ====  ====  ====  ====  ====
gaussian_noise  noise standard deviation                   0.04  0.06  0.08  0.09  0.10
gaussian_blur   blur sigma in pixels                       0.4   0.6   0.7   0.8   1.0
brightness      added to HSV value                         0.05  0.10  0.15  0.20  0.30
contrast        factor on the distance to the mean colour  0.75  0.50  0.40  0.30  0.15
pixelate        downscale factor before upscaling          0.95  0.90  0.85  0.75  0.65
jpeg            JPEG quality (Pillow)                      80    65    58    50    40
==============  =========================================  ====  ====  ====  ====  ====

Only gaussian_noise draws random numbers; the others are deterministic.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

SEVERITIES = (1, 2, 3, 4, 5)
_NOISE_STD = (0.04, 0.06, 0.08, 0.09, 0.10)
_BLUR_SIGMA = (0.4, 0.6, 0.7, 0.8, 1.0)
_BRIGHTNESS = (0.05, 0.10, 0.15, 0.20, 0.30)
_CONTRAST = (0.75, 0.50, 0.40, 0.30, 0.15)
_PIXELATE = (0.95, 0.90, 0.85, 0.75, 0.65)
_JPEG_QUALITY = (80, 65, 58, 50, 40)


def _to_unit(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255.0


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


def gaussian_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    std = _NOISE_STD[severity - 1]
    noise = rng.standard_normal(images.shape, dtype=np.float32) * std
    return _to_uint8(_to_unit(images) + noise)


def gaussian_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    sigma = _BLUR_SIGMA[severity - 1]
    # Blur within each image and channel only: sigma 0 on the batch and channel axes.
    return _to_uint8(gaussian_filter(_to_unit(images), sigma=(0, sigma, sigma, 0), mode="nearest"))


def brightness(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    # Adding c to HSV value keeps hue and saturation, which is scaling RGB by (v + c) / v; a black
    # pixel (v = 0, saturation 0) becomes grey c. This avoids two colour-space conversions.
    unit = _to_unit(images)
    value = unit.max(axis=-1, keepdims=True)
    brighter = np.minimum(value + _BRIGHTNESS[severity - 1], 1.0)
    scale = np.divide(brighter, value, out=np.zeros_like(value), where=value > 0)
    return _to_uint8(np.where(value > 0, unit * scale, brighter))


def contrast(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    unit = _to_unit(images)
    mean = unit.mean(axis=(1, 2), keepdims=True)
    return _to_uint8((unit - mean) * _CONTRAST[severity - 1] + mean)


def pixelate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    height, width = images.shape[1:3]
    factor = _PIXELATE[severity - 1]
    small = (max(1, int(width * factor)), max(1, int(height * factor)))
    out = np.empty_like(images)
    for index, image in enumerate(images):
        shrunk = Image.fromarray(image).resize(small, Image.Resampling.BOX)
        out[index] = np.asarray(shrunk.resize((width, height), Image.Resampling.BOX))
    return out


def jpeg(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    quality = _JPEG_QUALITY[severity - 1]
    out = np.empty_like(images)
    for index, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out[index] = np.asarray(decoded.convert("RGB"))
    return out


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "brightness": brightness,
    "contrast": contrast,
    "pixelate": pixelate,
    "jpeg": jpeg,
}


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` (1..5) to uint8 images (N, H, W, 3)."""
    if name not in CORRUPTIONS:
        raise ValueError(
            f"Unknown corruption {name!r}; choose one of: {', '.join(sorted(CORRUPTIONS))}."
        )
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer):
        raise ValueError(
            f"Corruption severity {severity!r} is not a whole number; pass one of 1..5."
        )
    if severity not in SEVERITIES:
        raise ValueError(
            f"Corruption severity {severity} is outside 1..5 (1 is mild, 5 is strong)."
        )
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"corrupt({name!r}) needs uint8 images shaped (N, H, W, 3), got {images.dtype} "
            f"{images.shape}; pass ImageSet.images."
        )
    return CORRUPTIONS[name](images, int(severity), np.random.default_rng(seed))
