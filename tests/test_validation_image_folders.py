"""Validation on real-shaped image folders: unequal classes, a tiny folder, mixed file formats,
duplicates inside one split and duplicates with conflicting labels.

Every message a person reads must name the file (its path), and every metadata value must be a
plain Python scalar that Dagster can store.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from cifar_assets.data.image_folder import load_image_folder
from cifar_assets.data.imageset import CLASSES, Splits, load_splits, save_splits
from cifar_assets.data.splits import stratified_split, too_small_classes
from cifar_assets.data.statistics import image_statistics
from cifar_assets.data.validation import (
    check_class_balance,
    check_integrity,
    check_leakage,
    check_schema,
)

UNEQUAL_COUNTS = (7, 3, 12, 7, 3, 12, 7, 3, 12, 7)  # 73 images
TINY_COUNTS = (5, 5, 2, 2, 2, 1, 1, 1, 1, 0)  # 20 images, one class absent
# (file suffix, Pillow mode, width, height): the kinds of files people keep
FORMATS = (
    (".png", "RGB", 32, 32),
    (".jpg", "RGB", 40, 30),
    (".png", "L", 32, 32),
    (".png", "RGBA", 48, 48),
    (".png", "RGB", 45, 37),
)


def picture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth random colour field with mild noise: photo-like, with a distinct pHash."""
    coarse = rng.uniform(10, 245, size=(6, 6, 3))
    fine = scipy.ndimage.zoom(coarse, (height / 6, width / 6, 1), order=1)
    fine += rng.normal(0, 3, size=fine.shape)
    return np.clip(np.round(fine), 0, 255).astype(np.uint8)


def write_picture(path: Path, pixels: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if mode == "L":
        image = image.convert("L")
    elif mode == "RGBA":
        alpha = np.full(pixels.shape[:2], 255, dtype=np.uint8)
        alpha[:4] = 0  # a transparent band, as cut-out pictures have
        image = Image.fromarray(np.dstack([pixels, alpha]), mode="RGBA")
    image.save(path, quality=95)


def build_folder(root: Path, counts: tuple[int, ...], seed: int = 0) -> dict[str, int]:
    """One subfolder per class holding ``counts[label]`` files, cycling through FORMATS;
    returns the absolute path of every file and its label."""
    rng = np.random.default_rng(seed)
    files = {}
    for label, count in enumerate(counts):
        for index in range(count):
            suffix, mode, width, height = FORMATS[index % len(FORMATS)]
            path = root / CLASSES[label] / f"{CLASSES[label]}_{index:02d}{suffix}"
            write_picture(path, picture(rng, width, height), mode)
            files[str(path.resolve())] = label
    return files


def split_folder(root: Path) -> Splits:
    imageset, report = load_image_folder(root)
    assert report.problems == []
    return stratified_split(imageset, validation_fraction=0.1, test_fraction=0.1, seed=0)


def assert_plain(summary: dict[str, object]) -> None:
    """Exact builtin types: np.float64 passes isinstance(float) but breaks Dagster's storage."""
    for key, value in summary.items():
        assert type(value) in (int, float, str, bool), (key, type(value))


def test_unequal_folder_is_checked_by_file_with_plain_values(tmp_path: Path) -> None:
    files = build_folder(tmp_path / "images", UNEQUAL_COUNTS)
    splits = split_folder(tmp_path / "images")

    # each image's origin is its file, and it survives the split and the .npz round trip
    save_splits(tmp_path / "splits.npz", splits)
    with np.load(tmp_path / "splits.npz", allow_pickle=False) as stored:
        assert stored["train_origins"].dtype.kind == "U"
    for (name, part), (_, loaded) in zip(
        splits.items(), load_splits(tmp_path / "splits.npz").items(), strict=True
    ):
        assert loaded.origins.tolist() == part.origins.tolist(), name
        for origin, label in zip(part.origins.tolist(), part.labels.tolist(), strict=True):
            assert files[origin] == label
    assert sorted(origin for _, part in splits.items() for origin in part.origins) == sorted(files)

    # 7 -> 5/1/1, 3 -> 1/1/1, 12 -> 10/1/1 (train/validation/test)
    balance = check_class_balance(splits, tolerance=0.2)
    assert not balance.passed and balance.severity == "error"
    assert_plain(balance.summary)
    assert balance.summary["unbalanced_classes"] == 6  # the 1s and the 10s of train
    assert (balance.summary["train_min_class_count"], balance.summary["train_max_class_count"]) == (
        1,
        10,
    )
    assert balance.summary["max_relative_deviation"] == round((10 - 5.3) / 5.3, 4)
    assert balance.summary["classes_too_small"] == 10
    assert "automobile: 3 image(s) (train 1, validation 1, test 1)" in balance.description
    assert "bird: 12 image(s) (train 10, validation 1, test 1)" in balance.description
    assert "about 37 each give validation and test 5 of each" in balance.description
    assert "train/automobile=1 (expected 5.3)" in balance.description
    assert f"remove some of the large ones in image_folder:{(tmp_path / 'images').resolve()}, " in (
        balance.description
    )

    # wide enough a tolerance: the counts pass, the tiny held-out classes stay a warning
    tolerant = check_class_balance(splits, tolerance=0.9)
    assert not tolerant.passed and tolerant.severity == "warning"
    assert tolerant.failures.empty
    assert tolerant.description.startswith("Class counts are within 90% of their split's mean")

    stats = image_statistics(splits)
    assert sorted(stats["origin"]) == sorted(files)
    for outcome in (check_schema(stats), check_integrity(splits), check_leakage(stats)):
        assert outcome.passed, outcome.description
        assert_plain(outcome.summary)


def test_tiny_folder_warns_with_each_class_size(tmp_path: Path) -> None:
    build_folder(tmp_path / "images", TINY_COUNTS)
    splits = split_folder(tmp_path / "images")

    assert [len(part) for _, part in splits.items()] == [16, 2, 2]
    sizes = {size.name: size for size in too_small_classes(splits)}
    assert sorted(sizes) == sorted(CLASSES[label] for label in range(9))  # truck has none
    assert (sizes["airplane"].train, sizes["airplane"].validation, sizes["airplane"].test) == (
        3,
        1,
        1,
    )
    assert (sizes["bird"].total, sizes["bird"].validation, sizes["bird"].test) == (2, 0, 0)

    balance = check_class_balance(splits)
    assert not balance.passed and balance.severity == "error"
    assert balance.description.startswith("9 class(es) too small to split")
    assert "airplane: 5 image(s) (train 3, validation 1, test 1)" in balance.description
    assert "bird: 2 image(s) (train 2, validation 0, test 0)" in balance.description
    assert "about 50 each" in balance.description  # 2 of 20 images in validation and in test
    assert balance.summary["too_small_class_sizes"].startswith(  # type: ignore[union-attr]
        "airplane: 5 image(s) (train 3, validation 1, test 1); automobile: 5 image(s)"
    )


def test_mixed_formats_load_and_are_named_by_file(tmp_path: Path) -> None:
    root = tmp_path / "images"
    build_folder(root, (5,) + (0,) * 9)  # airplane: PNG, JPEG, grey PNG, RGBA PNG, 45x37 PNG
    shutil.rmtree(root / "automobile", ignore_errors=True)
    imageset, report = load_image_folder(root, on_error="skip")

    folder = (root / "airplane").resolve()
    assert imageset.origins.tolist() == [
        str(folder / f"airplane_{index:02d}{FORMATS[index][0]}") for index in range(5)
    ]
    assert imageset.images.shape == (5, 32, 32, 3)
    assert report.converted_examples == [
        "airplane/airplane_02.png (L)",
        "airplane/airplane_03.png (RGBA)",
    ]
    assert report.resized_examples == [
        "airplane/airplane_01.jpg (40x30)",
        "airplane/airplane_03.png (48x48)",
        "airplane/airplane_04.png (45x37)",
    ]
    grey = imageset.images[2]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()

    splits = stratified_split(imageset, 0.2, 0.2, seed=0)
    stats = image_statistics(splits)
    assert sorted(stats["origin"]) == sorted(imageset.origins.tolist())
    assert check_schema(stats).passed
    assert check_integrity(splits).passed


def test_duplicate_inside_one_split_is_a_warning_naming_both_files(tmp_path: Path) -> None:
    root = tmp_path / "images"
    build_folder(root, (10,) * 10)
    original = root / "cat" / "cat_00.png"
    copy = root / "cat" / "cat_99.png"
    shutil.copy(original, copy)
    splits = split_folder(root)

    outcome = check_integrity(splits)
    assert not outcome.passed and outcome.severity == "warning"
    assert outcome.summary["duplicates_in_split"] == 1
    assert outcome.summary["conflicting_labels"] == 0
    (row,) = outcome.failures.itertuples(index=False)
    assert (row.problem, row.origin) == ("duplicates_in_split", str(copy.resolve()))
    assert row.value == f"same pixels and label (cat) as {original.resolve()}"
    assert outcome.description == (
        f"Usable, but worth fixing: 1 extra copy(ies) of an image in the same split "
        f"({copy.resolve()}): delete the extra copies from the source so each picture counts "
        "once. Then re-materialize cifar10_raw."
    )
    assert_plain(outcome.summary)
    # the splitter keeps identical images together, so nothing leaks
    assert check_leakage(image_statistics(splits)).passed


def test_duplicate_with_conflicting_labels_is_an_error_naming_both_files(tmp_path: Path) -> None:
    root = tmp_path / "images"
    build_folder(root, (10,) * 10)
    cat = (root / "cat" / "cat_03.png").resolve()
    dog = (root / "dog" / "from_the_cat_folder.png").resolve()
    shutil.copy(cat, dog)
    splits = split_folder(root)

    outcome = check_integrity(splits)
    assert not outcome.passed and outcome.severity == "error"
    assert outcome.summary["conflicting_labels"] == 2
    rows = outcome.failures.set_index("origin")
    split_of = {origin: name for name, part in splits.items() for origin in part.origins.tolist()}
    assert rows.loc[str(cat), "problem"] == "conflicting_labels"
    assert rows.loc[str(cat), "value"] == (
        f"labelled cat, but {dog} ({split_of[str(dog)]} split) has the same pixels labelled dog"
    )
    assert rows.loc[str(dog), "value"] == (
        f"labelled dog, but {cat} ({split_of[str(cat)]} split) has the same pixels labelled cat"
    )
    assert (
        f"2 image(s) whose identical copy carries another label ({cat}, {dog})"
        in (outcome.description)
        or f"({dog}, {cat})" in outcome.description
    )
    assert "keep one copy, in the folder of its true class, and delete the others" in (
        outcome.description
    )


@pytest.mark.parametrize(
    ("counts", "tolerance", "severity", "passed"),
    [(UNEQUAL_COUNTS, 0.2, "ERROR", False), (UNEQUAL_COUNTS, 0.9, "WARN", False)],
)
def test_class_balance_check_through_dagster_is_stored_not_crashed(
    tmp_path: Path, counts: tuple[int, ...], tolerance: float, severity: str, passed: bool
) -> None:
    """The checks run in Dagster against a sqlite instance, which serializes every event: a numpy
    scalar in the metadata crashed here before (SerializationError on numpy.float64)."""
    from cifar_assets.assets.data_assets import cifar10_raw, cifar10_splits
    from cifar_assets.assets.validation_assets import validation_report
    from cifar_assets.checks import DATA_CHECKS
    from cifar_assets.resources import LocalStorageIOManager

    build_folder(tmp_path / "images", counts)
    config = {
        "ops": {
            "cifar10_raw": {
                "config": {"source": "image_folder", "image_folder": str(tmp_path / "images")}
            },
            "validation_report_class_balance_check": {"config": {"tolerance": tolerance}},
        }
    }
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [cifar10_raw, cifar10_splits, validation_report, *DATA_CHECKS],
            resources={"io_manager": LocalStorageIOManager(base_dir=str(tmp_path / "store"))},
            run_config=config,
            instance=instance,
            raise_on_error=False,
        )
        evaluations = {
            evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()
        }
        balance = evaluations["class_balance_check"]
        assert (balance.passed, balance.severity.value) == (passed, severity)
        metadata = {key: value.value for key, value in balance.metadata.items()}
        assert metadata["classes_too_small"] == 10
        assert metadata["tolerance"] == tolerance
        assert "automobile: 3 image(s) (train 1, validation 1, test 1)" in metadata["summary"]
        assert all(evaluations[name].passed for name in ("schema_check", "integrity_check"))

        record = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey("validation_report"), "class_balance_check"), limit=1
        )[0]
        assert record.status.value == "FAILED"  # a verdict; a crash reads EXECUTION_FAILED
        splits = instance.get_latest_materialization_event(dg.AssetKey("cifar10_splits"))
        assert splits is not None and splits.asset_materialization is not None
        too_small = splits.asset_materialization.metadata["classes_too_small"].value
        assert str(too_small).startswith("10 class(es) too small to split")
