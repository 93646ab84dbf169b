"""Stratified train / validation / test splits, deterministic for a seed.

Each class is split on its own, so every split keeps the class proportions of the whole (each
class's share is within one image of exact). Identical images (ids that differ only in their
``-1``, ``-2`` duplicate suffix) always land in the same split, so no picture is both trained on
and tested on. Each split keeps the images in their original order.

A class can be too small to split usefully; :func:`too_small_classes` names such classes with the
size each split got, for the splits asset's log and the class-balance check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cifar_assets.data.errors import DataSourceError
from cifar_assets.data.imageset import CLASSES, ImageSet, Splits

# Below five images, one image moves a class's validation or test accuracy by more than 20 points.
MIN_HELD_OUT_PER_CLASS = 5


def stratified_split(
    imageset: ImageSet, validation_fraction: float, test_fraction: float, seed: int
) -> Splits:
    """Split ``imageset`` per class into train, validation and test by the given fractions.

    A class with at least three images gets at least one image in every split whose fraction is
    above zero; the training split always keeps at least one image of each class present.
    """
    _check_fraction("validation_fraction", validation_fraction)
    _check_fraction("test_fraction", test_fraction)
    if validation_fraction + test_fraction >= 1.0:
        raise DataSourceError(
            f"validation_fraction={validation_fraction} + test_fraction={test_fraction} leaves "
            "nothing to train on; their sum must be below 1 (e.g. 0.1 and 0.1)."
        )
    _check_labelled(imageset, "stratified_split")
    rng = np.random.default_rng(seed)
    groups = np.char.partition(imageset.ids.astype(str), "-")[:, 0]
    assignment = np.zeros(len(imageset), dtype=np.int8)  # 0 train, 1 validation, 2 test
    for label in range(len(CLASSES)):
        members = np.flatnonzero(imageset.labels == label)
        if members.size == 0:
            continue
        n_validation, n_test = _split_sizes(members.size, validation_fraction, test_fraction)
        # Shuffle whole groups of identical images, then cut the shuffled sequence by size.
        unique, group_of = np.unique(groups[members], return_inverse=True)
        group_at = rng.permutation(unique.size)
        position = np.argsort(group_at)
        order = np.argsort(position[group_of], kind="stable")
        sizes = np.bincount(group_of, minlength=unique.size)[group_at]
        before = np.repeat(np.cumsum(sizes) - sizes, sizes)
        shuffled = members[order]
        assignment[shuffled[before < n_test]] = 2
        assignment[shuffled[(before >= n_test) & (before < n_test + n_validation)]] = 1
    return Splits(
        train=imageset.subset(np.flatnonzero(assignment == 0)),
        validation=imageset.subset(np.flatnonzero(assignment == 1)),
        test=imageset.subset(np.flatnonzero(assignment == 2)),
    )


def split_with_official_test(
    train: ImageSet, test: ImageSet, validation_fraction: float, seed: int
) -> Splits:
    """Keep the official test set as the test split; carve a stratified validation out of train."""
    _check_labelled(test, "split_with_official_test (test set)")
    carved = stratified_split(train, validation_fraction, 0.0, seed)
    return Splits(train=carved.train, validation=carved.validation, test=test)


@dataclass(frozen=True)
class ClassSizes:
    """How many images of one class the data holds and each split got."""

    name: str
    total: int
    train: int
    validation: int
    test: int

    def describe(self) -> str:
        return (
            f"{self.name}: {self.total} image(s) (train {self.train}, "
            f"validation {self.validation}, test {self.test})"
        )


def class_sizes(splits: Splits) -> list[ClassSizes]:
    """Per class present in any split, its total and what each split holds, in class order."""
    counts = {name: part.class_counts() for name, part in splits.items()}
    sizes = []
    for name in CLASSES:
        train, validation, test = (counts[split][name] for split in ("train", "validation", "test"))
        if train + validation + test:
            sizes.append(ClassSizes(name, train + validation + test, train, validation, test))
    return sizes


def too_small_classes(
    splits: Splits, min_held_out: int = MIN_HELD_OUT_PER_CLASS
) -> list[ClassSizes]:
    """Classes present in the data with no training image, or fewer than ``min_held_out`` images
    in validation or in test: their scores there rest on too few images to mean much."""
    return [
        size
        for size in class_sizes(splits)
        if size.train == 0 or min(size.validation, size.test) < min_held_out
    ]


def too_small_message(splits: Splits, min_held_out: int = MIN_HELD_OUT_PER_CLASS) -> str:
    """One sentence naming every too-small class with its sizes and what to do; "" when none."""
    small = too_small_classes(splits, min_held_out)
    if not small:
        return ""
    total = sum(len(part) for _, part in splits.items())
    shares = (len(splits.validation) / total, len(splits.test) / total)
    if min(shares) > 0:
        advice = (
            f"Add images of these classes: about {math.ceil(min_held_out / min(shares))} each "
            f"give validation and test {min_held_out} of each at the current shares "
            f"({shares[0]:.0%} and {shares[1]:.0%})"
        )
    else:
        advice = (
            "Validation or test holds no image at all: set validation_fraction and "
            "test_fraction above 0 and give every class at least 3 images"
        )
    return (
        f"{len(small)} class(es) too small to split (fewer than {min_held_out} images in "
        f"validation or test, or none in train): {'; '.join(s.describe() for s in small)}. "
        f"{advice}; until then their validation and test scores rest on a handful of images."
    )


def _split_sizes(count: int, validation_fraction: float, test_fraction: float) -> tuple[int, int]:
    n_validation = math.floor(count * validation_fraction + 0.5)
    n_test = math.floor(count * test_fraction + 0.5)
    if count >= 3:
        n_validation = max(n_validation, 1 if validation_fraction > 0 else 0)
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
    # Rounding up both held-out parts of a tiny class must not empty its training part.
    while n_validation + n_test > count - 1 and n_validation + n_test > 0:
        if n_validation >= n_test:
            n_validation -= 1
        else:
            n_test -= 1
    return n_validation, n_test


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataSourceError(f"{name}={value!r} is not a number; pass a share such as 0.1.")
    if not 0.0 <= value < 1.0:
        raise DataSourceError(
            f"{name}={value} is outside [0, 1); pass the share of each class to hold out, "
            "such as 0.1 for ten per cent."
        )


def _check_labelled(imageset: ImageSet, where: str) -> None:
    if len(imageset) == 0:
        raise DataSourceError(f"{where}: the image set from {imageset.source} is empty.")
    bad = (imageset.labels < 0) | (imageset.labels >= len(CLASSES))
    if bad.any():
        first = ", ".join(imageset.origins[np.flatnonzero(bad)[:5]].tolist())
        raise DataSourceError(
            f"{where}: {int(bad.sum())} image(s) of {imageset.source} have no class label in "
            f"0..{len(CLASSES) - 1} (first: {first}); only labelled sets can be split. "
            "Label them, or drop the unlabelled images first."
        )
