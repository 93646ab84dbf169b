"""Per-image statistics, the pHash near-duplicate search and the four validation checks.

Each planted defect must be caught and named by image id; a clean set must pass every check.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.fft
import scipy.ndimage

from cifar_assets.data.imageset import CLASSES, ImageSet, Splits, content_hash, content_ids
from cifar_assets.data.statistics import (
    STATISTICS_COLUMNS,
    hamming_distances,
    hashes_to_hex,
    hex_to_hashes,
    image_statistics,
    near_duplicates,
    perceptual_hashes,
)
from cifar_assets.data.validation import (
    MAX_FAILURE_ROWS,
    CheckOutcome,
    check_class_balance,
    check_integrity,
    check_leakage,
    check_schema,
)


def smooth_images(n: int, seed: int) -> np.ndarray:
    """Random 6x6 colour fields upsampled to 32x32 plus mild noise, kept within 10..245 so a
    +-2 brightness shift never clips: natural-looking structure, distinct perceptual hashes."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(10, 245, size=(n, 6, 6, 3))
    fine = scipy.ndimage.zoom(coarse, (1, 32 / 6, 32 / 6, 1), order=1)
    fine += rng.normal(0, 3, size=fine.shape)
    return np.clip(np.round(fine), 10, 245).astype(np.uint8)


def make_set(images: np.ndarray, labels: np.ndarray | None = None, name: str = "test") -> ImageSet:
    if labels is None:
        labels = np.arange(len(images)) % len(CLASSES)
    return ImageSet(images, np.asarray(labels, dtype=np.int64), content_ids(images), name)


def make_splits(
    train: np.ndarray | None = None,
    validation: np.ndarray | None = None,
    test: np.ndarray | None = None,
    train_labels: np.ndarray | None = None,
) -> Splits:
    return Splits(
        make_set(smooth_images(200, 1) if train is None else train, train_labels, "fixture-a"),
        make_set(smooth_images(60, 2) if validation is None else validation, name="fixture-b"),
        make_set(smooth_images(60, 3) if test is None else test, name="fixture-c"),
    )


def reference_phash(image: np.ndarray) -> int:
    """Textbook pHash with scipy's DCT, as an independent check of the vectorised one."""
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    low = scipy.fft.dctn(luma, type=2, norm="ortho")[:8, :8].ravel()
    bits = np.round(low, 6) > np.median(np.round(low, 6))
    return int("".join("1" if bit else "0" for bit in bits), 2)


def test_statistics_match_direct_computation() -> None:
    splits = make_splits()
    images = splits.train.images.copy()
    images[4] = (17, 99, 200)
    splits = make_splits(train=images)
    stats = image_statistics(splits)

    assert list(stats.columns) == list(STATISTICS_COLUMNS)
    assert len(stats) == 320
    assert stats["split"].value_counts().to_dict() == {"train": 200, "validation": 60, "test": 60}
    train = stats[stats["split"] == "train"].reset_index(drop=True)
    pixels = images.astype(np.float64)
    np.testing.assert_allclose(train[["mean_r", "mean_g", "mean_b"]], pixels.mean(axis=(1, 2)))
    np.testing.assert_allclose(
        train[["std_r", "std_g", "std_b"]], pixels.std(axis=(1, 2)), atol=1e-9
    )
    luma = pixels @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(train["brightness"], luma.mean(axis=(1, 2)))
    np.testing.assert_allclose(train["contrast"], luma.std(axis=(1, 2)), atol=1e-9)
    assert train["min"].tolist() == images.reshape(200, -1).min(axis=1).tolist()
    assert train["max"].tolist() == images.reshape(200, -1).max(axis=1).tolist()
    assert train.index[train["is_constant"]].tolist() == [4]
    assert train.loc[4, ["std_r", "std_g", "std_b", "contrast"]].tolist() == [0.0] * 4
    assert train["content_hash"].tolist() == [content_hash(image) for image in images]
    assert train["id"].tolist() == splits.train.ids.tolist()
    assert train["label"].tolist() == splits.train.labels.tolist()
    expected = [f"{reference_phash(image):016x}" for image in images]
    assert train["phash"].tolist() == expected
    assert hex_to_hashes(train["phash"]).tolist() == [int(h, 16) for h in expected]


def test_phash_survives_brightness_and_noise_but_separates_images() -> None:
    images = smooth_images(50, 7)
    rng = np.random.default_rng(0)
    brighter = images + np.uint8(2)
    noisy = np.clip(images + rng.normal(0, 1.0, images.shape), 0, 255).astype(np.uint8)
    base = perceptual_hashes(images)
    assert hamming_distances(base, perceptual_hashes(brighter)).diagonal().max() <= 2
    assert hamming_distances(base, perceptual_hashes(noisy)).diagonal().max() <= 4
    between = hamming_distances(base, base)[~np.eye(50, dtype=bool)]
    assert between.min() > 10
    flat = np.full((2, 32, 32, 3), 128, dtype=np.uint8)
    flat[1] = (3, 60, 250)
    assert hashes_to_hex(perceptual_hashes(flat)) == ["8000000000000000"] * 2


def test_near_duplicate_search_equals_brute_force() -> None:
    rng = np.random.default_rng(3)
    reference = rng.integers(0, 2**63, size=3000, dtype=np.int64).astype(np.uint64)
    reference[:50] = reference[0]  # a crowded bucket: ties must go to the lowest index
    query = rng.integers(0, 2**63, size=400, dtype=np.int64).astype(np.uint64)
    # plant queries 0..8 bits away from known references
    for distance in range(10):
        for offset in range(5):
            row = 10 * distance + offset
            bits = rng.choice(64, size=distance, replace=False)
            flip = np.uint64(sum(1 << int(bit) for bit in bits))
            query[row] = reference[100 + row] ^ flip
    query[200] = reference[7]  # matches all 50 copies at distance 0
    brute = hamming_distances(query, reference)
    for max_distance in range(9):
        found = near_duplicates(query, reference, max_distance)
        expected_rows = np.flatnonzero(brute.min(axis=1) <= max_distance)
        assert found.query_index.tolist() == expected_rows.tolist()
        assert found.distance.tolist() == brute.min(axis=1)[expected_rows].tolist()
        assert found.reference_index.tolist() == brute.argmin(axis=1)[expected_rows].tolist()
    closest = near_duplicates(query, reference, 4)
    assert dict(zip(closest.query_index, closest.reference_index, strict=True))[200] == 0
    assert closest.query_index.size >= 26

    keys = np.array([f"q{i}" for i in range(400)] + [f"r{i}" for i in range(3000)])
    keys[:1] = "same"
    keys[400 + 100] = "same"  # query 0 equals reference 100 exactly: skip that pair
    excluded = near_duplicates(query, reference, 4, exclude_equal=keys)
    assert 0 not in excluded.query_index.tolist()
    with pytest.raises(ValueError, match=r"max_distance must be in 0\.\.8"):
        near_duplicates(query, reference, 9)


def test_clean_splits_pass_all_four_checks() -> None:
    splits = make_splits()
    stats = image_statistics(splits)
    outcomes = {
        "schema": check_schema(stats),
        "integrity": check_integrity(splits),
        "balance": check_class_balance(splits),
        "leakage": check_leakage(stats),
    }
    for name, outcome in outcomes.items():
        assert outcome.passed, (name, outcome.description)
        assert outcome.failures.empty, name
        assert all(type(v) in (int, float, str, bool) for v in outcome.summary.values()), name
    assert outcomes["integrity"].summary["images"] == 320
    assert outcomes["balance"].summary["max_relative_deviation"] == 0.0
    assert outcomes["leakage"].summary["exact_duplicate_pairs"] == 0
    assert outcomes["leakage"].summary["near_duplicate_images"] == 0


def test_integrity_names_out_of_range_labels_and_constant_images() -> None:
    images = smooth_images(200, 1)
    images[17] = 0
    images[123] = (250, 10, 10)
    labels = np.arange(200) % 10
    labels[[5, 42]] = [10, -3]
    splits = make_splits(train=images, train_labels=labels)
    outcome = check_integrity(splits)

    assert not outcome.passed
    ids = splits.train.ids
    failures = outcome.failures
    bad_labels = failures[failures["problem"] == "labels_out_of_range"]
    assert bad_labels["id"].tolist() == [ids[5], ids[42]]
    assert bad_labels["value"].tolist() == ["10", "-3"]
    assert set(bad_labels["split"]) == {"train"}
    constant = failures[failures["problem"] == "constant_images"]
    assert constant["id"].tolist() == [ids[17], ids[123]]
    assert constant["value"].tolist() == ["[0, 0, 0]", "[250, 10, 10]"]
    assert outcome.summary["labels_out_of_range"] == 2
    assert outcome.summary["constant_images"] == 2
    assert constant["origin"].tolist() == ["fixture-a index 17", "fixture-a index 123"]
    assert "fixture-a index 5, fixture-a index 42): put each image in the folder of its class" in (
        outcome.description
    )
    assert "2 single-colour image(s) (fixture-a index 17, fixture-a index 123)" in (
        outcome.description
    )
    assert ids[5] not in outcome.description  # content ids mean nothing to a person
    assert outcome.severity == "error"

    schema = check_schema(image_statistics(splits))
    assert not schema.passed
    label_rows = schema.failures[schema.failures["column"] == "label"]
    assert sorted(label_rows["id"]) == sorted([ids[5], ids[42]])


def test_integrity_failure_table_is_capped_without_hiding_a_kind() -> None:
    images = smooth_images(200, 1)
    images[:120] = 5
    labels = np.arange(200) % 10
    labels[150] = 11
    splits = make_splits(train=images, train_labels=labels)
    outcome = check_integrity(splits)

    assert outcome.summary["constant_images"] == 120
    assert len(outcome.failures) == MAX_FAILURE_ROWS
    bad_label = outcome.failures[outcome.failures["problem"] == "labels_out_of_range"]
    assert bad_label["id"].tolist() == [splits.train.ids[150]]
    assert "120 single-colour image(s)" in outcome.description
    assert "and 115 more" in outcome.description


def test_integrity_rejects_wrong_dtype_shape_and_duplicate_ids() -> None:
    clean = make_splits()
    floats = clean.validation.images.astype(np.float32)
    floats[3, 0, 0, 0] = 300.0
    ids = clean.test.ids.copy()
    ids[7] = ids[8]
    splits = Splits(
        ImageSet(clean.train.images[:, :16], clean.train.labels, clean.train.ids, "t"),
        ImageSet(floats, clean.validation.labels, clean.validation.ids, "v"),
        ImageSet(clean.test.images, clean.test.labels, ids, "t"),
    )
    outcome = check_integrity(splits)

    assert not outcome.passed
    rows = {problem: group for problem, group in outcome.failures.groupby("problem")}
    assert rows["bad_shape"]["split"].tolist() == ["train"]
    assert "(200, 16, 32, 3)" in rows["bad_shape"]["value"].iloc[0]
    assert rows["bad_dtype"]["split"].tolist() == ["validation"]
    assert rows["values_out_of_range"]["id"].tolist() == [clean.validation.ids[3]]
    assert rows["duplicate_ids"]["id"].tolist() == [ids[8]]
    assert rows["duplicate_ids"]["split"].tolist() == ["test"]


def test_class_balance_lists_the_unbalanced_classes() -> None:
    labels = np.concatenate([np.zeros(60), np.arange(140) % 9 + 1]).astype(np.int64)
    splits = make_splits(train_labels=labels)
    outcome = check_class_balance(splits, tolerance=0.2)

    assert not outcome.passed
    failures = outcome.failures
    assert set(failures["split"]) == {"train"}
    airplane = failures[failures["class"] == "airplane"].iloc[0]
    assert (airplane["count"], airplane["expected"]) == (60, 20.0)
    assert (airplane["lower"], airplane["upper"]) == (16.0, 24.0)
    # the other nine classes hold 15 or 16 images each, below the lower bound of 16 only at 15
    assert sorted(failures.loc[failures["count"] == 15, "class"]) == sorted(
        CLASSES[label] for label in range(1, 10) if np.sum(labels == label) == 15
    )
    assert outcome.summary["train_max_class_count"] == 60
    assert outcome.summary["max_relative_deviation"] == 2.0
    assert "train/airplane=60" in outcome.description
    with pytest.raises(ValueError, match="tolerance"):
        check_class_balance(splits, tolerance=1.5)


def test_leakage_finds_an_exact_duplicate_across_splits() -> None:
    train = smooth_images(200, 1)
    test = smooth_images(60, 3)
    test[5] = train[3]
    splits = make_splits(train=train, test=test)
    outcome = check_leakage(image_statistics(splits))

    assert not outcome.passed
    assert outcome.summary["exact_duplicate_pairs"] == 1
    assert outcome.summary["near_duplicate_images"] == 0
    row = outcome.failures.iloc[0]
    assert (row["kind"], row["split_a"], row["split_b"]) == ("exact", "train", "test")
    assert row["id_a"] == splits.train.ids[3] == row["id_b"] == splits.test.ids[5]
    assert len(outcome.failures) == 1
    assert (row["origin_a"], row["origin_b"]) == ("fixture-a index 3", "fixture-c index 5")
    assert "(e.g. fixture-a index 3 (train) = fixture-c index 5 (test))" in outcome.description


@pytest.mark.parametrize("change", ["brighter", "noise"])
def test_leakage_finds_a_near_duplicate_across_splits(change: str) -> None:
    train = smooth_images(200, 1)
    validation = smooth_images(60, 2)
    if change == "brighter":
        validation[9] = train[11] + np.uint8(2)
    else:
        noise = np.random.default_rng(5).normal(0, 1.0, train[11].shape)
        validation[9] = np.clip(train[11] + noise, 0, 255).astype(np.uint8)
    splits = make_splits(train=train, validation=validation)
    outcome = check_leakage(image_statistics(splits), near_duplicate_max_distance=4)

    assert not outcome.passed
    assert outcome.summary["exact_duplicate_pairs"] == 0
    assert outcome.summary["near_duplicate_images"] == 1
    row = outcome.failures.iloc[0]
    assert (row["kind"], row["split_a"], row["id_a"]) == ("near", "train", splits.train.ids[11])
    assert (row["split_b"], row["id_b"]) == ("validation", splits.validation.ids[9])
    assert row["phash_distance"] <= 4
    assert check_leakage(image_statistics(splits), near_duplicate_max_distance=0).passed == (
        row["phash_distance"] > 0
    )


def test_leakage_failure_table_is_capped_and_shows_both_kinds() -> None:
    train = smooth_images(200, 1)
    test = train[:60].copy()  # 60 exact duplicates
    validation = np.clip(train[100:160].astype(np.int16) + 2, 0, 255).astype(np.uint8)
    splits = make_splits(train=train, validation=validation, test=test)
    outcome = check_leakage(image_statistics(splits))

    assert outcome.summary["exact_duplicate_pairs"] == 60
    # validation[i] is near train[100 + i]; test holds train[:60], none of them near validation
    assert outcome.summary["near_duplicate_images"] == 60
    assert len(outcome.failures) == MAX_FAILURE_ROWS
    assert outcome.failures["kind"].value_counts().to_dict() == {"exact": 25, "near": 25}
    near = outcome.failures[outcome.failures["kind"] == "near"]
    position = {image_id: i for i, image_id in enumerate(splits.train.ids)}
    validation_position = {image_id: i for i, image_id in enumerate(splits.validation.ids)}
    assert all(
        position[a] == 100 + validation_position[b]
        for a, b in zip(near["id_a"], near["id_b"], strict=True)
    )


def test_schema_violations_point_at_the_offending_rows() -> None:
    splits = make_splits()
    stats = image_statistics(splits)
    bad = stats.copy()
    bad.loc[7, "mean_r"] = 300.0
    bad.loc[9, "phash"] = "not-a-hash"
    bad.loc[12, "split"] = "holdout"
    bad.loc[15, "is_constant"] = True  # its stds are not zero
    bad.loc[20, "id"] = bad.loc[21, "id"]
    outcome = check_schema(bad)

    assert not outcome.passed
    failures = outcome.failures
    by_column = {column: set(group["id"]) for column, group in failures.groupby("column")}
    assert by_column["mean_r"] == {stats.loc[7, "id"]}
    assert by_column["phash"] == {stats.loc[9, "id"]}
    assert by_column["split"] == {stats.loc[12, "id"]}
    assert by_column["id"] == {stats.loc[21, "id"]}
    constant_rule = failures[failures["check"] == "is_constant_iff_zero_std"]
    assert constant_rule["id"].tolist() == [stats.loc[15, "id"]]
    assert constant_rule["row"].tolist() == [15]
    # mean_r = 300 also breaks the rule that means lie between min and max
    assert failures.loc[
        failures["check"] == "means_and_brightness_within_min_max", "row"
    ].tolist() == [7]
    assert outcome.summary["rows_with_violations"] == 6
    assert outcome.summary["violated_rules"] == 6
    assert outcome.summary["violations"] == 7
    assert "field_uniqueness on id" in outcome.description


def test_schema_rejects_wrong_dtypes_and_extra_columns() -> None:
    stats = image_statistics(make_splits())
    bad = stats.assign(label=stats["label"].astype(float), note="x")
    outcome = check_schema(bad)

    assert not outcome.passed
    checks = set(outcome.failures["check"])
    assert "column_in_schema" in checks
    assert any("dtype('int64')" in check for check in checks)
    extra = outcome.failures[outcome.failures["check"] == "column_in_schema"]
    assert extra["failure_case"].tolist() == ["note"]
    assert extra["column"].tolist() == ["(table)"]
    assert extra["id"].isna().all()


def test_phash_hex_round_trip_and_malformed_hash() -> None:
    hashes = np.array([0, 1, 2**63, 2**64 - 1], dtype=np.uint64)
    text = hashes_to_hex(hashes)
    assert text == ["0000000000000000", "0000000000000001", "8000000000000000", "f" * 16]
    assert hex_to_hashes(text).tolist() == hashes.tolist()
    with pytest.raises(ValueError, match="'abc' is not 16 lowercase hex digits"):
        hex_to_hashes(["0" * 16, "abc"])


def test_near_duplicate_tolerance_accepts_a_known_share_but_never_exact_duplicates() -> None:
    train = smooth_images(200, 1)
    validation = smooth_images(60, 2)
    validation[9] = train[11] + np.uint8(2)
    stats = image_statistics(make_splits(train=train, validation=validation))
    assert not check_leakage(stats).passed
    tolerant = check_leakage(stats, max_near_duplicate_fraction=0.05)
    assert tolerant.passed and tolerant.summary["near_duplicate_images"] == 1
    # 1 of 120 validation+test images is above a 0.5% tolerance
    assert not check_leakage(stats, max_near_duplicate_fraction=0.005).passed

    test = smooth_images(60, 3)
    test[5] = train[3]
    exact = image_statistics(make_splits(train=train, test=test))
    assert not check_leakage(exact, max_near_duplicate_fraction=0.5).passed


def test_check_outcome_holds_builtin_scalars_only() -> None:
    """np.float64 passes isinstance(float), so type hints never caught it; Dagster then failed
    to serialize it. The outcome converts numpy scalars and refuses anything else."""
    outcome = CheckOutcome(
        np.bool_(False),
        {"deviation": np.float64(0.25), "count": np.int64(3), "name": np.str_("cat")},
        pd.DataFrame(),
        "x",
    )
    assert outcome.summary == {"deviation": 0.25, "count": 3, "name": "cat"}
    assert [type(v) for v in outcome.summary.values()] == [float, int, str]
    assert type(outcome.passed) is bool
    with pytest.raises(TypeError, match=r"\[1, 2\] is a list"):
        CheckOutcome(True, {"counts": [1, 2]}, pd.DataFrame(), "x")  # type: ignore[dict-item]


def test_near_duplicate_message_names_both_images_by_origin() -> None:
    train = smooth_images(200, 1)
    validation = smooth_images(60, 2)
    validation[9] = train[11] + np.uint8(2)
    outcome = check_leakage(image_statistics(make_splits(train=train, validation=validation)))
    row = outcome.failures.iloc[0]
    assert (row["origin_a"], row["origin_b"]) == ("fixture-a index 11", "fixture-b index 9")
    assert "(e.g. fixture-a index 11 (train) ~ fixture-b index 9 (validation))" in (
        outcome.description
    )
