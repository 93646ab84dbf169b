"""The one in-memory form every data source produces, and its open on-disk format.

An :class:`ImageSet` is uint8 images (N, 32, 32, 3), int64 labels (N,) in 0..9 (or -1 when a
batch is unlabelled), a stable id per image derived from its content, and an origin per image: where
a person finds it (a file path for an image folder, ``"cifar10 train index 123"`` for an array
source). Ids are keys; origins go into messages. It is stored as an uncompressed ``.npz`` (numpy's
zip of ``.npy`` files, opened with ``allow_pickle=False``); origins are a unicode array in it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifar_assets.fileio import replace_atomic

CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SHAPE = (32, 32, 3)
UNLABELLED = -1
SPLITS = ("train", "validation", "test")


def content_hash(image: np.ndarray) -> str:
    """sha256 of an image's raw bytes, hex: identical pixels give the identical hash."""
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


def content_ids(images: np.ndarray) -> np.ndarray:
    """Stable ids from content: the first 16 hex digits of the content hash.

    Identical images within one set get ``-1``, ``-2``... suffixes so ids stay unique keys while
    remaining a pure function of the pixels and their order of appearance.
    """
    seen: dict[str, int] = {}
    ids = []
    for image in images:
        base = content_hash(image)[:16]
        count = seen.get(base, 0)
        seen[base] = count + 1
        ids.append(base if count == 0 else f"{base}-{count}")
    return np.asarray(ids, dtype="<U24")


def default_origins(source: str, count: int) -> np.ndarray:
    """Origins for images that have no file of their own: ``"<source> index <i>"``."""
    return np.asarray([f"{source} index {i}" for i in range(count)], dtype=str)


def _no_origins() -> np.ndarray:
    return np.empty(0, dtype=str)


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images with labels, content ids and origins; leave ``origins`` out for array sources and
    each image is named ``"<source> index <i>"`` by its position."""

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    source: str = "unknown"
    origins: np.ndarray = field(default_factory=_no_origins)

    def __post_init__(self) -> None:
        count = len(self.images)
        origins = np.asarray(self.origins, dtype=str)
        if origins.size == 0 and count > 0:
            origins = default_origins(self.source, count)
        if origins.shape != (count,):
            raise ValueError(
                f"{self.source}: {count} images but origins of shape {origins.shape}; pass one "
                "origin (file path or source and index) per image, or none."
            )
        object.__setattr__(self, "origins", origins)

    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray,
        labels: np.ndarray,
        source: str,
        origins: Sequence[str] | np.ndarray | None = None,
    ) -> ImageSet:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        labels = np.asarray(labels, dtype=np.int64)
        check_arrays(images, labels, where=source)
        return cls(
            images=images,
            labels=labels,
            ids=content_ids(images),
            source=source,
            origins=_no_origins() if origins is None else np.asarray(origins, dtype=str),
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def is_labelled(self) -> bool:
        return bool(len(self) == 0 or (self.labels >= 0).all())

    def subset(self, index: np.ndarray) -> ImageSet:
        return ImageSet(
            self.images[index],
            self.labels[index],
            self.ids[index],
            self.source,
            self.origins[index],
        )

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels[self.labels >= 0], minlength=len(CLASSES))
        return {name: int(counts[i]) for i, name in enumerate(CLASSES)}

    def fingerprint(self) -> str:
        """A content hash of the whole set (images, labels, ids, source, origins and order): its
        data version, equal to what cifar_assets.storage stores it under."""
        return digest_arrays(imageset_arrays(self))


def check_arrays(images: np.ndarray, labels: np.ndarray, where: str) -> None:
    """Raise a ValueError naming the problem if arrays are not in the canonical form."""
    if images.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8, got {images.dtype}.")
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(
            f"{where}: images must have shape (N, 32, 32, 3), got {images.shape}. "
            "Resize to 32x32 RGB before building an ImageSet."
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{where}: labels must have shape ({images.shape[0]},) to match the images, "
            f"got {labels.shape}."
        )


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write arrays atomically: a failed write never leaves a half-written file in place."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:  # a file object: np.savez adds no ".npz" to "x.NPZ"
            np.savez(handle, **dict(arrays))

    replace_atomic(path, write)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def digest_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over every array's name, dtype, shape and bytes in name order (32 hex digits)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:32]


def _arrays_of(imageset: ImageSet, prefix: str = "") -> dict[str, np.ndarray]:
    return {
        f"{prefix}images": imageset.images,
        f"{prefix}labels": imageset.labels,
        f"{prefix}ids": imageset.ids,
        f"{prefix}source": np.asarray(imageset.source),
        f"{prefix}origins": imageset.origins,
    }


def _imageset_of(arrays: Mapping[str, np.ndarray], prefix: str = "") -> ImageSet:
    # files written before origins existed name their images by source and index
    origins = arrays.get(f"{prefix}origins", _no_origins())
    return ImageSet(
        arrays[f"{prefix}images"],
        arrays[f"{prefix}labels"],
        arrays[f"{prefix}ids"],
        str(arrays[f"{prefix}source"]),
        origins,
    )


def imageset_arrays(imageset: ImageSet) -> dict[str, np.ndarray]:
    return _arrays_of(imageset)


def imageset_from_arrays(arrays: Mapping[str, np.ndarray]) -> ImageSet:
    return _imageset_of(arrays)


@dataclass(frozen=True, eq=False)
class Splits:
    """Stratified train / validation / test image sets."""

    train: ImageSet
    validation: ImageSet
    test: ImageSet

    def items(self) -> list[tuple[str, ImageSet]]:
        return [("train", self.train), ("validation", self.validation), ("test", self.test)]

    def fingerprint(self) -> str:
        """The content hash of all three splits: their data version."""
        return digest_arrays(splits_arrays(self))


def splits_arrays(splits: Splits) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for name, part in splits.items():
        arrays |= _arrays_of(part, f"{name}_")
    return arrays


def splits_from_arrays(arrays: Mapping[str, np.ndarray]) -> Splits:
    return Splits(**{name: _imageset_of(arrays, f"{name}_") for name in SPLITS})


def save_splits(path: Path, splits: Splits) -> None:
    save_npz(path, splits_arrays(splits))


def load_splits(path: Path) -> Splits:
    return splits_from_arrays(load_npz(path))


@dataclass(frozen=True, eq=False)
class RawData:
    """What a source delivers: a pool of images, plus the official test set where one exists
    (CIFAR-10's), which then stays the test split."""

    pool: ImageSet
    official_test: ImageSet | None = None

    def fingerprint(self) -> str:
        """The content hash of the pool and the official test set: their data version."""
        return digest_arrays(raw_arrays(self))


def raw_arrays(raw: RawData) -> dict[str, np.ndarray]:
    arrays = _arrays_of(raw.pool, "pool_")
    if raw.official_test is not None:
        arrays |= _arrays_of(raw.official_test, "test_")
    return arrays


def raw_from_arrays(arrays: Mapping[str, np.ndarray]) -> RawData:
    test = _imageset_of(arrays, "test_") if "test_images" in arrays else None
    return RawData(_imageset_of(arrays, "pool_"), test)
