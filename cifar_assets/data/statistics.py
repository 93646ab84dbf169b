"""Per-image statistics of the splits, and the perceptual-hash search that finds near-duplicates.

:func:`image_statistics` gives one row per image (colour moments, luma brightness and contrast,
pixel range, a content hash and a 64-bit DCT perceptual hash); the validation rules in
:mod:`cifar_assets.data.validation` run on that table. :func:`near_duplicates` finds, for every
query hash, the closest reference hash within a Hamming distance, without comparing all pairs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pandas as pd

from cifar_assets.data.imageset import Splits, content_hash

# ITU-R BT.601 luma weights: the ones JPEG and most image tools use for "brightness".
LUMA_WEIGHTS_64 = np.array([0.299, 0.587, 0.114], dtype=np.float64)
LUMA_WEIGHTS = LUMA_WEIGHTS_64.astype(np.float32)
PHASH_SIDE = 8  # the 8x8 lowest DCT frequencies give the classic 64-bit pHash
PHASH_BITS = PHASH_SIDE * PHASH_SIDE
# Pigeonhole banding needs max_distance + 1 bands; beyond 8 the bands are under 8 bits wide and
# nearly every pair becomes a candidate, so the search would be no faster than brute force.
MAX_SUPPORTED_DISTANCE = 8
_CHUNK = 4096  # images per vectorised step: bounds peak memory to about 100 MB
_MAX_CANDIDATES = 4_000_000  # candidate pairs verified per step, for the same reason
_HEX16 = re.compile(r"[0-9a-f]{16}")
_POPCOUNT_8 = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)

STATISTICS_COLUMNS = (
    "id",
    "origin",
    "split",
    "label",
    "mean_r",
    "mean_g",
    "mean_b",
    "std_r",
    "std_g",
    "std_b",
    "min",
    "max",
    "brightness",
    "contrast",
    "is_constant",
    "content_hash",
    "phash",
)


def luma(images: np.ndarray, dtype: type[np.floating] = np.float32) -> np.ndarray:
    """Luma (N, H, W) of RGB images (N, H, W, 3), on the 0..255 scale, float32 by default.

    Written out per channel rather than as a matrix product, so each pixel's value is the same
    whatever the batch it is computed in (BLAS may order the sums differently per shape).
    """
    weights = LUMA_WEIGHTS_64 if dtype == np.float64 else LUMA_WEIGHTS
    channels = [np.asarray(images[..., c], dtype=dtype) for c in range(3)]
    return channels[0] * weights[0] + channels[1] * weights[1] + channels[2] * weights[2]


def perceptual_hashes(images: np.ndarray) -> np.ndarray:
    """64-bit DCT pHash of each image as uint64 (N,).

    The orthonormal 2-D DCT-II of the luma (``scipy.fft.dctn``) is taken, its 8x8 lowest
    frequencies kept, and each bit says whether a coefficient lies above the median of those 64
    (the imagehash convention, DC included). A uniform brightness shift moves only the DC term, so the hash survives it; small noise
    flips only coefficients close to the median.
    """
    from scipy.fft import dctn

    images = np.asarray(images)
    hashes = np.empty(len(images), dtype=np.uint64)
    weights = np.uint64(1) << np.arange(PHASH_BITS - 1, -1, -1, dtype=np.uint64)
    for start in range(0, len(images), _CHUNK):
        block = luma(images[start : start + _CHUNK], np.float64)
        spectrum = dctn(block, type=2, norm="ortho", axes=(1, 2))
        low = spectrum[:, :PHASH_SIDE, :PHASH_SIDE].reshape(len(block), PHASH_BITS)
        # rounding drops float noise, so a flat image hashes to 0x8000000000000000 on every machine
        low = np.round(low, 6)
        bits = low > np.median(low, axis=1, keepdims=True)
        hashes[start : start + len(block)] = (bits.astype(np.uint64) * weights).sum(
            axis=1, dtype=np.uint64
        )
    return hashes


def hashes_to_hex(hashes: np.ndarray) -> list[str]:
    """uint64 hashes as 16-digit lowercase hex strings, most significant bit first."""
    text = np.asarray(hashes, dtype=np.uint64).astype(">u8").tobytes().hex()
    return [text[i : i + 16] for i in range(0, len(text), 16)]


def hex_to_hashes(texts: pd.Series | list[str]) -> np.ndarray:
    """Inverse of :func:`hashes_to_hex`; raises ValueError naming the first malformed hash."""
    values = [str(value) for value in texts]
    malformed = [value for value in values if not _HEX16.fullmatch(value)]
    if malformed:
        raise ValueError(
            f"perceptual hash {malformed[0]!r} is not 16 lowercase hex digits "
            f"({len(malformed)} malformed in all); recompute the table with image_statistics()."
        )
    return np.frombuffer(bytes.fromhex("".join(values)), dtype=">u8").astype(np.uint64)


def popcount(values: np.ndarray) -> np.ndarray:
    """Number of set bits of each uint64, as uint8 (numpy 1.x has no bitwise_count)."""
    as_bytes = np.ascontiguousarray(values, dtype=np.uint64).view(np.uint8)
    return _POPCOUNT_8[as_bytes].reshape(*np.shape(values), 8).sum(axis=-1, dtype=np.uint8)


def hamming_distances(query: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """All pairwise Hamming distances (len(query), len(reference)) between uint64 hashes.

    Brute force: use it for small sets; :func:`near_duplicates` is the scalable search.
    """
    query = np.asarray(query, dtype=np.uint64)
    reference = np.asarray(reference, dtype=np.uint64)
    return popcount(query[:, None] ^ reference[None, :])


@dataclass(frozen=True)
class NearestMatches:
    """For each query that has a match: its index, the closest reference index, their distance."""

    query_index: np.ndarray  # int64
    reference_index: np.ndarray  # int64
    distance: np.ndarray  # uint8


def near_duplicates(
    query: np.ndarray,
    reference: np.ndarray,
    max_distance: int,
    exclude_equal: np.ndarray | None = None,
) -> NearestMatches:
    """The closest reference hash within ``max_distance`` bits for every query hash that has one.

    Pigeonhole search: the 64 bits are cut into ``max_distance + 1`` disjoint bands; two hashes
    that differ in at most ``max_distance`` bits agree exactly on at least one band, so only
    pairs sharing a band value are compared (a sort and a binary search per band). The result is
    exact, not approximate. ``exclude_equal`` optionally gives a key per hash (query keys then
    reference keys, e.g. content hashes); pairs with equal keys are skipped, so exact duplicates
    do not hide a near-duplicate. Ties go to the lowest reference index.
    """
    if not 0 <= max_distance <= MAX_SUPPORTED_DISTANCE:
        raise ValueError(
            f"near-duplicate max_distance must be in 0..{MAX_SUPPORTED_DISTANCE}, got "
            f"{max_distance}; larger distances match unrelated 64-bit pHashes anyway."
        )
    query = np.asarray(query, dtype=np.uint64)
    reference = np.asarray(reference, dtype=np.uint64)
    query_keys = reference_keys = None
    if exclude_equal is not None:
        keys = np.asarray(exclude_equal)
        if len(keys) != len(query) + len(reference):
            raise ValueError(
                f"exclude_equal needs one key per query and reference hash "
                f"({len(query) + len(reference)}), got {len(keys)}."
            )
        query_keys, reference_keys = keys[: len(query)], keys[len(query) :]

    best_distance = np.full(len(query), 255, dtype=np.uint8)
    best_reference = np.full(len(query), -1, dtype=np.int64)
    bands = max_distance + 1
    edges = np.linspace(0, PHASH_BITS, bands + 1).astype(np.int64)
    for low_bit, high_bit in pairwise(edges):
        mask = np.uint64((1 << int(high_bit - low_bit)) - 1)
        shift = np.uint64(low_bit)
        query_band = (query >> shift) & mask
        reference_band = (reference >> shift) & mask
        order = np.argsort(reference_band, kind="stable")
        sorted_band = reference_band[order]
        first = np.searchsorted(sorted_band, query_band, side="left")
        counts = np.searchsorted(sorted_band, query_band, side="right") - first
        for rows in _rows_by_budget(counts):
            query_idx = np.repeat(rows, counts[rows])
            starts = np.repeat(first[rows], counts[rows])
            offsets = np.arange(len(query_idx)) - np.repeat(
                np.cumsum(counts[rows]) - counts[rows], counts[rows]
            )
            reference_idx = order[starts + offsets]
            distance = popcount(query[query_idx] ^ reference[reference_idx])
            keep = distance <= max_distance
            if query_keys is not None and reference_keys is not None:
                keep &= query_keys[query_idx] != reference_keys[reference_idx]
            _keep_closest(
                best_distance,
                best_reference,
                query_idx[keep],
                reference_idx[keep],
                distance[keep],
            )
    found = np.flatnonzero(best_reference >= 0)
    return NearestMatches(found, best_reference[found], best_distance[found])


def _rows_by_budget(counts: np.ndarray) -> list[np.ndarray]:
    """Split query rows into consecutive groups whose candidate pairs stay under the budget."""
    if counts.sum() <= _MAX_CANDIDATES:
        return [np.arange(len(counts))]
    group = np.cumsum(counts) // _MAX_CANDIDATES
    boundaries = np.flatnonzero(np.diff(group)) + 1
    return np.split(np.arange(len(counts)), boundaries)


def _keep_closest(
    best_distance: np.ndarray,
    best_reference: np.ndarray,
    query_idx: np.ndarray,
    reference_idx: np.ndarray,
    distance: np.ndarray,
) -> None:
    """Fold candidate matches into the running best match per query (lowest distance, then index)."""
    if len(query_idx) == 0:
        return
    order = np.lexsort((reference_idx, distance, query_idx))
    query_idx, reference_idx, distance = query_idx[order], reference_idx[order], distance[order]
    first = np.ones(len(query_idx), dtype=bool)
    first[1:] = query_idx[1:] != query_idx[:-1]
    query_idx, reference_idx, distance = query_idx[first], reference_idx[first], distance[first]
    current = best_distance[query_idx]
    better = (distance < current) | (
        (distance == current) & (reference_idx < best_reference[query_idx])
    )
    best_distance[query_idx[better]] = distance[better]
    best_reference[query_idx[better]] = reference_idx[better]


def single_colour(images: np.ndarray) -> np.ndarray:
    """Bool (N,): True where every pixel of an image has the same colour."""
    images = np.asarray(images)
    flags = np.empty(len(images), dtype=bool)
    for start in range(0, len(images), _CHUNK):
        pixels = images[start : start + _CHUNK].reshape(
            -1, images[0].size // images.shape[-1], images.shape[-1]
        )
        flags[start : start + len(pixels)] = (pixels == pixels[:, :1, :]).all(axis=(1, 2))
    return flags


@dataclass(frozen=True)
class ColourStatistics:
    """Per-image colour moments on the 0..255 scale, float64: the one place the channel means,
    standard deviations and BT.601 luma brightness and contrast are computed."""

    means: np.ndarray  # (N, 3) channel means
    covariance: np.ndarray  # (N, 3, 3) channel covariance over the pixels

    @property
    def stds(self) -> np.ndarray:
        """(N, 3) channel standard deviations."""
        return np.sqrt(np.clip(np.diagonal(self.covariance, axis1=1, axis2=2), 0.0, None))

    @property
    def brightness(self) -> np.ndarray:
        """(N,) mean luma."""
        return np.asarray(self.means @ LUMA_WEIGHTS_64)

    @property
    def contrast(self) -> np.ndarray:
        """(N,) standard deviation of luma."""
        return self.spread(LUMA_WEIGHTS_64)

    def channel_columns(self) -> dict[str, np.ndarray]:
        """``mean_r`` .. ``mean_b`` and ``std_r`` .. ``std_b``, as table columns."""
        means, stds = self.means, self.stds
        return {
            **{f"mean_{channel}": means[:, i] for i, channel in enumerate("rgb")},
            **{f"std_{channel}": stds[:, i] for i, channel in enumerate("rgb")},
        }

    def spread(self, weights: np.ndarray) -> np.ndarray:
        """(N,) standard deviation of the weighted channel sum ``weights @ pixel``."""
        variance = np.einsum("c,ncd,d->n", weights, self.covariance, weights)
        return np.sqrt(np.clip(variance, 0.0, None))


def colour_statistics(images: np.ndarray) -> ColourStatistics:
    """Channel means and covariances of uint8 RGB images (N, H, W, 3).

    Sums and products of uint8 values stay integers far below 2**53, so both are exact in
    float64; two batched matrix products replace several slower strided reductions.
    """
    images = np.asarray(images)
    n, channels = len(images), images.shape[-1]
    pixels_per_image = images[0].size // channels if n else 1
    sums = np.empty((n, channels), dtype=np.float64)
    gram = np.empty((n, channels, channels), dtype=np.float64)
    ones = np.ones(pixels_per_image, dtype=np.float64)
    for start in range(0, n, _CHUNK):
        block = images[start : start + _CHUNK].reshape(-1, pixels_per_image, channels)
        block = block.astype(np.float64)
        sums[start : start + len(block)] = ones @ block
        gram[start : start + len(block)] = block.transpose(0, 2, 1) @ block
    means = sums / pixels_per_image
    covariance = gram / pixels_per_image - means[:, :, None] * means[:, None, :]
    return ColourStatistics(means, covariance)


def image_statistics(splits: Splits) -> pd.DataFrame:
    """One row per image of every split, columns :data:`STATISTICS_COLUMNS`.

    Means and standard deviations are over pixels on the 0..255 scale; ``brightness`` and
    ``contrast`` are the mean and standard deviation of BT.601 luma; ``content_hash`` is the full
    sha256 of the pixel bytes; ``phash`` is :func:`perceptual_hashes` as 16 hex digits;
    ``is_constant`` means every pixel has the same colour; ``origin`` is where the image came from
    (its file path, or source and index), for messages a person can act on.
    """
    frames = []
    for split, part in splits.items():
        images = part.images
        n = len(images)
        colour = colour_statistics(images)
        flat = images.reshape(n, -1)
        lowest = flat.min(axis=1) if n else np.empty(0, dtype=np.uint8)
        highest = flat.max(axis=1) if n else np.empty(0, dtype=np.uint8)
        frames.append(
            pd.DataFrame(
                {
                    "id": pd.Series(part.ids, dtype=object).astype(str),
                    "origin": pd.Series(part.origins, dtype=object).astype(str),
                    "split": split,
                    "label": np.asarray(part.labels, dtype=np.int64),
                    **colour.channel_columns(),
                    "min": lowest.astype(np.int64),
                    "max": highest.astype(np.int64),
                    "brightness": colour.brightness,
                    "contrast": colour.contrast,
                    "is_constant": single_colour(images),
                    "content_hash": [content_hash(image) for image in images],
                    "phash": hashes_to_hex(perceptual_hashes(images)),
                },
                columns=list(STATISTICS_COLUMNS),
            )
        )
    return pd.concat(frames, ignore_index=True)
