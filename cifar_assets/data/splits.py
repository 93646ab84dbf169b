"""Stratified train / validation / test splits, deterministic for a seed.

Each class is split on its own, so every split keeps the class proportions of the whole (each
class's share is within one image of exact). Identical images (ids that differ only in their
``-1``, ``-2`` duplicate suffix) always land in the same split, so no picture is both trained on
and tested on. Each split keeps the images in their original order.
"""

from __future__ import annotations

import math

import numpy as np

from cifar_assets.data.errors import DataSourceError
from cifar_assets.data.imageset import CLASSES, ImageSet, Splits


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
        first = imageset.ids[np.flatnonzero(bad)[:5]].tolist()
        raise DataSourceError(
            f"{where}: {int(bad.sum())} image(s) of {imageset.source} have no class label in "
            f"0..{len(CLASSES) - 1} (first ids: {first}); only labelled sets can be split. "
            "Label them, or drop the unlabelled images first."
        )
