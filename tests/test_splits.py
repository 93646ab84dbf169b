"""Stratified splits: sizes, per-class proportions, disjointness, determinism and bad arguments."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cifar_assets.data.errors import DataSourceError
from cifar_assets.data.imageset import (
    CLASSES,
    ImageSet,
    load_npz,
    load_splits,
    save_npz,
    save_splits,
)
from cifar_assets.data.splits import (
    class_sizes,
    split_with_official_test,
    stratified_split,
    too_small_classes,
    too_small_message,
)

# Deliberately uneven, with a class of one image, one of three and one absent.
UNEVEN_COUNTS = (50, 33, 7, 3, 1, 120, 0, 17, 9, 60)


def random_set(counts: tuple[int, ...], seed: int = 0, source: str = "test") -> ImageSet:
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(CLASSES)), counts))
    images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    return ImageSet.from_arrays(images, labels, source=source)


def test_balanced_split_has_exact_sizes_per_class() -> None:
    imageset = random_set((100,) * 10)
    splits = stratified_split(imageset, validation_fraction=0.1, test_fraction=0.2, seed=0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (700, 100, 200)
    assert set(splits.train.class_counts().values()) == {70}
    assert set(splits.validation.class_counts().values()) == {10}
    assert set(splits.test.class_counts().values()) == {20}


def test_uneven_classes_are_stratified_within_one_image() -> None:
    imageset = random_set(UNEVEN_COUNTS)
    splits = stratified_split(imageset, validation_fraction=0.15, test_fraction=0.25, seed=3)
    for label, name in enumerate(CLASSES):
        total = UNEVEN_COUNTS[label]
        validation = splits.validation.class_counts()[name]
        test = splits.test.class_counts()[name]
        train = splits.train.class_counts()[name]
        assert train + validation + test == total, name
        assert abs(validation - total * 0.15) <= 1, (name, validation)
        assert abs(test - total * 0.25) <= 1, (name, test)
        if total >= 3:
            assert min(train, validation, test) >= 1, name
    # The single deer stays in training, where it is at least seen.
    assert splits.train.class_counts()["deer"] == 1


def test_splits_are_disjoint_and_cover_every_image_in_original_order() -> None:
    imageset = random_set(UNEVEN_COUNTS)
    splits = stratified_split(imageset, 0.1, 0.1, seed=1)
    parts = [set(part.ids.tolist()) for _, part in splits.items()]
    assert parts[0].isdisjoint(parts[1])
    assert parts[0].isdisjoint(parts[2])
    assert parts[1].isdisjoint(parts[2])
    assert set().union(*parts) == set(imageset.ids.tolist())
    position = {image_id: i for i, image_id in enumerate(imageset.ids.tolist())}
    for _, part in splits.items():
        order = [position[image_id] for image_id in part.ids.tolist()]
        assert order == sorted(order)
        np.testing.assert_array_equal(part.images, imageset.images[order])
        np.testing.assert_array_equal(part.labels, imageset.labels[order])


def test_same_seed_same_split_and_other_seed_another() -> None:
    imageset = random_set((40,) * 10)
    first = stratified_split(imageset, 0.2, 0.2, seed=7)
    again = stratified_split(imageset, 0.2, 0.2, seed=7)
    other = stratified_split(imageset, 0.2, 0.2, seed=8)
    assert first.fingerprint() == again.fingerprint()
    np.testing.assert_array_equal(first.test.ids, again.test.ids)
    assert set(first.test.ids.tolist()) != set(other.test.ids.tolist())


def test_identical_images_land_in_the_same_split() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    # Every fourth image appears three times; content ids give the copies -1 and -2 suffixes.
    base_labels = np.arange(200) % 10
    images = np.concatenate([base, base[::4], base[::4]])
    labels = np.concatenate([base_labels, base_labels[::4], base_labels[::4]])
    imageset = ImageSet.from_arrays(images, labels, source="duplicates")
    assert sum("-" in image_id for image_id in imageset.ids.tolist()) == 100
    splits = stratified_split(imageset, 0.2, 0.2, seed=0)
    split_of = {}
    for name, part in splits.items():
        for image_id in part.ids.tolist():
            split_of[image_id] = name
    for image_id, name in split_of.items():
        assert split_of[image_id.split("-")[0]] == name, image_id


def test_official_test_set_stays_the_test_split() -> None:
    train = random_set((50,) * 10, seed=1, source="train")
    test = random_set((10,) * 10, seed=2, source="official-test")
    splits = split_with_official_test(train, test, validation_fraction=0.2, seed=0)
    assert splits.test is test
    assert len(splits.validation) == 100
    assert set(splits.validation.class_counts().values()) == {10}
    assert len(splits.train) == 400
    carved = set(splits.train.ids.tolist()) | set(splits.validation.ids.tolist())
    assert carved == set(train.ids.tolist())


@pytest.mark.parametrize(
    ("validation", "test", "needle"),
    [
        (-0.1, 0.1, "validation_fraction=-0.1 is outside [0, 1)"),
        (0.1, 1.0, "test_fraction=1.0 is outside [0, 1)"),
        (math.nan, 0.1, "validation_fraction=nan is not a number"),
        ("0.1", 0.1, "validation_fraction='0.1' is not a number"),
        (True, 0.1, "validation_fraction=True is not a number"),
        (0.6, 0.4, "leaves nothing to train on"),
    ],
)
def test_bad_fractions_are_rejected_with_the_reason(
    validation: object, test: object, needle: str
) -> None:
    imageset = random_set((10,) * 10)
    with pytest.raises(DataSourceError) as caught:
        stratified_split(imageset, validation, test, seed=0)  # type: ignore[arg-type]
    assert needle in str(caught.value)


def test_unlabelled_or_empty_sets_cannot_be_split() -> None:
    imageset = random_set((5,) * 10)
    unlabelled = ImageSet(imageset.images, np.full(len(imageset), -1), imageset.ids, "batch-7")
    with pytest.raises(DataSourceError) as caught:
        stratified_split(unlabelled, 0.1, 0.1, seed=0)
    assert "50 image(s) of batch-7 have no class label" in str(caught.value)
    assert "(first: batch-7 index 0, batch-7 index 1, batch-7 index 2," in str(caught.value)
    empty = imageset.subset(np.arange(0))
    with pytest.raises(DataSourceError, match="is empty"):
        stratified_split(empty, 0.1, 0.1, seed=0)


def test_origins_follow_their_images_through_splits_and_storage(tmp_path: Path) -> None:
    imageset = random_set(UNEVEN_COUNTS, source="synthetic")
    assert imageset.origins[:2].tolist() == ["synthetic index 0", "synthetic index 1"]
    splits = stratified_split(imageset, 0.1, 0.1, seed=1)
    origin_of = dict(zip(imageset.ids.tolist(), imageset.origins.tolist(), strict=True))
    for _, part in splits.items():
        assert part.origins.tolist() == [origin_of[i] for i in part.ids.tolist()]

    save_splits(tmp_path / "splits.npz", splits)
    loaded = load_splits(tmp_path / "splits.npz")
    for (_, part), (_, again) in zip(splits.items(), loaded.items(), strict=True):
        assert again.origins.tolist() == part.origins.tolist()
    # a file written before origins existed still loads, naming images by source and index
    arrays = {k: v for k, v in load_npz(tmp_path / "splits.npz").items() if "origins" not in k}
    save_npz(tmp_path / "old.npz", arrays)
    old = load_splits(tmp_path / "old.npz")
    assert old.test.origins[:1].tolist() == ["synthetic index 0"]
    with pytest.raises(ValueError, match="3 images but origins of shape"):
        ImageSet(imageset.images[:3], imageset.labels[:3], imageset.ids[:3], "x", np.array(["a"]))


def test_too_small_classes_name_each_split_size() -> None:
    splits = stratified_split(random_set(UNEVEN_COUNTS), 0.15, 0.25, seed=3)
    sizes = {size.name: size for size in class_sizes(splits)}
    assert "frog" not in sizes  # absent from the data: nothing to split
    assert sizes["deer"].describe() == "deer: 1 image(s) (train 1, validation 0, test 0)"
    assert sizes["cat"].describe() == "cat: 3 image(s) (train 1, validation 1, test 1)"
    small = [size.name for size in too_small_classes(splits)]
    # fewer than 5 in validation (15%) or test (25%): automobile (33) just reaches 5 and 8
    assert small == ["bird", "cat", "deer", "horse", "ship"]
    assert sizes["automobile"].validation == 5
    message = too_small_message(splits)
    assert message.startswith("5 class(es) too small to split")
    assert "horse: 17 image(s) (train 10, validation 3, test 4)" in message
    big = stratified_split(random_set((60,) * 10), 0.1, 0.1, seed=0)
    assert too_small_classes(big) == [] and too_small_message(big) == ""
