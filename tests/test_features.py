"""The declared features, their computation, and the Parquet feature store.

Values are checked against direct computations (scipy.ndimage filters, textbook formulas), the
store against the exact bits it was given, and the features against real corruptions.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.ndimage
from PIL import Image

from cifar_assets.data import features
from cifar_assets.data.features import (
    ALLOWED_DTYPES,
    FEATURE_GROUPS,
    SCHEMA_VERSION,
    VERSION_KEY,
    Feature,
    FeatureGroup,
    FeatureSchemaError,
    FeatureStore,
    compute_features,
    feature_columns,
)
from cifar_assets.data.imageset import ImageSet, content_ids

LUMA = np.array([0.299, 0.587, 0.114])


def scene_images(n: int, seed: int) -> np.ndarray:
    """Smooth colour fields with a few sharp-edged rectangles and mild sensor noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(30, 220, size=(n, 4, 4, 3))
    images = scipy.ndimage.zoom(coarse, (1, 8, 8, 1), order=1)
    for index in range(n):
        for _ in range(3):
            top, left = rng.integers(0, 24, size=2)
            height, width = rng.integers(4, 12, size=2)
            images[index, top : top + height, left : left + width] = rng.uniform(0, 255, 3)
    images += rng.normal(0, 2.0, size=images.shape)
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


def as_set(images: np.ndarray, labelled: bool = True) -> ImageSet:
    labels = np.arange(len(images)) % 10 if labelled else np.full(len(images), -1)
    return ImageSet(images, labels.astype(np.int64), content_ids(images), "test")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return scene_images(120, 0)


@pytest.fixture(scope="module")
def table(images: np.ndarray) -> pd.DataFrame:
    return compute_features(as_set(images))


def test_declarations_are_complete_and_consistent(table: pd.DataFrame) -> None:
    names = [feature.name for group in FEATURE_GROUPS for feature in group.features]
    assert len(names) == len(set(names)) and "id" not in names
    assert {group.name for group in FEATURE_GROUPS} >= {"colour", "intensity", "texture", "noise"}
    assert all(
        f.dtype in ALLOWED_DTYPES and f.description for g in FEATURE_GROUPS for f in g.features
    )
    assert list(table.columns) == feature_columns() == ["id", *names]
    declared = {f.name: f.dtype for g in FEATURE_GROUPS for f in g.features}
    assert {
        column: str(dtype) for column, dtype in table.dtypes.items() if column != "id"
    } == declared
    assert np.isfinite(table[names].to_numpy()).all()


def test_values_match_direct_computations(images: np.ndarray, table: pd.DataFrame) -> None:
    pixels = images.astype(np.float64)
    np.testing.assert_allclose(
        table[["mean_r", "mean_g", "mean_b"]], pixels.mean(axis=(1, 2)), rtol=1e-6
    )
    np.testing.assert_allclose(
        table[["std_r", "std_g", "std_b"]], pixels.std(axis=(1, 2)), rtol=1e-5
    )
    luma = pixels @ LUMA
    np.testing.assert_allclose(table["brightness"], luma.mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(table["contrast"], luma.std(axis=(1, 2)), rtol=1e-5)
    red_green = pixels[..., 0] - pixels[..., 1]
    yellow_blue = 0.5 * (pixels[..., 0] + pixels[..., 1]) - pixels[..., 2]
    colourfulness = np.hypot(
        red_green.std(axis=(1, 2)), yellow_blue.std(axis=(1, 2))
    ) + 0.3 * np.hypot(red_green.mean(axis=(1, 2)), yellow_blue.mean(axis=(1, 2)))
    np.testing.assert_allclose(table["colourfulness"], colourfulness, rtol=1e-5)

    luma32 = images.astype(np.float32) @ LUMA.astype(np.float32)
    sobel = np.stack(
        [
            np.hypot(
                scipy.ndimage.sobel(plane, axis=1, mode="nearest"),
                scipy.ndimage.sobel(plane, axis=0, mode="nearest"),
            )
            for plane in luma32
        ]
    )
    np.testing.assert_allclose(table["gradient_mean"], sobel.mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_array_equal(
        table["edge_density"],
        (sobel > features.EDGE_THRESHOLD).mean(axis=(1, 2)).astype(np.float32),
    )
    laplace = np.stack([scipy.ndimage.laplace(plane, mode="nearest") for plane in luma32])
    np.testing.assert_allclose(table["laplacian_variance"], laplace.var(axis=(1, 2)), rtol=1e-4)
    assert table["edge_density"].between(0.02, 0.6).all()


def test_known_images_give_known_values() -> None:
    grey = np.full((32, 32, 3), 128, dtype=np.uint8)
    red = np.zeros((32, 32, 3), dtype=np.uint8)
    red[..., 0] = 200
    # two colours only: half red, half blue, split at a block border
    halves = np.zeros((32, 32, 3), dtype=np.uint8)
    halves[:, :16, 0] = 255
    halves[:, 16:, 2] = 255
    table = compute_features(as_set(np.stack([grey, red, halves]), labelled=False))
    grey_row, red_row, halves_row = (table.iloc[i] for i in range(3))

    for column in (
        "contrast",
        "edge_density",
        "gradient_mean",
        "laplacian_variance",
        "noise_sigma",
        "noise_sigma_mad",
        "saturation_mean",
        "hue_entropy",
        "dynamic_range",
        "high_frequency_ratio",
        "intensity_entropy",
    ):
        assert grey_row[column] == 0.0, column
    assert grey_row["brightness"] == pytest.approx(128.0)
    assert grey_row["pixelation"] == 1.0
    assert grey_row["jpeg_blockiness"] == 1.0
    assert red_row["saturation_mean"] == 1.0 and red_row["hue_entropy"] == 0.0
    assert red_row["colourfulness"] == pytest.approx(0.3 * np.hypot(200, 100))
    assert halves_row["hue_entropy"] == pytest.approx(1 / np.log2(features.HUE_BINS))
    assert halves_row["intensity_entropy"] == pytest.approx(1.0)
    assert halves_row["clipped_fraction"] == 0.0
    # only the column pairs at the colour border (x = 15 | 16) differ
    assert halves_row["pixelation"] == pytest.approx(1 - 32 / (2 * 32 * 31))
    assert halves_row["jpeg_blockiness"] > 1.5


def test_high_frequency_ratio_of_single_dct_frequencies() -> None:
    # A grey image whose rows are one DCT-II basis cosine has all its AC energy at (0, u):
    # all of it counts as high frequency for u >= HIGH_FREQUENCY_START, none of it below;
    # rounding to uint8 adds only a little broadband energy.
    def cosine(u: int) -> np.ndarray:
        x = np.arange(32)
        row = 128 + 60 * np.cos(np.pi * (2 * x + 1) * u / 64)
        return np.repeat(np.rint(np.tile(row, (32, 1)))[..., None], 3, axis=2).astype(np.uint8)

    start = features.HIGH_FREQUENCY_START
    table = compute_features(as_set(np.stack([cosine(3), cosine(start), cosine(31)]), False))
    ratios = table["high_frequency_ratio"].to_numpy()
    assert ratios == pytest.approx([0.0, 1.0, 1.0], abs=1e-3)


def test_rows_do_not_depend_on_the_batch_and_labels_are_not_needed() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(features._CHUNK + 100, 32, 32, 3), dtype=np.uint8)
    whole = compute_features(as_set(images, labelled=False))
    picked = [3, features._CHUNK + 50, 7]
    part = compute_features(as_set(images[picked]))
    pd.testing.assert_frame_equal(whole.iloc[picked].reset_index(drop=True), part, check_exact=True)
    assert whole["id"].tolist() == content_ids(images).tolist()


def test_compute_features_rejects_unknown_groups_and_bad_images(images: np.ndarray) -> None:
    made_up = FeatureGroup("sharpness", "not implemented", (Feature("acutance", "float32", "x"),))
    with pytest.raises(ValueError, match=r"feature groups \['sharpness'\] have no computation"):
        compute_features(as_set(images), groups=(made_up,))
    floats = ImageSet(
        images.astype(np.float32), np.zeros(len(images)), content_ids(images), "floaty"
    )
    with pytest.raises(ValueError, match=r"uint8 RGB images .* from floaty"):
        compute_features(floats)
    only_noise = compute_features(
        as_set(images), groups=[g for g in FEATURE_GROUPS if g.name == "noise"]
    )
    assert list(only_noise.columns) == ["id", "noise_sigma", "noise_sigma_mad"]


def _jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(buffer).convert("RGB")))
    return np.stack(out)


def test_features_respond_to_corruptions(images: np.ndarray, table: pd.DataFrame) -> None:
    rng = np.random.default_rng(9)
    corrupted = {
        "noise": np.clip(images + rng.normal(0, 12, images.shape), 0, 255).astype(np.uint8),
        "blur": scipy.ndimage.gaussian_filter(images.astype(np.float64), (0, 1.2, 1.2, 0))
        .round()
        .astype(np.uint8),
        "brighter": np.clip(images.astype(np.int16) + 40, 0, 255).astype(np.uint8),
        "low_contrast": (128 + (images.astype(np.float64) - 128) * 0.5).round().astype(np.uint8),
        "pixelated": images[:, ::4, ::4].repeat(4, axis=1).repeat(4, axis=2),
        "jpeg": _jpeg(images, quality=10),
        "grey": np.repeat(
            (images.astype(np.float64) @ LUMA).round().astype(np.uint8)[..., None], 3, -1
        ),
    }
    after = {name: compute_features(as_set(batch)) for name, batch in corrupted.items()}

    def share(name: str, column: str, direction: int) -> float:
        change = after[name][column].to_numpy(np.float64) - table[column].to_numpy(np.float64)
        return float((np.sign(change) == direction).mean())

    expectations = [
        ("noise", "noise_sigma", +1),
        ("noise", "noise_sigma_mad", +1),
        ("noise", "high_frequency_ratio", +1),
        ("blur", "edge_density", -1),
        ("blur", "laplacian_variance", -1),
        ("blur", "high_frequency_ratio", -1),
        ("blur", "noise_sigma", -1),
        ("brighter", "brightness", +1),
        ("low_contrast", "contrast", -1),
        ("low_contrast", "dynamic_range", -1),
        ("pixelated", "pixelation", +1),
        ("jpeg", "jpeg_blockiness", +1),
        ("grey", "saturation_mean", -1),
        ("grey", "colourfulness", -1),
    ]
    shares = {
        (name, column): share(name, column, direction) for name, column, direction in expectations
    }
    # blur thickens very strong edges, so a few edge-rich images gain edge pixels
    edge_share = shares.pop(("blur", "edge_density"))
    assert edge_share >= 0.9
    assert after["blur"]["edge_density"].mean() < 0.7 * table["edge_density"].mean()
    assert all(value >= 0.95 for value in shares.values()), shares
    assert after["brighter"]["brightness"].mean() - table["brightness"].mean() == pytest.approx(
        38, abs=3
    )
    # the two noise estimates should roughly agree with the added sigma (luma averages channels)
    added = after["noise"]["noise_sigma_mad"].median()
    assert 6 < added < 14


def test_store_round_trip_is_exact(tmp_path: Path, table: pd.DataFrame) -> None:
    store = FeatureStore(tmp_path / "store")
    path = store.write(table)
    assert path == tmp_path / "store" / "image_features.parquet"

    pd.testing.assert_frame_equal(store.read(), table, check_exact=True)
    for column in table.columns[1:]:
        assert store.read()[column].to_numpy().tobytes() == table[column].to_numpy().tobytes()
    one = table["id"].iloc[17]
    pd.testing.assert_frame_equal(
        store.read(one), table.iloc[[17]].reset_index(drop=True), check_exact=True
    )
    order = np.random.default_rng(2).permutation(len(table))[:40]
    picked = store.read(table["id"].iloc[order].tolist())
    pd.testing.assert_frame_equal(
        picked, table.iloc[order].reset_index(drop=True), check_exact=True
    )
    some = store.read(table["id"].iloc[[5, 2]], columns=["noise_sigma", "brightness"])
    assert list(some.columns) == ["id", "noise_sigma", "brightness"]
    assert some["brightness"].tolist() == table["brightness"].iloc[[5, 2]].tolist()

    assert store.schema_version() == SCHEMA_VERSION
    assert store.groups() == FEATURE_GROUPS
    stored = pq.read_schema(path).metadata
    assert json.loads(stored[features.GROUPS_KEY])[0]["name"] == FEATURE_GROUPS[0].name


def test_unknown_ids_and_columns_are_named(tmp_path: Path, table: pd.DataFrame) -> None:
    store = FeatureStore(tmp_path)
    store.write(table)
    missing = [f"nope{i:02d}" for i in range(15)]
    with pytest.raises(KeyError, match="15 of 16 requested ids") as error:
        store.read([table["id"].iloc[0], *missing])
    message = str(error.value)
    assert message.startswith("15 of 16")
    assert all(image_id in message for image_id in missing[:10])
    assert "nope10" not in message
    with pytest.raises(KeyError, match=r"features \['sharpness'\] are not in"):
        store.read(columns=["sharpness"])
    with pytest.raises(FileNotFoundError, match="materialize the image_features asset"):
        FeatureStore(tmp_path / "empty").read()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.drop(columns=["noise_sigma"]), r"missing columns \['noise_sigma'\]"),
        (lambda t: t.assign(extra=1.0), r"unexpected columns \['extra'\]"),
        (
            lambda t: t.astype({"brightness": "float64"}),
            "brightness.*float64 \\(declared float32\\)",
        ),
        (lambda t: pd.concat([t, t.iloc[[3]]]), "1 ids occur more than once"),
        (lambda t: t.assign(contrast=t["contrast"].where(t.index != 4, np.nan)), "NaN or infinite"),
        (lambda t: t.assign(id=t["id"].where(t.index != 2, "")), "non-empty string"),
    ],
)
def test_bad_tables_are_rejected_before_the_stored_file_is_touched(
    tmp_path: Path, table: pd.DataFrame, change, message: str
) -> None:
    store = FeatureStore(tmp_path)
    path = store.write(table)
    before = path.read_bytes()
    with pytest.raises(FeatureSchemaError, match=message):
        store.write(change(table))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image_features.parquet"]


def test_a_write_that_fails_midway_leaves_the_previous_file(
    tmp_path: Path, table: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FeatureStore(tmp_path)
    path = store.write(table)
    before = path.read_bytes()

    def write_half_then_fail(arrow, where, **kwargs) -> None:
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(features.pq, "write_table", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        store.write(table.iloc[:10])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image_features.parquet"]
    monkeypatch.undo()
    pd.testing.assert_frame_equal(store.read(), table, check_exact=True)


def test_a_file_from_another_schema_version_is_refused(tmp_path: Path, table: pd.DataFrame) -> None:
    store = FeatureStore(tmp_path)
    path = store.write(table)
    old = pq.read_table(path)
    metadata = {**old.schema.metadata, VERSION_KEY: b"0"}
    pq.write_table(old.replace_schema_metadata(metadata), path)

    assert store.schema_version() == "0"
    with pytest.raises(FeatureSchemaError, match=r"version 0.*re-materialize the image_features"):
        store.read()
    pq.write_table(old.replace_schema_metadata({}), path)
    with pytest.raises(FeatureSchemaError, match="not written by FeatureStore"):
        store.read()
