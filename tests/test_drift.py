"""Drift detection on real embeddings: a randomly initialised ResNet18 (ImageNet stem) looking at
synthetic images. Fresh batches from the reference distribution must rarely raise the verdict,
corrupted ones must, the moved features must be the ones the corruption touches, a planted
accuracy drop must be found, and a saved baseline must give the same answers after loading.
Also: finding and reading incoming batches (files, image folders, captured traffic)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cifar_assets.data.corruptions import corrupt
from cifar_assets.data.errors import DataSourceError
from cifar_assets.data.features import compute_features
from cifar_assets.data.image_folder import write_image_folder
from cifar_assets.data.imageset import UNLABELLED, ImageSet
from cifar_assets.data.synthetic import generate_synthetic
from cifar_assets.drift.baseline import BaselineVersionError, DriftBaseline, fit_baseline
from cifar_assets.drift.detectors import DriftDetectorError, SoftmaxKSDetector
from cifar_assets.drift.incoming import (
    Discovery,
    IncomingBatch,
    batch_from_capture,
    batch_id_for,
    discover_batches,
    load_batch,
)
from cifar_assets.drift.report import (
    DriftReport,
    check_batch,
    drift_overview_png,
    feature_distribution_png,
)

P_VAL = 0.05
N_REFERENCE = 300
N_POOL = 1000  # held-out images from the reference distribution
N_BATCH = 200
N_TRIALS = 30
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "brightness", "contrast", "pixelate", "jpeg")
BATCHES_PER_CORRUPTION = 3


@dataclass(frozen=True)
class Outputs:
    """What the checks consume for one set of images: embeddings, softmax outputs, features."""

    embeddings: np.ndarray
    probabilities: np.ndarray
    features: pd.DataFrame

    def rows(self, index: np.ndarray) -> Outputs:
        return Outputs(
            self.embeddings[index],
            self.probabilities[index],
            self.features.iloc[index].reset_index(drop=True),
        )


@pytest.fixture(scope="module")
def model() -> Iterator[object]:
    import torch

    from cifar_assets.ml.model import Architecture, build_resnet18

    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield build_resnet18(Architecture(stem="imagenet")).eval()


@pytest.fixture(scope="module")
def describe(model: object):
    import torch

    from cifar_assets.ml.embeddings import embed

    def run(images: np.ndarray) -> Outputs:
        embeddings = embed(model, images)  # type: ignore[arg-type]
        # The softmax of fc on the embeddings is the model's output (checked below): one
        # forward pass per image instead of two keeps the file fast.
        with torch.inference_mode():
            logits = model.fc(torch.from_numpy(embeddings))  # type: ignore[attr-defined]
        probabilities = torch.softmax(logits, dim=1).numpy()
        imageset = ImageSet.from_arrays(images, np.full(len(images), UNLABELLED), "test")
        return Outputs(embeddings, probabilities, compute_features(imageset))

    return run


@pytest.fixture(scope="module")
def reference_images() -> ImageSet:
    return generate_synthetic(N_REFERENCE, seed=1)


@pytest.fixture(scope="module")
def pool_images() -> ImageSet:
    return generate_synthetic(N_POOL, seed=2)


@pytest.fixture(scope="module")
def reference(describe, reference_images: ImageSet) -> Outputs:
    return describe(reference_images.images)


@pytest.fixture(scope="module")
def pool(describe, pool_images: ImageSet) -> Outputs:
    return describe(pool_images.images)


@pytest.fixture(scope="module")
def baseline(reference: Outputs) -> DriftBaseline:
    return fit_baseline(
        reference.embeddings,
        reference.probabilities,
        reference.features,
        model_version=7,
        p_val=P_VAL,
        n_permutations=100,
    )


@pytest.fixture(scope="module")
def corrupted(describe, pool_images: ImageSet) -> dict[tuple[str, int], Outputs]:
    """Each corruption at severity 3 and 5 on the first pool images, enough for a few batches."""
    images = pool_images.images[: N_BATCH * BATCHES_PER_CORRUPTION]
    return {
        (name, severity): describe(corrupt(images, name, severity, seed=severity))
        for name in CORRUPTIONS
        for severity in (3, 5)
    }


def check(
    baseline: DriftBaseline, outputs: Outputs, labels: np.ndarray | None = None
) -> DriftReport:
    return check_batch(
        baseline, outputs.embeddings, outputs.probabilities, outputs.features, labels
    )


def test_shortcut_probabilities_are_the_models(model, describe, reference_images) -> None:
    from cifar_assets.ml.embeddings import predict_proba

    images = reference_images.images[:16]
    direct = predict_proba(model, images)
    assert np.abs(direct - describe(images).probabilities).max() < 1e-5


def test_no_drift_batches_are_flagged_at_about_the_significance_level(
    baseline: DriftBaseline, pool: Outputs
) -> None:
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    reports = [
        check(baseline, pool.rows(rng.choice(N_POOL, N_BATCH, replace=False)))
        for _ in range(N_TRIALS)
    ]
    per_check = (time.perf_counter() - started) / N_TRIALS
    rate = np.mean([report.data_drift for report in reports])
    by_detector = {
        name: np.mean([report.result(name).drift for report in reports])
        for name in ("mmd_embeddings", "ks_softmax", "ks_uncertainty", "ks_features")
    }
    print(
        f"\nno-drift false positive rate {rate:.3f} over {N_TRIALS} batches of {N_BATCH} "
        f"(per detector {by_detector}); {per_check:.2f} s per check"
    )
    margin = 2.33 * np.sqrt(P_VAL * (1 - P_VAL) / N_TRIALS)  # one-sided 99% binomial margin
    assert rate <= P_VAL + margin
    for report in reports:
        # The gauge crosses 1 - p_val exactly when the verdict turns.
        assert 0.0 <= report.score <= 1.0
        assert report.data_drift == (report.score > 1 - P_VAL)
        assert report.model_drift is False and report.accuracy is None


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupted_batches_are_flagged(
    name: str, baseline: DriftBaseline, corrupted: dict[tuple[str, int], Outputs]
) -> None:
    lines = []
    for severity in (3, 5):
        outputs = corrupted[(name, severity)]
        reports = [
            check(baseline, outputs.rows(np.arange(start, start + N_BATCH)))
            for start in range(0, N_BATCH * BATCHES_PER_CORRUPTION, N_BATCH)
        ]
        rate = np.mean([report.data_drift for report in reports])
        mmd = max(report.result("mmd_embeddings").p_value for report in reports)
        softmax = max(report.result("ks_softmax").p_value for report in reports)
        features = max(report.result("ks_features").p_value for report in reports)
        lines.append(
            f"{name} s{severity}: detected {rate:.0%} of {len(reports)}; largest p: mmd {mmd:.3f} "
            f"softmax {softmax:.2g} features {features:.2g}; moved {reports[0].moved_features[:3]}"
        )
        assert rate == 1.0, lines[-1]
        assert all(report.score > 1 - P_VAL for report in reports)
    print("\n" + "\n".join(lines))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gaussian_noise", {"noise_sigma", "noise_sigma_mad"}),
        ("brightness", {"brightness"}),
        ("gaussian_blur", {"laplacian_variance", "gradient_mean", "high_frequency_ratio"}),
    ],
)
def test_moved_features_make_sense(
    name: str,
    expected: set[str],
    baseline: DriftBaseline,
    corrupted: dict[tuple[str, int], Outputs],
) -> None:
    report = check(baseline, corrupted[(name, 3)].rows(np.arange(N_BATCH)))
    table = report.result("ks_features").details["features"]
    print(
        f"\n{name} s3 top features: {[(r['feature'], round(r['statistic'], 2)) for r in table[:4]]}"
    )
    assert expected & set(report.moved_features[:3])
    statistics = [row["statistic"] for row in table]
    assert statistics == sorted(statistics, reverse=True)


def test_feature_detector_names_nothing_on_clean_batches(
    baseline: DriftBaseline, pool: Outputs
) -> None:
    report = check(baseline, pool.rows(np.arange(N_BATCH)))
    assert report.moved_features == []
    assert not report.result("ks_features").drift


def planted_labels(probabilities: np.ndarray, accuracy: float, seed: int) -> np.ndarray:
    """Labels against which the model's predictions are right for exactly ``accuracy`` of rows."""
    rng = np.random.default_rng(seed)
    predicted = probabilities.argmax(axis=1)
    wrong = rng.permutation(len(predicted))[: round((1 - accuracy) * len(predicted))]
    labels = predicted.copy()
    labels[wrong] = (predicted[wrong] + rng.integers(1, 10, len(wrong))) % 10
    return labels


def test_accuracy_drop_is_found(reference: Outputs, pool: Outputs) -> None:
    labelled_baseline = fit_baseline(
        reference.embeddings,
        reference.probabilities,
        reference.features,
        labels=planted_labels(reference.probabilities, 0.85, seed=1),
        model_version=7,
        p_val=P_VAL,
    )
    assert labelled_baseline.reference_accuracy == pytest.approx(0.85)
    batch = pool.rows(np.arange(N_BATCH))

    same = check(labelled_baseline, batch, planted_labels(batch.probabilities, 0.85, seed=2))
    dropped = check(labelled_baseline, batch, planted_labels(batch.probabilities, 0.72, seed=3))

    assert same.accuracy is not None and dropped.accuracy is not None
    print(
        f"\naccuracy 0.85 -> 0.85: p={same.accuracy.p_value:.3f}; "
        f"0.85 -> 0.72: p={dropped.accuracy.p_value:.2g}"
    )
    assert same.batch_accuracy == pytest.approx(0.85)
    assert not same.model_drift and same.accuracy.p_value > 0.3
    assert dropped.accuracy.difference == pytest.approx(0.72 - 0.85)
    assert dropped.model_drift and dropped.drift and dropped.accuracy.p_value < 0.01
    # Labels with -1 count as unlabelled: half the batch labelled gives half the sample.
    partial = planted_labels(batch.probabilities, 0.72, seed=3)
    partial[::2] = UNLABELLED
    assert check(labelled_baseline, batch, partial).accuracy.n_batch == N_BATCH // 2  # type: ignore[union-attr]


def test_baseline_round_trip_gives_the_same_results(
    tmp_path: Path,
    baseline: DriftBaseline,
    pool: Outputs,
    corrupted: dict[tuple[str, int], Outputs],
) -> None:
    baseline.save(tmp_path / "baseline")
    loaded = DriftBaseline.load(tmp_path / "baseline", expected_model_version=7)

    assert loaded.model_version == 7
    assert loaded.reference.feature_names == baseline.reference.feature_names
    for outputs in (pool.rows(np.arange(N_BATCH)), corrupted[("jpeg", 3)].rows(np.arange(N_BATCH))):
        before, after = check(baseline, outputs).to_dict(), check(loaded, outputs).to_dict()
        assert json.dumps(after, sort_keys=True) == json.dumps(before, sort_keys=True)

    with pytest.raises(BaselineVersionError, match=r"model version 7, not 8.*drift_baseline"):
        DriftBaseline.load(tmp_path / "baseline", expected_model_version=8)
    meta_file = tmp_path / "baseline" / "baseline.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(meta | {"format_version": 99}))
    with pytest.raises(BaselineVersionError, match="format version 99"):
        DriftBaseline.load(tmp_path / "baseline")
    with pytest.raises(FileNotFoundError, match=r"baseline\.json is missing"):
        DriftBaseline.load(tmp_path / "nowhere")


def test_report_serialises_and_plots_moved_features(
    tmp_path: Path, baseline: DriftBaseline, corrupted: dict[tuple[str, int], Outputs]
) -> None:
    batch = corrupted[("brightness", 5)].rows(np.arange(N_BATCH))
    report = check(baseline, batch)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["drift"] is True and data["score"] == pytest.approx(report.score)
    assert data["detectors"]["mmd_embeddings"]["details"]["n_permutations"] == 100
    assert data["detectors"]["ks_softmax"]["threshold"] == pytest.approx(P_VAL / 3)

    path = feature_distribution_png(
        baseline.features.reference_features(),
        batch.features,
        report.moved_features,
        tmp_path / "f.png",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    with pytest.raises(DriftDetectorError, match="'no_such_feature' is not a column"):
        feature_distribution_png(
            baseline.features.reference_features(), batch.features, ["no_such_feature"], path
        )

    overview = drift_overview_png(report, baseline, batch.probabilities, tmp_path / "o.png")
    assert overview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and overview.stat().st_size > 10_000
    with pytest.raises(DriftDetectorError, match="the batch has 3 classes, the baseline 10"):
        three = batch.probabilities[:, :3] / batch.probabilities[:, :3].sum(axis=1, keepdims=True)
        drift_overview_png(report, baseline, three, tmp_path / "x.png")


def test_detectors_refuse_bad_input(baseline: DriftBaseline, pool: Outputs) -> None:
    with pytest.raises(DriftDetectorError, match="pass softmax outputs, not logits"):
        baseline.softmax_ks.score(pool.probabilities[:50] * 3)
    with pytest.raises(DriftDetectorError, match="expected 512 columns"):
        baseline.mmd.score(pool.embeddings[:50, :100])
    with pytest.raises(DriftDetectorError, match=r"\['brightness'\] are missing"):
        baseline.features.score(pool.features.drop(columns="brightness"))
    with pytest.raises(DriftDetectorError, match="call fit"):
        SoftmaxKSDetector().score(pool.probabilities)


# Incoming batches ------------------------------------------------------------------------


def test_discover_batches_lists_files_and_folders_with_safe_ids(tmp_path: Path) -> None:
    images = generate_synthetic(20, seed=3)
    np.savez(tmp_path / "2026-01-05_cam1.npz", images=images.images, labels=images.labels)
    np.savez(tmp_path / "night shift (2).npz", images=images.images)
    np.savez(tmp_path / ".hidden.npz", images=images.images)
    np.savez(tmp_path / "half.tmp.npz", images=images.images)
    (tmp_path / "notes.txt").write_text("not a batch")
    write_image_folder(images.subset(np.arange(10)), tmp_path / "labelled")
    unlabelled = ImageSet.from_arrays(images.images[10:], np.full(10, UNLABELLED), "t")
    write_image_folder(unlabelled, tmp_path / "flat")

    batches = discover_batches(tmp_path).batches

    by_id = {batch.batch_id: batch for batch in batches}
    weird = batch_id_for("night shift (2)")
    assert set(by_id) == {"2026-01-05_cam1", weird, "flat", "labelled"}
    assert weird.startswith("night-shift-2-") and len(weird) == len("night-shift-2-") + 8
    assert all(batch.batch_id.replace("-", "").replace("_", "").isalnum() for batch in batches)
    assert [b.batch_id for b in batches] == sorted(by_id)
    assert by_id["flat"].kind == "image_folder" and by_id[weird].kind == "npz"
    assert discover_batches(tmp_path).batches == batches
    assert discover_batches(tmp_path / "absent") == Discovery()

    file_batch = load_batch(by_id["2026-01-05_cam1"])
    np.testing.assert_array_equal(file_batch.images, images.images)
    np.testing.assert_array_equal(file_batch.labels, images.labels)
    assert file_batch.source == "incoming:2026-01-05_cam1"
    assert (load_batch(by_id[weird]).labels == UNLABELLED).all()
    labelled = load_batch(by_id["labelled"])
    assert sorted(labelled.ids) == sorted(images.ids[:10])
    assert labelled.is_labelled
    flat = load_batch(by_id["flat"])
    assert len(flat) == 10 and (flat.labels == UNLABELLED).all()


def test_same_name_as_file_and_folder_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", images=generate_synthetic(2, seed=0).images)
    (tmp_path / "x").mkdir()
    rejected = discover_batches(tmp_path).rejected
    assert [entry.path.name for entry in rejected] == ["x", "x.npz"]
    assert (
        "/x and " in rejected[0].reason and "/x.npz would both be batch 'x'" in rejected[0].reason
    )


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"pixels": np.zeros((2, 32, 32, 3), np.uint8)}, r"no 'images'"),
        (
            {"images": np.zeros((2, 32, 32, 3), np.float32)},
            r"float32 \(2, 32, 32, 3\), expected uint8",
        ),
        (
            {"images": np.zeros((2, 32, 32, 3), np.uint8), "labels": np.array([0, 12])},
            r"labels \[12\] are outside 0..9",
        ),
    ],
)
def test_malformed_npz_batches_name_the_file(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataSourceError, match=message) as raised:
        load_batch(IncomingBatch("bad", path, "npz"))
    assert str(path) in str(raised.value)


def test_unreadable_npz_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.npz"
    path.write_bytes(b"this is not a zip file")
    with pytest.raises(DataSourceError, match=r"broken.npz is not a readable .npz"):
        load_batch(IncomingBatch("broken", path, "npz"))


def write_capture(capture_dir: Path, images: np.ndarray, start: datetime) -> list[str]:
    """Lay out captured traffic as the router does: three requests a minute apart, the second
    with two images; pixels of all four images sampled."""
    (capture_dir / "records").mkdir(parents=True)
    (capture_dir / "inputs").mkdir()
    requests = [("req-a", 1), ("req-b", 2), ("req-c", 1)]
    lines, request_ids = [], []
    for minute, (request_id, count) in enumerate(requests):
        for item in range(count):
            lines.append(
                {
                    "time": (start + timedelta(minutes=minute)).isoformat(),
                    "request_id": request_id,
                    "item": item,
                    "user_id": "u1",
                    "served_version": 3,
                    "predicted_class": 0,
                    "predicted_label": "airplane",
                    "confidence": 0.5,
                    "latency_ms": 4.0,
                }
            )
            request_ids.append(request_id)
    (capture_dir / "records" / "20260101-1.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines)
    )
    np.savez(
        capture_dir / "inputs" / "20260101-1-0.npz",
        images=images[: len(request_ids)],
        request_ids=np.asarray(request_ids),
    )
    return request_ids


def test_batch_from_capture_takes_a_time_window_and_feedback(tmp_path: Path) -> None:
    from cifar_assets.serving.capture import record_feedback

    images = generate_synthetic(4, seed=4).images
    start = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    write_capture(tmp_path, images, start)
    record_feedback(tmp_path, "req-b", "cat", item=1)

    everything = batch_from_capture(tmp_path)
    assert everything is not None and len(everything) == 4
    np.testing.assert_array_equal(everything.images, images)
    np.testing.assert_array_equal(everything.labels, [UNLABELLED, UNLABELLED, 3, UNLABELLED])

    window = batch_from_capture(
        tmp_path, since=start + timedelta(seconds=30), until=start + timedelta(minutes=2)
    )
    assert window is not None
    np.testing.assert_array_equal(window.images, images[1:3])
    np.testing.assert_array_equal(window.labels, [UNLABELLED, 3])

    assert batch_from_capture(tmp_path, since=start + timedelta(hours=1)) is None
    assert batch_from_capture(tmp_path / "empty") is None
    with pytest.raises(DataSourceError, match="no time zone"):
        batch_from_capture(tmp_path, since=datetime(2026, 1, 1))


def test_mmd_score_is_alibi_detects_predict_and_repeatable(
    baseline: DriftBaseline, pool: Outputs, corrupted: dict[tuple[str, int], Outputs]
) -> None:
    """The MMD score is alibi-detect's own predict on the PCA projection, with the permutations
    seeded by the detector's seed: the same p-value, distance and threshold as calling predict
    directly, the same again on a second look, and B from the detector's parameters."""
    import torch

    detector = baseline.mmd
    for outputs in (pool.rows(np.arange(N_BATCH)), corrupted[("jpeg", 3)].rows(np.arange(N_BATCH))):
        lines: list[str] = []
        ours = detector.score(outputs.embeddings, log=lines.append)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            torch.manual_seed(detector.seed)
            theirs = detector._alibi.predict(detector._project(outputs.embeddings))["data"]
        finally:
            torch.set_num_threads(threads)

        assert ours.distance == theirs["distance"]
        assert ours.details["distance_threshold"] == theirs["distance_threshold"]
        assert ours.p_value == theirs["p_val"]
        assert ours.drift == bool(theirs["is_drift"])
        assert ours.details["n_permutations"] == detector.n_permutations == 100
        assert detector.score(outputs.embeddings) == ours
        assert lines[-1].startswith(f"MMD permutation test ({N_BATCH} images): done in ")
