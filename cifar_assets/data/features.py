"""The feature store: declared per-image features, computed vectorised, kept in versioned Parquet.

Features are declared in :data:`FEATURE_GROUPS` (colour, intensity, texture, noise, artifacts),
chosen so that the usual kinds of data drift (brightness, contrast, blur, noise, pixelation, JPEG
compression, colour casts) each move at least one of them. :func:`compute_features` computes
them for any image set, labelled or not; :class:`FeatureStore` writes them to Parquet with the
declarations and :data:`SCHEMA_VERSION` in the file's schema metadata, and reads rows back by id.

Bump rule: change :data:`SCHEMA_VERSION` whenever a feature is added, removed, renamed, retyped
or computed differently (a new threshold, bin count or filter counts). Files written under
another version are then refused on read, and the ``image_features`` asset must be
re-materialized.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cifar_assets.data.imageset import ImageSet
from cifar_assets.data.statistics import ColourStatistics, colour_statistics, luma
from cifar_assets.fileio import replace_atomic
from cifar_assets.progress import ProgressReporter

SCHEMA_VERSION = "1"
DEFAULT_TABLE = "image_features"
VERSION_KEY = b"cifar_assets.feature_schema_version"
GROUPS_KEY = b"cifar_assets.feature_groups"
ALLOWED_DTYPES = ("float32", "float64")

_CHUNK = 2048  # images per step: the float32 working arrays stay near 10 MB each
EDGE_THRESHOLD = 128.0  # Sobel magnitude of a luma step of about 32 levels
CHROMA_THRESHOLD = 16.0  # below this max-min spread a pixel's hue is noise, not colour
HUE_BINS = 12  # 30 degrees each
HIGH_FREQUENCY_START = 16  # DCT coefficients with u + v >= 16 of 0..62 count as high frequency
CLIP_LEVELS = 2  # luma within 2 levels of 0 or 255 counts as clipped
BLOCK = 8  # the JPEG block size
# Immerkaer (1996): the mean absolute response of this Laplacian-difference kernel to Gaussian
# noise of sigma s is s * 6 / sqrt(pi / 2); structure cancels to first order.
_IMMERKAER_SCALE = float(np.sqrt(np.pi / 2) / 6)
_MAD_TO_SIGMA = 1 / 0.6745  # median absolute deviation of a Gaussian, in sigmas


@dataclass(frozen=True)
class Feature:
    name: str
    dtype: str  # one of ALLOWED_DTYPES
    description: str


@dataclass(frozen=True)
class FeatureGroup:
    name: str
    description: str
    features: tuple[Feature, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(feature.name for feature in self.features)


def _f32(name: str, description: str) -> Feature:
    return Feature(name, "float32", description)


FEATURE_GROUPS: tuple[FeatureGroup, ...] = (
    FeatureGroup(
        "colour",
        "Colour moments and colour richness; moves with colour casts and white-balance drift.",
        (
            _f32("mean_r", "Mean red value, 0..255."),
            _f32("mean_g", "Mean green value, 0..255."),
            _f32("mean_b", "Mean blue value, 0..255."),
            _f32("std_r", "Standard deviation of red, 0..255 scale."),
            _f32("std_g", "Standard deviation of green, 0..255 scale."),
            _f32("std_b", "Standard deviation of blue, 0..255 scale."),
            _f32("colourfulness", "Hasler-Suesstrunk colourfulness of the rg/yb opponent axes."),
            _f32("saturation_mean", "Mean HSV saturation (max-min)/max, 0..1."),
            _f32(
                "hue_entropy",
                f"Entropy of the {HUE_BINS}-bin hue histogram of pixels with chroma >= "
                f"{CHROMA_THRESHOLD:g}, normalised to 0..1 (0 when no pixel is chromatic).",
            ),
        ),
    ),
    FeatureGroup(
        "intensity",
        "BT.601 luma level and spread; moves with exposure, brightness and contrast drift.",
        (
            _f32("brightness", "Mean luma, 0..255."),
            _f32("contrast", "Standard deviation of luma, 0..255 scale."),
            _f32("dynamic_range", "99th minus 1st percentile of rounded luma, 0..255."),
            _f32("intensity_entropy", "Entropy of the 256-level luma histogram, bits (0..8)."),
            _f32(
                "clipped_fraction",
                f"Share of pixels whose luma is within {CLIP_LEVELS} levels of 0 or 255.",
            ),
        ),
    ),
    FeatureGroup(
        "texture",
        "Edges and fine detail of the luma; falls with blur, rises with sharpening and noise.",
        (
            _f32("gradient_mean", "Mean Sobel gradient magnitude of luma (edge-replicated)."),
            _f32(
                "edge_density",
                f"Share of pixels whose Sobel magnitude exceeds {EDGE_THRESHOLD:g}.",
            ),
            _f32("laplacian_variance", "Variance of the 4-neighbour Laplacian (blur measure)."),
            _f32(
                "high_frequency_ratio",
                f"Share of non-DC DCT energy in frequencies u + v >= {HIGH_FREQUENCY_START}.",
            ),
        ),
    ),
    FeatureGroup(
        "noise",
        "Estimated sensor noise of the luma; rises with added noise, falls with denoising.",
        (
            _f32("noise_sigma", "Immerkaer's fast noise sigma estimate, luma levels."),
            _f32(
                "noise_sigma_mad",
                "Donoho's wavelet estimate: median |finest diagonal Haar detail| / 0.6745.",
            ),
        ),
    ),
    FeatureGroup(
        "artifacts",
        "Traces of resampling and compression; moves with pixelation and JPEG drift.",
        (
            _f32(
                "jpeg_blockiness",
                f"Mean luma jump across {BLOCK}-pixel block borders over the mean jump inside "
                "blocks (+1 smoothing); about 1 for natural images, above 1 for blocky JPEG.",
            ),
            _f32(
                "pixelation",
                "Share of horizontally or vertically adjacent pixel pairs with identical RGB.",
            ),
        ),
    ),
)


def feature_columns(groups: Sequence[FeatureGroup] = FEATURE_GROUPS) -> list[str]:
    """The table's columns: ``id`` then every declared feature, in declaration order."""
    return ["id", *(name for group in groups for name in group.columns)]


def _feature_dtypes(groups: Sequence[FeatureGroup]) -> dict[str, str]:
    return {feature.name: feature.dtype for group in groups for feature in group.features}


Values = dict[str, np.ndarray]


class _Chunk:
    """A chunk of uint8 images and the derived arrays several feature groups share."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images
        self.red, self.green, self.blue = (images[..., c] for c in range(3))
        self.luma = luma(images)

    @cached_property
    def colour(self) -> ColourStatistics:
        return colour_statistics(self.images)

    @cached_property
    def padded_luma(self) -> np.ndarray:
        return np.pad(self.luma, ((0, 0), (1, 1), (1, 1)), mode="edge")

    def shifted(self, dy: int, dx: int) -> np.ndarray:
        """The luma moved by (dy, dx) pixels, edges replicated: ``shifted(0, 1)[y, x] = L[y, x+1]``."""
        rows, cols = self.luma.shape[1:]
        return self.padded_luma[:, 1 + dy : 1 + dy + rows, 1 + dx : 1 + dx + cols]


def _colour(chunk: _Chunk) -> Values:
    colour = chunk.colour
    means = colour.means
    red_green = np.array([1.0, -1.0, 0.0])
    yellow_blue = np.array([0.5, 0.5, -1.0])
    opponent_spread = np.hypot(colour.spread(red_green), colour.spread(yellow_blue))
    opponent_mean = np.hypot(means @ red_green, means @ yellow_blue)

    # channel-wise maximum/minimum on uint8 views: reductions over a length-3 axis are slow
    high_u8 = np.maximum(np.maximum(chunk.red, chunk.green), chunk.blue)
    low_u8 = np.minimum(np.minimum(chunk.red, chunk.green), chunk.blue)
    high = high_u8.astype(np.float32)
    chroma = high - low_u8
    saturation = np.divide(chroma, high, out=np.zeros_like(chroma), where=high_u8 > 0)
    # hue = offset + numerator / chroma in sixths of the circle; its bin in integer arithmetic
    red, green, blue = (
        channel.astype(np.int16) for channel in (chunk.red, chunk.green, chunk.blue)
    )
    red_max, green_max = high_u8 == chunk.red, high_u8 == chunk.green
    numerator = np.where(red_max, green - blue, np.where(green_max, blue - red, red - green))
    offset = np.where(red_max, 0, np.where(green_max, 2, 4)).astype(np.int16)
    safe_chroma = np.maximum(high_u8.astype(np.int16) - low_u8, 1)
    per_sixth = HUE_BINS // 6
    bins = (per_sixth * offset + (per_sixth * numerator) // safe_chroma) % HUE_BINS
    n = len(bins)
    keys = bins + (np.arange(n, dtype=np.int64) * HUE_BINS)[:, None, None]
    histogram = np.bincount(keys[chroma >= CHROMA_THRESHOLD], minlength=n * HUE_BINS)
    return {
        **colour.channel_columns(),
        "colourfulness": opponent_spread + 0.3 * opponent_mean,
        "saturation_mean": saturation.mean(axis=(1, 2)),
        "hue_entropy": _entropy_bits(histogram.reshape(n, HUE_BINS)) / np.log2(HUE_BINS),
    }


def _entropy_bits(histogram: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of each row of a count histogram; 0 for an empty row."""
    totals = histogram.sum(axis=1, keepdims=True)
    shares = np.divide(histogram, totals, out=np.zeros(histogram.shape), where=totals > 0)
    logs = np.log2(shares, out=np.zeros_like(shares), where=shares > 0)
    return np.asarray(-(shares * logs).sum(axis=1))


def _intensity(chunk: _Chunk) -> Values:
    n, pixels = len(chunk.luma), chunk.luma[0].size
    levels = np.rint(chunk.luma).astype(np.int64).reshape(n, pixels)
    levels += (np.arange(n) * 256)[:, None]
    histogram = np.bincount(levels.ravel(), minlength=n * 256).reshape(n, 256)
    cumulative = np.cumsum(histogram, axis=1)
    low = np.argmax(cumulative >= 0.01 * pixels, axis=1)
    high = np.argmax(cumulative >= 0.99 * pixels, axis=1)
    dark = histogram[:, : CLIP_LEVELS + 1].sum(axis=1)
    bright = histogram[:, 255 - CLIP_LEVELS :].sum(axis=1)
    return {
        "brightness": chunk.colour.brightness,
        "contrast": chunk.colour.contrast,
        "dynamic_range": (high - low).astype(np.float64),
        "intensity_entropy": _entropy_bits(histogram),
        "clipped_fraction": (dark + bright) / pixels,
    }


def _texture(chunk: _Chunk) -> Values:
    from scipy.fft import dctn

    shifted, luma, padded = chunk.shifted, chunk.luma, chunk.padded_luma
    # Sobel is separable: [1, 2, 1] smoothing across the derivative, [-1, 0, 1] along it
    smooth_rows = padded[:, :-2, :] + 2 * padded[:, 1:-1, :] + padded[:, 2:, :]
    smooth_cols = padded[:, :, :-2] + 2 * padded[:, :, 1:-1] + padded[:, :, 2:]
    gx = smooth_rows[:, :, 2:] - smooth_rows[:, :, :-2]
    gy = smooth_cols[:, 2:, :] - smooth_cols[:, :-2, :]
    magnitude = np.sqrt(gx * gx + gy * gy)
    laplacian = shifted(-1, 0) + shifted(1, 0) + shifted(0, -1) + shifted(0, 1) - 4 * luma

    rows, cols = luma.shape[1:]
    spectrum = dctn(luma, type=2, norm="ortho", axes=(1, 2))
    energy = (spectrum * spectrum).reshape(len(luma), -1)
    high_band = (np.add.outer(np.arange(rows), np.arange(cols)) >= HIGH_FREQUENCY_START).ravel()
    ac_energy = energy.sum(axis=1) - energy[:, 0]
    high_energy = energy[:, high_band].sum(axis=1)
    return {
        "gradient_mean": magnitude.mean(axis=(1, 2)),
        "edge_density": (magnitude > EDGE_THRESHOLD).mean(axis=(1, 2)),
        "laplacian_variance": laplacian.var(axis=(1, 2)),
        "high_frequency_ratio": np.divide(
            high_energy, ac_energy, out=np.zeros_like(ac_energy), where=ac_energy > 1e-6
        ),
    }


def _noise(chunk: _Chunk) -> Values:
    luma = chunk.luma
    # the Immerkaer kernel [[1,-2,1],[-2,4,-2],[1,-2,1]] is the outer product of [1,-2,1]
    second_rows = luma[:, :-2, :] - 2 * luma[:, 1:-1, :] + luma[:, 2:, :]
    response = second_rows[:, :, :-2] - 2 * second_rows[:, :, 1:-1] + second_rows[:, :, 2:]
    immerkaer = _IMMERKAER_SCALE * np.abs(response).mean(axis=(1, 2))
    even_rows, odd_rows = luma[:, 0::2, :], luma[:, 1::2, :]
    diagonal = (
        even_rows[:, :, 0::2] - even_rows[:, :, 1::2] - odd_rows[:, :, 0::2] + odd_rows[:, :, 1::2]
    ) / 2
    mad = np.median(np.abs(diagonal).reshape(len(luma), -1), axis=1) * _MAD_TO_SIGMA
    return {"noise_sigma": immerkaer, "noise_sigma_mad": mad}


def _artifacts(chunk: _Chunk) -> Values:
    luma = chunk.luma
    across_cols = np.abs(luma[:, :, 1:] - luma[:, :, :-1])  # jump between columns j and j + 1
    across_rows = np.abs(luma[:, 1:, :] - luma[:, :-1, :])
    col_border = (np.arange(across_cols.shape[2]) % BLOCK) == BLOCK - 1
    row_border = (np.arange(across_rows.shape[1]) % BLOCK) == BLOCK - 1
    col_sums = across_cols.sum(axis=1)  # (n, cols - 1)
    row_sums = across_rows.sum(axis=2)  # (n, rows - 1)
    border = col_sums[:, col_border].sum(axis=1) + row_sums[:, row_border].sum(axis=1)
    inner = col_sums[:, ~col_border].sum(axis=1) + row_sums[:, ~row_border].sum(axis=1)
    rows, cols = luma.shape[1:]
    border_pairs = rows * col_border.sum() + cols * row_border.sum()
    inner_pairs = rows * (~col_border).sum() + cols * (~row_border).sum()

    # one integer per pixel colour, so "identical RGB" is a single comparison
    colour = chunk.red.astype(np.int32) << 16 | chunk.green.astype(np.int32) << 8 | chunk.blue
    same_cols = (colour[:, :, 1:] == colour[:, :, :-1]).sum(axis=(1, 2))
    same_rows = (colour[:, 1:, :] == colour[:, :-1, :]).sum(axis=(1, 2))
    pairs = rows * (cols - 1) + (rows - 1) * cols
    return {
        "jpeg_blockiness": (border / border_pairs + 1) / (inner / inner_pairs + 1),
        "pixelation": (same_cols + same_rows) / pairs,
    }


_COMPUTE: dict[str, Callable[[_Chunk], Values]] = {
    "colour": _colour,
    "intensity": _intensity,
    "texture": _texture,
    "noise": _noise,
    "artifacts": _artifacts,
}


def compute_features(
    imageset: ImageSet,
    groups: Sequence[FeatureGroup] = FEATURE_GROUPS,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """One row per image: ``id`` then every feature of ``groups``, each in its declared dtype.

    Labels are not used, so unlabelled batches work too. Images are processed in chunks, each
    row depending only on its own image, so results do not depend on the set's size. Progress
    goes to ``log`` at least every 10 s (and to a bar on standard error, see
    :mod:`cifar_assets.progress`).
    """
    unknown = [group.name for group in groups if group.name not in _COMPUTE]
    if unknown:
        raise ValueError(
            f"feature groups {unknown} have no computation; known groups are "
            f"{sorted(_COMPUTE)}. Declare new groups in cifar_assets/data/features.py."
        )
    images = np.asarray(imageset.images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"compute_features needs uint8 RGB images (N, H, W, 3) from {imageset.source}; got "
            f"{images.dtype} {images.shape}. Build the set with ImageSet.from_arrays."
        )
    if len(imageset.ids) != len(images):
        raise ValueError(
            f"{imageset.source}: {len(images)} images but {len(imageset.ids)} ids; rebuild the "
            "set with ImageSet.from_arrays so every image has its id."
        )
    dtypes = _feature_dtypes(groups)
    columns: dict[str, np.ndarray] = {
        name: np.empty(len(images), dtype=dtype) for name, dtype in dtypes.items()
    }
    with ProgressReporter(
        f"features of {imageset.source}", len(images), unit="image", log=log
    ) as progress:
        for start in range(0, len(images), _CHUNK):
            chunk = _Chunk(images[start : start + _CHUNK])
            for group in groups:
                values = _COMPUTE[group.name](chunk)
                for feature in group.features:
                    columns[feature.name][start : start + len(chunk.images)] = values[feature.name]
            progress.update(len(chunk.images))
    table = pd.DataFrame({"id": pd.Series(imageset.ids, dtype=object).astype(str), **columns})
    return table[feature_columns(groups)]


class FeatureSchemaError(ValueError):
    """A feature table or file does not match the declared features; the message says how."""


class FeatureLookupError(KeyError):
    """Requested ids or features are not in the stored table; the message lists them."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class FeatureStore:
    """Feature tables as Parquet files under ``root``, one file per table name.

    Each file carries :data:`SCHEMA_VERSION` and the JSON of its feature groups in the Parquet
    schema metadata, so a reader can tell which definitions produced the numbers.
    """

    def __init__(self, root: Path, groups: Sequence[FeatureGroup] = FEATURE_GROUPS) -> None:
        self.root = Path(root)
        self._groups = tuple(groups)

    def path(self, name: str = DEFAULT_TABLE) -> Path:
        return self.root / f"{name}.parquet"

    def write(self, table: pd.DataFrame, name: str = DEFAULT_TABLE) -> Path:
        """Validate ``table`` and store it atomically (temporary file, then rename).

        Raises :class:`FeatureSchemaError` before touching the stored file if the columns or
        dtypes differ from the declared features, or ids are missing or repeated.
        """
        self._validate(table, name)
        columns = feature_columns(self._groups)
        arrow = pa.Table.from_pandas(table[columns], preserve_index=False)
        metadata = dict(arrow.schema.metadata or {})
        metadata[VERSION_KEY] = SCHEMA_VERSION.encode()
        metadata[GROUPS_KEY] = json.dumps([asdict(group) for group in self._groups]).encode()
        arrow = arrow.replace_schema_metadata(metadata)

        return replace_atomic(self.path(name), lambda path: pq.write_table(arrow, path))

    def _validate(self, table: pd.DataFrame, name: str) -> None:
        where = f"feature table {name!r}"
        expected = feature_columns(self._groups)
        missing = [column for column in expected if column not in table.columns]
        extra = [column for column in table.columns if column not in expected]
        if missing or extra:
            raise FeatureSchemaError(
                f"{where}: missing columns {missing}, unexpected columns {extra}. Compute it with "
                "compute_features() for the store's feature groups."
            )
        wrong = {
            column: f"{table[column].dtype} (declared {dtype})"
            for column, dtype in _feature_dtypes(self._groups).items()
            if str(table[column].dtype) != dtype
        }
        if wrong:
            raise FeatureSchemaError(
                f"{where}: columns have the wrong dtype: {wrong}. Cast them to the declared "
                "dtypes or recompute with compute_features()."
            )
        ids = table["id"]
        if not all(isinstance(value, str) and value for value in ids):
            bad = [repr(value) for value in ids if not (isinstance(value, str) and value)][:10]
            raise FeatureSchemaError(
                f"{where}: every id must be a non-empty string; found {', '.join(bad)}."
            )
        repeated = ids[ids.duplicated()].unique()
        if len(repeated):
            raise FeatureSchemaError(
                f"{where}: {len(repeated)} ids occur more than once (e.g. "
                f"{', '.join(map(str, repeated[:10]))}); ids are the store's key, so drop "
                "duplicate images (e.g. table.drop_duplicates('id')) before writing."
            )
        values = table[list(_feature_dtypes(self._groups))].to_numpy(dtype=np.float64)
        bad_rows = ~np.isfinite(values).all(axis=1)
        if bad_rows.any():
            raise FeatureSchemaError(
                f"{where}: {int(bad_rows.sum())} rows hold NaN or infinite features (ids "
                f"{', '.join(ids[bad_rows].astype(str).head(10))}); fix or drop these images."
            )

    def _metadata(self, name: str) -> dict[bytes, bytes]:
        path = self.path(name)
        if not path.exists():
            raise FileNotFoundError(
                f"no feature table at {path}; materialize the image_features asset first."
            )
        return dict(pq.read_schema(path).metadata or {})

    def schema_version(self, name: str = DEFAULT_TABLE) -> str:
        """The feature schema version the stored file was written with."""
        version = self._metadata(name).get(VERSION_KEY)
        if version is None:
            raise FeatureSchemaError(
                f"{self.path(name)} has no feature schema version in its metadata, so it was not "
                "written by FeatureStore; re-materialize the image_features asset."
            )
        return version.decode()

    def groups(self, name: str = DEFAULT_TABLE) -> tuple[FeatureGroup, ...]:
        """The feature group declarations stored in the file (not those of the running code)."""
        stored = self._metadata(name).get(GROUPS_KEY)
        if stored is None:
            raise FeatureSchemaError(
                f"{self.path(name)} has no feature declarations in its metadata; "
                "re-materialize the image_features asset."
            )
        return tuple(
            FeatureGroup(
                group["name"],
                group["description"],
                tuple(Feature(**feature) for feature in group["features"]),
            )
            for group in json.loads(stored)
        )

    def read(
        self,
        ids: str | Sequence[str] | None = None,
        columns: Sequence[str] | None = None,
        name: str = DEFAULT_TABLE,
    ) -> pd.DataFrame:
        """Stored rows with ``id`` first, in the order of ``ids`` (all rows when None).

        ``columns`` picks features (default: all). Raises :class:`FeatureSchemaError` if the
        file was written under another schema version and :class:`FeatureLookupError` (a
        KeyError) for unknown ids or columns, naming up to ten of them.
        """
        version = self.schema_version(name)
        if version != SCHEMA_VERSION:
            raise FeatureSchemaError(
                f"{self.path(name)} was written with feature schema version {version}, but this "
                f"code declares version {SCHEMA_VERSION}; re-materialize the image_features "
                "asset to recompute the features."
            )
        stored = list(pq.read_schema(self.path(name)).names)
        wanted = [column for column in (stored if columns is None else columns) if column != "id"]
        unknown = [column for column in wanted if column not in stored]
        if unknown:
            raise FeatureLookupError(
                f"features {unknown} are not in {self.path(name)}; stored features are "
                f"{stored[1:]}."
            )
        table = pq.read_table(self.path(name), columns=["id", *wanted]).to_pandas()
        if ids is None:
            return table
        requested = [ids] if isinstance(ids, str) else list(ids)
        position = pd.Index(table["id"]).get_indexer(requested)
        if (position < 0).any():
            absent = [
                image_id for image_id, found in zip(requested, position, strict=True) if found < 0
            ]
            raise FeatureLookupError(
                f"{len(absent)} of {len(requested)} requested ids are not in {self.path(name)} "
                f"(e.g. {', '.join(absent[:10])}); re-materialize image_features if these images "
                "are new."
            )
        return table.iloc[position].reset_index(drop=True)
