"""Synthetic CIFAR-10 look-alikes, for machines without the real data set and for fast tests.

Each class is a drawn object with its own silhouette, colours and texture (an airplane is a swept
cross on sky, a ship a hull and cabin on water, a frog a spotted blob seen from above, ...) over a
background from an overlapping set of scenes. Position, scale, rotation, aspect, facing direction,
background, colour, lighting and sensor noise vary per image, and classes share colours and scenes,
so colour and background alone do not tell the classes apart: a linear classifier on raw pixels
stays far below a small CNN (tests/test_data_sources.py measures both).

Everything is drawn with vectorised numpy on chunks of images from one seeded generator, so a
seed gives the same images on every machine.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cifar_assets.data.errors import DataSourceError
from cifar_assets.data.imageset import CLASSES, ImageSet

_SIZE = 32
# Images are drawn in chunks so the float32 working arrays stay small enough for the CPU caches.
_CHUNK = 1024
_Array = np.ndarray
_Layers = tuple[_Array, _Array, list[tuple[_Array, _Array]]]

# Pixel centres in [-1, 1]; rows grow downwards, as in the stored images.
_AXIS = ((np.arange(_SIZE, dtype=np.float32) + 0.5) / (_SIZE / 2) - 1.0).astype(np.float32)


def generate_synthetic(n: int, seed: int = 0) -> ImageSet:
    """Draw ``n`` labelled images, balanced over the classes (counts differ by at most one)."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise DataSourceError(
            f"generate_synthetic: n={n!r} is not a positive whole number of images; "
            "pass e.g. n=60000 for a CIFAR-10-sized set or n=1000 for a quick run."
        )
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.int64)
    images = np.empty((n, _SIZE, _SIZE, 3), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        images[start:stop] = _render(labels[start:stop], rng)
    return ImageSet.from_arrays(images, labels, source="synthetic")


def _render(labels: _Array, rng: np.random.Generator) -> _Array:
    # Drawn grouped by class, so each class works on a contiguous view instead of gathered copies,
    # and channels-first, so per-pixel weights broadcast over whole rows rather than 3 channels.
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=len(CLASSES))
    canvas = _background(labels[order], rng)
    start = 0
    for label, draw in enumerate(_DRAW):
        stop = start + int(counts[label])
        if stop == start:
            continue
        part = canvas[start:stop]
        u, v, pixel = _object_frame(stop - start, _OBJECT_SIZE[label], rng)
        body, texture, details = draw(u, v, pixel, rng)
        colour = _pick_colours(_PALETTES[label], stop - start, rng)
        # Light from above: the lower part of every object is a little darker.
        texture = texture * (1.0 - 0.12 * np.clip(v, -1.5, 1.5))
        layer = colour[:, :, None, None] * texture[:, None]
        layer -= part
        layer *= body[:, None]
        part += layer
        for alpha, detail_colour in details:
            layer = detail_colour[:, :, None, None] - part
            layer *= alpha[:, None]
            part += layer
        start = stop
    # Camera: white balance, exposure and sensor noise, straight onto the 0..255 scale. Uniform
    # noise is cheaper to draw than Gaussian and looks the same at this level.
    count = len(labels)
    white_balance = rng.uniform(0.88 * 255, 1.12 * 255, (count, 3, 1, 1)).astype(np.float32)
    noise_width = rng.uniform(0.035 * 255, 0.17 * 255, (count, 1, 1, 1)).astype(np.float32)
    exposure = rng.uniform(-0.08 * 255, 0.08 * 255, (count, 1, 1, 1)).astype(np.float32)
    canvas *= white_balance
    noise = rng.random(canvas.shape, dtype=np.float32) - np.float32(0.5)
    noise *= noise_width
    noise += exposure
    canvas += noise
    np.clip(canvas, 0.0, 255.0, out=canvas)
    rendered = np.empty((count, _SIZE, _SIZE, 3), dtype=np.uint8)
    rendered[order] = np.rint(canvas, out=canvas).transpose(0, 2, 3, 1)
    return rendered


def _object_frame(
    count: int, size: float, rng: np.random.Generator
) -> tuple[_Array, _Array, _Array]:
    """Object coordinates per image: shifted, scaled, squashed, rotated and maybe mirrored."""
    centre_x, centre_y = rng.uniform(-0.3, 0.3, (2, count, 1, 1)).astype(np.float32)
    scale = (size * rng.uniform(0.7, 1.15, (count, 1, 1))).astype(np.float32)
    aspect = rng.uniform(0.85, 1.18, (count, 1, 1)).astype(np.float32)
    angle = rng.normal(0.0, 0.22, (count, 1, 1)).astype(np.float32)
    mirror = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), (count, 1, 1))
    dx = _AXIS[None, None, :] - centre_x
    dy = _AXIS[None, :, None] - centre_y
    cos, sin = np.cos(angle), np.sin(angle)
    u = (dx * cos + dy * sin) / (scale * aspect) * mirror
    v = (dy * cos - dx * sin) * aspect / scale
    # One pixel in object units, for anti-aliased edges.
    pixel = (2.0 / _SIZE) / scale
    return u, v, pixel


# The shape functions work in place on their temporaries: these arrays dominate the run time.
def _edge(distance: _Array, pixel: _Array) -> _Array:
    """Coverage from a signed distance (positive inside); overwrites ``distance``."""
    distance /= pixel
    distance += 0.5
    np.maximum(distance, 0.0, out=distance)
    return np.minimum(distance, 1.0, out=distance)


def _ellipse(
    u: _Array, v: _Array, pixel: _Array, x: float, y: float, rx: float, ry: float
) -> _Array:
    radius = u - x
    radius *= 1.0 / rx
    radius *= radius
    across = v - y
    across *= 1.0 / ry
    across *= across
    radius += across
    np.sqrt(radius, out=radius)
    radius -= 1.0
    radius *= -min(rx, ry)
    return _edge(radius, pixel)


def _box(u: _Array, v: _Array, pixel: _Array, x: float, y: float, hw: float, hh: float) -> _Array:
    return _edge(np.minimum(hw - np.abs(u - x), hh - np.abs(v - y)), pixel)


def _segment(
    u: _Array,
    v: _Array,
    pixel: _Array,
    start: tuple[float, float],
    end: tuple[float, float],
    width: float,
) -> _Array:
    (x0, y0), (x1, y1) = start, end
    ex, ey = x1 - x0, y1 - y0
    du, dv = u - x0, v - y0
    along = du * (ex / (ex * ex + ey * ey))
    along += dv * (ey / (ex * ex + ey * ey))
    np.clip(along, 0.0, 1.0, out=along)
    du -= along * ex
    dv -= along * ey
    du *= du
    dv *= dv
    du += dv
    np.sqrt(du, out=du)
    du -= width / 2
    du *= -1.0
    return _edge(du, pixel)


def _triangle(u: _Array, v: _Array, pixel: _Array, corners: list[tuple[float, float]]) -> _Array:
    (ax, ay), (bx, by), (cx, cy) = corners
    # Orient the corners so every edge function is positive inside.
    if (bx - ax) * (cy - ay) - (by - ay) * (cx - ax) < 0:
        (bx, by), (cx, cy) = (cx, cy), (bx, by)
    distances = [
        ((x1 - x0) * (v - y0) - (y1 - y0) * (u - x0)) / float(np.hypot(x1 - x0, y1 - y0))
        for (x0, y0), (x1, y1) in (((ax, ay), (bx, by)), ((bx, by), (cx, cy)), ((cx, cy), (ax, ay)))
    ]
    return _edge(np.minimum.reduce(distances), pixel)


def _union(*masks: _Array) -> _Array:
    return np.maximum.reduce(masks)


def _waves(
    u: _Array, v: _Array, rng: np.random.Generator, low: float, high: float, tilt: float = 0.3
) -> _Array:
    """A sinusoid across ``u`` of random frequency and phase per image, tilted by about ``tilt``."""
    count = u.shape[0]
    frequency = rng.uniform(low, high, (count, 1, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, (count, 1, 1)).astype(np.float32)
    slant = rng.normal(0.0, tilt, (count, 1, 1)).astype(np.float32)
    return np.sin((u + slant * v) * frequency + phase)


def _spots(u: _Array, v: _Array, rng: np.random.Generator, frequency: float) -> _Array:
    count = u.shape[0]
    fu, fv = (frequency * rng.uniform(0.8, 1.25, (2, count, 1, 1))).astype(np.float32)
    pu, pv = rng.uniform(0, 2 * np.pi, (2, count, 1, 1)).astype(np.float32)
    return np.sin(u * fu + pu) * np.sin(v * fv + pv)


def _dark(count: int, rng: np.random.Generator, level: float = 0.12) -> _Array:
    return (level + rng.uniform(0, 0.08, (count, 1)) * np.ones((1, 3))).astype(np.float32)


def _fixed(count: int, rgb: tuple[float, float, float]) -> _Array:
    return np.tile(np.asarray(rgb, dtype=np.float32), (count, 1))


def _draw_airplane(u: _Array, v: _Array, pixel: _Array, rng: np.random.Generator) -> _Layers:
    fuselage = _union(
        _box(u, v, pixel, 0.0, 0.0, 0.72, 0.085), _ellipse(u, v, pixel, 0.72, 0.0, 0.14, 0.085)
    )
    wings = _union(
        _segment(u, v, pixel, (0.12, 0.0), (-0.22, -0.78), 0.14),
        _segment(u, v, pixel, (0.12, 0.0), (-0.22, 0.78), 0.14),
    )
    tail = _union(
        _segment(u, v, pixel, (-0.6, 0.0), (-0.78, -0.3), 0.09),
        _segment(u, v, pixel, (-0.6, 0.0), (-0.78, 0.3), 0.09),
    )
    body = _union(fuselage, wings, tail)
    cockpit = _ellipse(u, v, pixel, 0.66, 0.0, 0.09, 0.05)
    texture = np.ones_like(u)
    return body, texture, [(cockpit, _dark(len(u), rng, 0.2))]


def _draw_automobile(u: _Array, v: _Array, pixel: _Array, rng: np.random.Generator) -> _Layers:
    count = len(u)
    body = _union(
        _box(u, v, pixel, 0.0, 0.05, 0.78, 0.17), _box(u, v, pixel, -0.05, -0.2, 0.4, 0.13)
    )
    windows = _union(
        _box(u, v, pixel, -0.22, -0.2, 0.15, 0.085), _box(u, v, pixel, 0.14, -0.2, 0.15, 0.085)
    )
    wheels = _union(
        _ellipse(u, v, pixel, -0.47, 0.24, 0.17, 0.17),
        _ellipse(u, v, pixel, 0.47, 0.24, 0.17, 0.17),
    )
    lamp = _ellipse(u, v, pixel, 0.74, 0.0, 0.05, 0.05)
    # A glossy highlight band along the body.
    texture = 1.0 + 0.25 * np.exp(-(((v + 0.02) / 0.05) ** 2))
    glass = (0.55 + rng.uniform(-0.1, 0.1, (count, 1)) * np.ones((1, 3))).astype(np.float32)
    glass[:, 2] += 0.12
    return (
        body,
        texture,
        [(windows, glass), (wheels, _dark(count, rng)), (lamp, _fixed(count, (0.95, 0.9, 0.6)))],
    )


def _draw_bird(u: _Array, v: _Array, pixel: _Array, rng: np.random.Generator) -> _Layers:
    count = len(u)
    body = _union(
        _ellipse(u, v, pixel, 0.0, 0.0, 0.42, 0.22),
        _ellipse(u, v, pixel, 0.4, -0.18, 0.16, 0.15),
        _triangle(u, v, pixel, [(-0.3, -0.05), (-0.78, -0.2), (-0.74, 0.08)]),
    )
    beak = _triangle(u, v, pixel, [(0.52, -0.23), (0.52, -0.12), (0.74, -0.17)])
    wing = _ellipse(u, v, pixel, -0.08, -0.04, 0.3, 0.12)
    eye = _ellipse(u, v, pixel, 0.44, -0.21, 0.04, 0.04)
    legs = _union(
        _segment(u, v, pixel, (0.0, 0.2), (0.0, 0.42), 0.04),
        _segment(u, v, pixel, (0.12, 0.2), (0.14, 0.42), 0.04),
    )
    wing_colour = _pick_colours(_PALETTES[2], count, rng) * 0.6
    texture = 1.0 + 0.12 * _waves(u, v, rng, 30.0, 45.0)
    return (
        body,
        texture,
        [
            (wing, wing_colour),
            (beak, _fixed(count, (0.95, 0.7, 0.15))),
            (legs, _fixed(count, (0.6, 0.45, 0.2))),
            (eye, _dark(count, rng, 0.05)),
        ],
    )


def _draw_cat(u: _Array, v: _Array, pixel: _Array, rng: np.random.Generator) -> _Layers:
    count = len(u)
    body = _union(
        _ellipse(u, v, pixel, 0.25, -0.25, 0.3, 0.26),
        _triangle(u, v, pixel, [(0.0, -0.38), (0.16, -0.44), (0.04, -0.72)]),
        _triangle(u, v, pixel, [(0.34, -0.44), (0.5, -0.38), (0.46, -0.72)]),
        _ellipse(u, v, pixel, -0.15, 0.3, 0.5, 0.3),
        _segment(u, v, pixel, (-0.6, 0.45), (-0.85, -0.05), 0.09),
    )
    eyes = _union(
        _ellipse(u, v, pixel, 0.14, -0.28, 0.06, 0.045),
        _ellipse(u, v, pixel, 0.36, -0.28, 0.06, 0.045),
    )
    nose = _triangle(u, v, pixel, [(0.2, -0.17), (0.3, -0.17), (0.25, -0.11)])
    eye_colour = (_fixed(count, (0.55, 0.75, 0.2)) + rng.uniform(-0.15, 0.15, (count, 1))).astype(
        np.float32
    )
    # Tabby stripes on most cats.
    striped = (rng.random((count, 1, 1)) < 0.7).astype(np.float32)
    stripes = (_waves(u, v, rng, 18.0, 26.0) > 0.35).astype(np.float32)
    texture = 1.0 - 0.4 * striped * stripes
    return body, texture, [(eyes, eye_colour), (nose, _fixed(count, (0.85, 0.5, 0.5)))]


def _draw_deer(u: _Array, v: _Array, pixel: _Array, rng: np.random.Generator) -> _Layers:
    count = len(u)
    legs = [
        _segment(u, v, pixel, (x, 0.12), (x + lean, 0.72), 0.055)
        for x, lean in ((-0.42, -0.03), (-0.28, 0.02), (0.12, -0.02), (0.25, 0.03))
    ]
    body = _union(
        _ellipse(u, v, pixel, -0.1, 0.02, 0.44, 0.19),
        _segment(u, v, pixel, (0.22, -0.02), (0.44, -0.4), 0.12),
        _ellipse(u, v, pixel, 0.52, -0.44, 0.15, 0.085),
        _triangle(u, v, pixel, [(0.4, -0.5), (0.46, -0.52), (0.36, -0.66)]),
        *legs,
    )
    antlers = _union(
        _segment(u, v, pixel, (0.47, -0.5), (0.4, -0.88), 0.04),
        _segment(u, v, pixel, (0.43, -0.7), (0.28, -0.82), 0.035),
        _segment(u, v, pixel, (0.55, -0.5), (0.64, -0.86), 0.04),
        _segment(u, v, pixel, (0.6, -0.7), (0.74, -0.78), 0.035),
    )
    antlers *= (rng.random((count, 1, 1)) < 0.6).astype(np.float32)
    tail = _ellipse(u, v, pixel, -0.55, -0.05, 0.06, 0.1)
    # Fawn spots on some deer.
    spotted = (rng.random((count, 1, 1)) < 0.5).astype(np.float32)
    spots = (_spots(u, v, rng, 40.0) > 0.75).astype(np.float32) * (np.abs(v) < 0.16)
    texture = 1.0 + 0.5 * spotted * spots
    return (
        body,
        texture,
        [(antlers, _fixed(count, (0.35, 0.25, 0.15))), (tail, _fixed(count, (0.92, 0.9, 0.86)))],
    )


def _draw_dog(u: _Array, v: _Array, pixel: _Array, rng: np.random.Generator) -> _Layers:
    count = len(u)
    body = _union(
        _ellipse(u, v, pixel, -0.1, 0.08, 0.5, 0.26),
        _ellipse(u, v, pixel, 0.45, -0.22, 0.22, 0.2),
        _ellipse(u, v, pixel, 0.66, -0.14, 0.14, 0.09),
        _segment(u, v, pixel, (-0.42, 0.25), (-0.44, 0.66), 0.11),
        _segment(u, v, pixel, (0.2, 0.25), (0.22, 0.66), 0.11),
        _segment(u, v, pixel, (-0.56, -0.02), (-0.78, -0.32), 0.08),
    )
    ear = _ellipse(u, v, pixel, 0.32, -0.14, 0.08, 0.19)
    eye = _ellipse(u, v, pixel, 0.5, -0.27, 0.035, 0.035)
    nose = _ellipse(u, v, pixel, 0.79, -0.16, 0.045, 0.04)
    ear_colour = _pick_colours(_PALETTES[5], count, rng) * 0.55
    # Fur: fine grain that a linear read of the pixels averages away.
    texture = 1.0 + 0.48 * (rng.random(u.shape, dtype=np.float32) - 0.5)
    return (
        body,
        texture,
        [(ear, ear_colour), (eye, _dark(count, rng, 0.05)), (nose, _dark(count, rng, 0.05))],
    )


def _draw_frog(u: _Array, v: _Array, pixel: _Array, rng: np.random.Generator) -> _Layers:
    count = len(u)
    body = _union(
        _ellipse(u, v, pixel, 0.0, 0.1, 0.48, 0.32),
        _ellipse(u, v, pixel, -0.24, -0.17, 0.14, 0.13),
        _ellipse(u, v, pixel, 0.24, -0.17, 0.14, 0.13),
        _ellipse(u, v, pixel, -0.46, 0.34, 0.24, 0.1),
        _ellipse(u, v, pixel, 0.46, 0.34, 0.24, 0.1),
        _ellipse(u, v, pixel, -0.5, 0.0, 0.08, 0.18),
        _ellipse(u, v, pixel, 0.5, 0.0, 0.08, 0.18),
    )
    pupils = _union(
        _ellipse(u, v, pixel, -0.24, -0.19, 0.06, 0.06),
        _ellipse(u, v, pixel, 0.24, -0.19, 0.06, 0.06),
    )
    belly = _ellipse(u, v, pixel, 0.0, 0.2, 0.28, 0.14)
    spots = (_spots(u, v, rng, 28.0) > 0.55).astype(np.float32)
    texture = 1.0 - 0.5 * spots
    belly_colour = (_fixed(count, (0.85, 0.82, 0.55)) + rng.uniform(-0.1, 0.1, (count, 1))).astype(
        np.float32
    )
    return body, texture, [(belly * 0.6, belly_colour), (pupils, _dark(count, rng, 0.03))]


def _draw_horse(u: _Array, v: _Array, pixel: _Array, rng: np.random.Generator) -> _Layers:
    count = len(u)
    legs = [
        _segment(u, v, pixel, (x, 0.1), (x + lean, 0.74), 0.085)
        for x, lean in ((-0.47, -0.04), (-0.32, 0.03), (0.26, -0.02), (0.4, 0.05))
    ]
    body = _union(
        _ellipse(u, v, pixel, -0.05, 0.0, 0.56, 0.22),
        _segment(u, v, pixel, (0.33, -0.04), (0.54, -0.46), 0.17),
        _segment(u, v, pixel, (0.52, -0.5), (0.8, -0.3), 0.12),
        *legs,
    )
    mane = _segment(u, v, pixel, (0.3, -0.16), (0.47, -0.54), 0.06)
    tail = _segment(u, v, pixel, (-0.6, -0.06), (-0.76, 0.42), 0.075)
    hooves = _box(u, v, pixel, 0.0, 0.72, 0.7, 0.04) * _union(*legs)
    hair = _dark(count, rng, 0.1)
    texture = 1.0 + 0.08 * _waves(u, v, rng, 6.0, 10.0)
    return body, texture, [(mane, hair), (tail, hair), (hooves, _dark(count, rng, 0.08))]


def _draw_ship(u: _Array, v: _Array, pixel: _Array, rng: np.random.Generator) -> _Layers:
    count = len(u)
    hull_depth = np.minimum(0.13 - np.abs(v - 0.18), (0.86 - (v - 0.05) * 0.9 - np.abs(u)) * 0.7)
    hull = _edge(hull_depth, pixel)
    body = _union(
        hull,
        _box(u, v, pixel, -0.1, -0.06, 0.38, 0.12),
        _box(u, v, pixel, -0.22, -0.24, 0.16, 0.09),
        _segment(u, v, pixel, (0.32, 0.02), (0.32, -0.6), 0.045),
        _box(u, v, pixel, 0.05, -0.28, 0.05, 0.12),
    )
    portholes = _box(u, v, pixel, -0.1, -0.06, 0.33, 0.035) * (np.sin(u * 40.0) > 0.2)
    waterline = _box(u, v, pixel, 0.0, 0.27, 0.82, 0.05) * hull
    hull_colour = _pick_colours(
        ((0.7, 0.12, 0.1), (0.12, 0.12, 0.15), (0.2, 0.25, 0.5)), count, rng
    )
    texture = np.ones_like(u)
    return body, texture, [(portholes, _dark(count, rng, 0.1)), (waterline, hull_colour)]


def _draw_truck(u: _Array, v: _Array, pixel: _Array, rng: np.random.Generator) -> _Layers:
    count = len(u)
    cargo = _box(u, v, pixel, 0.18, -0.1, 0.56, 0.34)
    body = _union(
        cargo,
        _box(u, v, pixel, -0.56, 0.04, 0.2, 0.21),
        _box(u, v, pixel, -0.1, 0.28, 0.86, 0.05),
    )
    window = _box(u, v, pixel, -0.6, -0.05, 0.12, 0.08)
    wheels = _union(
        *(_ellipse(u, v, pixel, x, 0.33, 0.14, 0.14) for x in (-0.56, 0.05, 0.5)),
    )
    # Ribbed cargo panels.
    ribs = (_waves(u, v, rng, 22.0, 30.0, tilt=0.0) > 0.6).astype(np.float32) * cargo
    texture = 1.0 - 0.22 * ribs
    glass = _fixed(count, (0.55, 0.62, 0.72))
    return body, texture, [(window, glass), (wheels, _dark(count, rng))]


_DRAW: tuple[Callable[[_Array, _Array, _Array, np.random.Generator], _Layers], ...] = (
    _draw_airplane,
    _draw_automobile,
    _draw_bird,
    _draw_cat,
    _draw_deer,
    _draw_dog,
    _draw_frog,
    _draw_horse,
    _draw_ship,
    _draw_truck,
)
# Birds and frogs are small in the frame; vehicles and large animals fill it.
_OBJECT_SIZE = (1.0, 0.95, 0.72, 0.85, 0.95, 0.9, 0.75, 1.0, 1.0, 1.0)

_Colour = tuple[float, float, float]
_VEHICLE: tuple[_Colour, ...] = (
    (0.8, 0.1, 0.1),
    (0.15, 0.25, 0.7),
    (0.9, 0.9, 0.9),
    (0.12, 0.12, 0.14),
    (0.9, 0.8, 0.15),
    (0.65, 0.65, 0.68),
)
_FUR: tuple[_Colour, ...] = (
    (0.5, 0.35, 0.2),
    (0.8, 0.65, 0.4),
    (0.15, 0.13, 0.12),
    (0.9, 0.88, 0.85),
    (0.6, 0.6, 0.6),
)
# Palettes overlap on purpose (vehicles share paint, animals share fur), so colour is a weak cue.
_PALETTES: tuple[tuple[_Colour, ...], ...] = (
    ((0.9, 0.9, 0.92), (0.7, 0.72, 0.75), (0.5, 0.52, 0.55), (0.8, 0.2, 0.2)),
    _VEHICLE,
    ((0.5, 0.35, 0.2), (0.2, 0.35, 0.75), (0.8, 0.15, 0.1), (0.9, 0.8, 0.2), (0.15, 0.15, 0.15)),
    (*_FUR, (0.85, 0.55, 0.25)),
    ((0.55, 0.4, 0.25), (0.7, 0.55, 0.35), (0.6, 0.35, 0.2)),
    (*_FUR, (0.85, 0.65, 0.3)),
    ((0.3, 0.6, 0.2), (0.5, 0.55, 0.2), (0.5, 0.4, 0.25), (0.8, 0.75, 0.2), (0.8, 0.25, 0.15)),
    ((0.45, 0.3, 0.18), (0.12, 0.1, 0.1), (0.85, 0.83, 0.8), (0.6, 0.3, 0.15), (0.5, 0.5, 0.5)),
    ((0.9, 0.9, 0.9), (0.5, 0.5, 0.55), (0.7, 0.15, 0.1), (0.15, 0.15, 0.18), (0.2, 0.3, 0.6)),
    (*_VEHICLE, (0.9, 0.5, 0.1), (0.2, 0.5, 0.25)),
)


def _pick_colours(palette: tuple[_Colour, ...], count: int, rng: np.random.Generator) -> _Array:
    base = np.asarray(palette, dtype=np.float32)[rng.integers(0, len(palette), count)]
    brightness = rng.uniform(0.8, 1.15, (count, 1))
    jitter = rng.normal(0.0, 0.06, (count, 3))
    return np.clip(base * brightness + jitter, 0.0, 1.0).astype(np.float32)


# Scenes: (top colour, bottom colour) families, and how often each class appears in each.
_SCENES = ("sky", "water", "foliage", "field", "indoor", "street")
_SCENE_COLOURS: dict[str, tuple[_Colour, _Colour]] = {
    "sky": ((0.45, 0.62, 0.85), (0.78, 0.85, 0.92)),
    "water": ((0.65, 0.78, 0.9), (0.15, 0.32, 0.55)),
    "foliage": ((0.25, 0.42, 0.18), (0.35, 0.5, 0.22)),
    "field": ((0.62, 0.72, 0.8), (0.55, 0.5, 0.3)),
    "indoor": ((0.75, 0.68, 0.58), (0.5, 0.4, 0.32)),
    "street": ((0.6, 0.62, 0.66), (0.35, 0.35, 0.37)),
}
_SCENE_TOP = np.asarray([_SCENE_COLOURS[name][0] for name in _SCENES], dtype=np.float32)
_SCENE_BOTTOM = np.asarray([_SCENE_COLOURS[name][1] for name in _SCENES], dtype=np.float32)
_SCENE_ODDS = np.asarray(
    [
        # sky water foliage field indoor street
        [0.55, 0.1, 0.05, 0.15, 0.0, 0.15],  # airplane
        [0.05, 0.0, 0.15, 0.2, 0.1, 0.5],  # automobile
        [0.35, 0.1, 0.35, 0.15, 0.05, 0.0],  # bird
        [0.0, 0.0, 0.2, 0.15, 0.5, 0.15],  # cat
        [0.1, 0.0, 0.5, 0.4, 0.0, 0.0],  # deer
        [0.0, 0.0, 0.25, 0.3, 0.35, 0.1],  # dog
        [0.0, 0.15, 0.5, 0.25, 0.1, 0.0],  # frog
        [0.15, 0.0, 0.3, 0.5, 0.0, 0.05],  # horse
        [0.15, 0.75, 0.0, 0.0, 0.0, 0.1],  # ship
        [0.05, 0.0, 0.15, 0.3, 0.0, 0.5],  # truck
    ],
    dtype=np.float64,
)
# Bilinear upsampling of a coarse 5x5 random grid gives smooth blotches (clouds, leaves, walls).
_COARSE = 5
_UPSAMPLE = np.clip(
    1.0 - np.abs(np.linspace(0, _COARSE - 1, _SIZE)[:, None] - np.arange(_COARSE)[None, :]),
    0.0,
    1.0,
).astype(np.float32)


def _background(labels: _Array, rng: np.random.Generator) -> _Array:
    count = len(labels)
    cumulative = np.cumsum(_SCENE_ODDS[labels], axis=1)
    scene = np.minimum((rng.random((count, 1)) > cumulative).sum(axis=1), len(_SCENES) - 1)
    top = _SCENE_TOP[scene] * rng.uniform(0.75, 1.2, (count, 1)) + rng.normal(0, 0.06, (count, 3))
    bottom = _SCENE_BOTTOM[scene] * rng.uniform(0.75, 1.2, (count, 1))
    bottom += rng.normal(0, 0.06, (count, 3))
    # Scenes with a horizon (water, field, indoor floor, street) switch colour at a random height;
    # sky and foliage fade slowly.
    horizon = rng.uniform(-0.4, 0.5, (count, 1)).astype(np.float32)
    sharpness = np.where(np.isin(scene, (0, 2)), 0.9, 0.06).astype(np.float32)[:, None]
    mix = np.clip(0.5 + (_AXIS[None, :] - horizon) / (2 * sharpness), 0.0, 1.0)
    rows = top.astype(np.float32)[:, :, None] * (1.0 - mix[:, None, :])
    rows += bottom.astype(np.float32)[:, :, None] * mix[:, None, :]
    coarse = rng.standard_normal((count, _COARSE, _COARSE), dtype=np.float32)
    coarse *= rng.uniform(0.03, 0.12, (count, 1, 1)).astype(np.float32)
    blotches = np.einsum("yi,nij,xj->nyx", _UPSAMPLE, coarse, _UPSAMPLE, optimize=True)
    return rows[..., None] + blotches[:, None]
