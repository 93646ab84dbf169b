"""Evaluation metrics against figures worked out by hand and against scikit-learn, the plots, and
the batched forward passes behind predict_logits, embed and predict_proba."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from sklearn import metrics as sk

from cifar_assets.data.imageset import CLASSES
from cifar_assets.ml.embeddings import EMBEDDING_DIM, embed, predict_proba
from cifar_assets.ml.evaluation import (
    compare,
    confusion_matrix_png,
    evaluate,
    per_class_accuracy_png,
    predict_logits,
    softmax,
    training_curves_png,
)
from cifar_assets.ml.model import Architecture, build_resnet18
from cifar_assets.ml.training import EpochMetrics

NAMES = ("a", "b", "c", "d", "e")
# Six predictions over five classes. Class d never occurs (no support, never predicted); class e
# is predicted once but never true. Rows are probabilities; each row's max is its confidence.
PROBABILITIES = np.array(
    [
        [0.70, 0.15, 0.10, 0.03, 0.02],  # true a, predicted a
        [0.20, 0.68, 0.05, 0.04, 0.03],  # true a, predicted b; a ranks 2nd
        [0.04, 0.90, 0.03, 0.02, 0.01],  # true b, predicted b
        [0.01, 0.95, 0.02, 0.01, 0.01],  # true b, predicted b
        [0.50, 0.30, 0.04, 0.10, 0.06],  # true c, predicted a; c ranks last
        [0.10, 0.05, 0.25, 0.18, 0.42],  # true c, predicted e; c ranks 2nd
    ]
)
LABELS = np.array([0, 0, 1, 1, 2, 2])


def hand_example() -> np.ndarray:
    # Logits are log-probabilities plus a different constant per row: softmax must undo both.
    return np.log(PROBABILITIES) + np.arange(6)[:, None] * 3.0


def test_metrics_of_a_hand_worked_example() -> None:
    result = evaluate(hand_example(), LABELS, class_names=NAMES)

    assert result.n == 6
    assert result.accuracy == pytest.approx(3 / 6)
    assert result.confusion.tolist() == [
        [1, 1, 0, 0, 0],
        [0, 2, 0, 0, 0],
        [1, 0, 0, 0, 1],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ]
    # precision = TP / predicted: a 1/2, b 2/3, c 0/0 -> 0, d 0/0 -> 0, e 0/1.
    assert result.precision == pytest.approx([1 / 2, 2 / 3, 0, 0, 0])
    # recall = TP / support: a 1/2, b 2/2, c 0/2, d 0/0 -> 0, e 0/0 -> 0.
    assert result.recall == pytest.approx([1 / 2, 1, 0, 0, 0])
    # F1 of b = 2 * (2/3) * 1 / (2/3 + 1) = 0.8.
    assert result.f1 == pytest.approx([0.5, 0.8, 0, 0, 0])
    assert result.support.tolist() == [2, 2, 2, 0, 0]
    # Macro F1 over the classes that occur (a, b, c, e): (0.5 + 0.8 + 0 + 0) / 4.
    assert result.macro_f1 == pytest.approx(0.325)
    assert result.top_k_accuracy == pytest.approx({1: 3 / 6, 3: 5 / 6, 5: 1.0})
    nll = -(
        math.log(0.70)
        + math.log(0.20)
        + math.log(0.90)
        + math.log(0.95)
        + math.log(0.04)
        + math.log(0.25)
    )
    assert result.nll == pytest.approx(nll / 6)
    # Bins of width 1/15: 0.70 (right) and 0.68 (wrong) share (0.667, 0.733]: |0.5 - 0.69|;
    # 0.90, 0.95, 0.50 and 0.42 each sit alone: |1 - 0.9|, |1 - 0.95|, |0 - 0.5|, |0 - 0.42|.
    expected_ece = (2 * 0.19 + 0.10 + 0.05 + 0.50 + 0.42) / 6
    assert result.ece == pytest.approx(expected_ece)


def test_metrics_agree_with_scikit_learn() -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 10, 500)
    logits = rng.normal(0, 2, (500, 10))
    logits[np.arange(500), labels] += rng.normal(3.0, 1.5, 500)  # about half correct
    logits[:, 9] -= 20.0  # class 9 is never predicted: its precision divides by zero

    result = evaluate(logits, labels)

    predicted = logits.argmax(1)
    assert 0.3 < result.accuracy < 0.8
    assert result.accuracy == pytest.approx(sk.accuracy_score(labels, predicted))
    assert result.macro_f1 == pytest.approx(
        sk.f1_score(labels, predicted, average="macro", zero_division=0)
    )
    precision, recall, f1, support = sk.precision_recall_fscore_support(
        labels, predicted, labels=range(10), zero_division=0
    )
    assert result.precision == pytest.approx(precision)
    assert result.precision[9] == 0.0
    assert result.recall == pytest.approx(recall)
    assert result.f1 == pytest.approx(f1)
    assert result.support.tolist() == support.tolist()
    assert result.confusion.tolist() == sk.confusion_matrix(labels, predicted).tolist()
    for k in (3, 5):
        assert result.top_k_accuracy[k] == pytest.approx(
            sk.top_k_accuracy_score(labels, logits, k=k, labels=range(10))
        )
    assert result.nll == pytest.approx(sk.log_loss(labels, _softmax(logits), labels=range(10)))


def test_to_dict_and_compare() -> None:
    current = evaluate(hand_example(), LABELS, class_names=NAMES)
    worse_logits = hand_example()
    worse_logits[2] = np.log([0.6, 0.1, 0.1, 0.1, 0.1])  # sample 3 (true b) now predicted a
    other = evaluate(worse_logits, LABELS, class_names=NAMES)

    record = json.loads(json.dumps(current.to_dict()))
    assert record["accuracy"] == pytest.approx(0.5)
    assert record["top3_accuracy"] == pytest.approx(5 / 6)
    assert record["per_class"]["b"] == {
        "precision": pytest.approx(2 / 3),
        "recall": 1.0,
        "f1": pytest.approx(0.8),
        "support": 2,
    }
    assert record["confusion_matrix"][2] == [1, 0, 0, 0, 1]

    difference = compare(current, other)
    assert difference["accuracy"] == pytest.approx(
        {"current": 3 / 6, "other": 2 / 6, "delta": 1 / 6}
    )
    assert difference["recall/b"]["delta"] == pytest.approx(0.5)
    assert difference["recall/a"]["delta"] == 0.0
    with pytest.raises(ValueError, match="different classes"):
        compare(current, evaluate(np.zeros((2, 10)), np.array([0, 1])))


def test_evaluate_rejects_mismatched_input() -> None:
    with pytest.raises(ValueError, match=r"shape \(N, 10\)"):
        evaluate(np.zeros((4, 5)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        evaluate(np.zeros((4, 10)), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match=r"1 labels lie outside 0\.\.9 \(first at position 2\)"):
        evaluate(np.zeros((4, 10)), np.array([0, 1, -1, 3]))


def test_plots_are_written_as_png(tmp_path: Path) -> None:
    result = evaluate(hand_example(), LABELS, class_names=NAMES)
    history = [
        EpochMetrics(1, 2.1, 0.3, 1.9, 0.35, 100.0, 10.0, 10.0, 0.1),
        EpochMetrics(2, 1.5, 0.5, 1.4, 0.55, 100.0, 10.0, 0.0, 0.0),
    ]

    paths = [
        confusion_matrix_png(result, tmp_path / "plots" / "confusion.png"),
        training_curves_png(history, tmp_path / "curves.png"),
        per_class_accuracy_png(result, tmp_path / "per_class.png"),
    ]

    sizes = {path.name: imread(path).shape for path in paths}
    # figsize (inches) x 110 dpi
    assert sizes == {
        "confusion.png": (715, 825, 4),
        "curves.png": (462, 1210, 4),
        "per_class.png": (462, 880, 4),
    }
    # Not blank: the confusion plot has many distinct colours.
    assert len(np.unique(imread(paths[0]).reshape(-1, 4), axis=0)) > 50
    with pytest.raises(ValueError, match="No epochs"):
        training_curves_png([], tmp_path / "empty.png")


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_resnet18(Architecture(stem="imagenet"))


def test_logits_embeddings_and_probabilities_agree(network: torch.nn.Module) -> None:
    images = np.random.default_rng(1).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    network.train()

    logits = predict_logits(network, images, batch_size=4)
    features = embed(network, images, batch_size=3)
    probabilities = predict_proba(network, images)

    assert logits.shape == (10, len(CLASSES)) and logits.dtype == np.float32
    assert features.shape == (10, EMBEDDING_DIM) and features.dtype == np.float32
    assert (features >= 0).all()  # average of ReLU outputs
    assert network.training  # the caller's mode is restored
    with torch.inference_mode():
        from_features = network.get_submodule("fc")(torch.from_numpy(features)).numpy()
    np.testing.assert_allclose(from_features, logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probabilities, _softmax(logits), atol=1e-6)
    # Batch size changes nothing in eval mode.
    np.testing.assert_allclose(predict_logits(network, images, batch_size=256), logits, atol=1e-4)


def test_forward_input_checks(network: torch.nn.Module) -> None:
    assert predict_logits(network, np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 10)
    with pytest.raises(ValueError, match=r"uint8 images shaped \(N, 32, 32, 3\), got float32"):
        predict_logits(network, np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(TypeError, match="Linear has no 'conv1' layer"):
        embed(torch.nn.Linear(3, 3), np.zeros((1, 32, 32, 3), np.uint8))


def _softmax(logits: np.ndarray) -> np.ndarray:
    """An independent reference: torch's softmax, in float64."""
    return torch.softmax(torch.from_numpy(logits.astype(np.float64)), dim=1).numpy()


def test_softmax_is_stable_and_keeps_the_dtype() -> None:
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], np.float32)
    probabilities = softmax(logits)
    assert probabilities.dtype == np.float32
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities[0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(probabilities[1], [1 / 3] * 3, rtol=1e-6)
    # e^k / (e + e^2 + e^3) for k = 1, 2, 3
    np.testing.assert_allclose(probabilities[2], [0.09003057, 0.24472847, 0.66524096], rtol=1e-6)
