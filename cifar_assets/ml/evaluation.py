"""Model evaluation: logits from a network, classification metrics from logits, and plots.

``evaluate`` is pure numpy on logits and labels, so the same figures come from the PyTorch model,
its ONNX export, the INT8 model or Triton's responses. Plots use matplotlib's object API with the
Agg canvas that ``Figure.savefig`` picks for PNG, so no global backend is switched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cifar_assets.data.imageset import CLASSES
from cifar_assets.progress import ProgressReporter

if TYPE_CHECKING:
    import torch

    from cifar_assets.ml.registry import Registry
    from cifar_assets.ml.training import EpochMetrics

ECE_BINS = 15
TOP_K = (1, 3, 5)


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Metrics of one set of predictions. Per-class arrays follow ``class_names``; the confusion
    matrix has true classes in rows and predicted classes in columns."""

    n: int
    accuracy: float
    macro_f1: float
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    confusion: np.ndarray
    ece: float
    top_k_accuracy: dict[int, float]
    nll: float
    class_names: tuple[str, ...]

    def scalars(self) -> dict[str, float]:
        """The headline figures, flat (for MLflow metrics and asset metadata)."""
        figures = {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "ece": self.ece,
            "nll": self.nll,
        }
        figures.update({f"top{k}_accuracy": value for k, value in self.top_k_accuracy.items()})
        return figures

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-compatible values."""
        return {
            "n": self.n,
            **self.scalars(),
            "per_class": {
                name: {
                    "precision": float(self.precision[i]),
                    "recall": float(self.recall[i]),
                    "f1": float(self.f1[i]),
                    "support": int(self.support[i]),
                }
                for i, name in enumerate(self.class_names)
            },
            "confusion_matrix": self.confusion.tolist(),
            "class_names": list(self.class_names),
        }


def predict_logits(
    model: torch.nn.Module,
    images: np.ndarray,
    batch_size: int = 256,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> np.ndarray:
    """float32 logits (N, classes) for uint8 images (N, 32, 32, 3), in eval mode."""
    return batched_forward(model, images, batch_size, device, log=log, what="predictions")


def batched_forward(
    model: torch.nn.Module,
    images: np.ndarray,
    batch_size: int,
    device: str,
    forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
    log: Callable[[str], None] | None = None,
    what: str = "forward pass",
) -> np.ndarray:
    """Run ``forward(model, batch)`` (default: the model itself) over normalised batches of uint8
    NHWC images under inference mode and stack the float32 outputs. Progress, named ``what``,
    goes to ``log`` at least every 10 s and to a bar (:mod:`cifar_assets.progress`).

    The model is put in eval mode and on ``device`` for the call, then returned to its former
    mode and device: callers keep the model they passed in.
    """
    import torch

    from cifar_assets.ml.model import normalise_uint8

    _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    run = forward if forward is not None else (lambda network, batch: network(batch))
    former_device, was_training = next(model.parameters()).device, model.training
    model.to(device).eval()
    outputs = []
    try:
        with (
            torch.inference_mode(),
            ProgressReporter(what, len(images), unit="image", log=log) as progress,
        ):
            # max(..., 1): an empty input still runs once, so the output keeps its width.
            for start in range(0, max(len(images), 1), batch_size):
                batch = torch.from_numpy(normalise_uint8(images[start : start + batch_size]))
                outputs.append(run(model, batch.to(device)).float().cpu().numpy())
                progress.update(len(batch))
    finally:
        model.to(former_device).train(was_training)
    return np.concatenate(outputs).astype(np.float32, copy=False)


def _check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise ValueError(
            f"Expected uint8 images shaped (N, 32, 32, 3), got {images.dtype} {images.shape}; "
            "pass raw pixels (ImageSet.images), not normalised network input."
        )


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities of logits (N, C), row by row, in the logits' float dtype; the one
    softmax of the library (scipy's, which shifts by the row maximum, so large logits do not
    overflow). The Triton model files keep their own copy: they must run on their own."""
    from scipy.special import softmax as scipy_softmax

    return np.asarray(scipy_softmax(logits, axis=1))


def evaluate(
    logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str] = CLASSES
) -> Evaluation:
    """All metrics of ``logits`` (N, C) against int ``labels`` (N,).

    Zero division gives 0 (a class never predicted has precision 0). Macro F1 averages over the
    classes present in the labels or the predictions, as scikit-learn does: a class absent from
    both has no defined F1 and must not drag the mean to zero.
    """
    from scipy.special import log_softmax

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    classes = len(class_names)
    if logits.ndim != 2 or logits.shape[1] != classes:
        raise ValueError(
            f"logits must have shape (N, {classes}) for {classes} class names, got {logits.shape}."
        )
    if labels.shape != (logits.shape[0],):
        raise ValueError(
            f"labels must have shape ({logits.shape[0]},) to match the logits, got {labels.shape}."
        )
    if len(labels) == 0:
        raise ValueError("Cannot evaluate zero predictions: pass at least one labelled image.")
    bad = (labels < 0) | (labels >= classes)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} labels lie outside 0..{classes - 1} (first at position "
            f"{int(np.flatnonzero(bad)[0])}); evaluate labelled images only."
        )

    predicted = logits.argmax(axis=1)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    true_positive = np.diag(confusion).astype(np.float64)
    predicted_count = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    precision = _safe_divide(true_positive, predicted_count)
    recall = _safe_divide(true_positive, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    present = (support + predicted_count) > 0

    probabilities = softmax(logits)
    log_probabilities = log_softmax(logits, axis=1)
    ranked = np.argsort(-logits, axis=1, kind="stable")
    top_k = {
        k: float((ranked[:, : min(k, classes)] == labels[:, None]).any(axis=1).mean())
        for k in TOP_K
    }
    return Evaluation(
        n=len(labels),
        accuracy=float((predicted == labels).mean()),
        macro_f1=float(f1[present].mean()),
        precision=precision,
        recall=recall,
        f1=f1,
        support=support,
        confusion=confusion,
        ece=expected_calibration_error(probabilities, labels),
        top_k_accuracy=top_k,
        nll=float(-log_probabilities[np.arange(len(labels)), labels].mean()),
        class_names=tuple(class_names),
    )


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Weighted mean |accuracy - confidence| over equal-width bins (lo, hi] of max probability."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    bin_index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    error = 0.0
    for b in np.unique(bin_index):
        members = bin_index == b
        error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def compare(current: Evaluation, other: Evaluation) -> dict[str, dict[str, float]]:
    """Each headline metric and each class's recall of ``current`` beside ``other``, with the
    difference current - other (positive accuracy delta: current is better; for ece and nll
    lower is better)."""
    if current.class_names != other.class_names:
        raise ValueError(
            f"Cannot compare evaluations over different classes: {current.class_names} vs "
            f"{other.class_names}."
        )
    pairs = {name: (value, other.scalars()[name]) for name, value in current.scalars().items()}
    for i, name in enumerate(current.class_names):
        pairs[f"recall/{name}"] = (float(current.recall[i]), float(other.recall[i]))
    return {
        name: {"current": mine, "other": theirs, "delta": mine - theirs}
        for name, (mine, theirs) in pairs.items()
    }


def confusion_matrix_png(evaluation: Evaluation, path: Path) -> Path:
    """Row-normalised confusion matrix, with counts in the cells."""
    figure, axes = _figure(7.5, 6.5)
    rows = evaluation.confusion.sum(axis=1, keepdims=True)
    shares = _safe_divide(evaluation.confusion.astype(np.float64), rows)
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, label="share of the true class")
    ticks = np.arange(len(evaluation.class_names))
    axes.set_xticks(ticks, evaluation.class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, evaluation.class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (row, col), count in np.ndenumerate(evaluation.confusion):
        if count:
            colour = "white" if shares[row, col] > 0.5 else "black"
            axes.text(col, row, str(count), ha="center", va="center", fontsize=7, color=colour)
    axes.set_title(f"Confusion matrix (accuracy {evaluation.accuracy:.3f}, n={evaluation.n})")
    return _save(figure, path)


def training_curves_png(history: Sequence[EpochMetrics], path: Path) -> Path:
    """Loss and accuracy per epoch, training beside validation."""
    if not history:
        raise ValueError(f"No epochs in the history: nothing to plot into {path}.")
    figure, (loss_axes, accuracy_axes) = _figure(11, 4.2, columns=2)
    epochs = [entry.epoch for entry in history]
    loss_axes.plot(epochs, [entry.train_loss for entry in history], "o-", label="train")
    accuracy_axes.plot(epochs, [entry.train_accuracy for entry in history], "o-", label="train")
    validated = [entry for entry in history if entry.val_loss is not None]
    if validated:
        val_epochs = [entry.epoch for entry in validated]
        loss_axes.plot(val_epochs, [entry.val_loss for entry in validated], "o-", label="val")
        accuracy_axes.plot(
            val_epochs, [entry.val_accuracy for entry in validated], "o-", label="val"
        )
    loss_axes.set_title("loss (train includes label smoothing)")
    accuracy_axes.set_title("accuracy (train on augmented batches)")
    for axes in (loss_axes, accuracy_axes):
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        axes.legend()
    return _save(figure, path)


def per_class_accuracy_png(evaluation: Evaluation, path: Path) -> Path:
    """Recall per class (the share of each true class classified correctly)."""
    figure, axes = _figure(8, 4.2)
    positions = np.arange(len(evaluation.class_names))
    axes.bar(positions, evaluation.recall, color="tab:blue")
    axes.axhline(evaluation.accuracy, color="tab:red", linestyle="--", label="overall accuracy")
    axes.set_xticks(positions, evaluation.class_names, rotation=45, ha="right")
    axes.set_ylim(0, 1)
    axes.set_ylabel("accuracy (recall)")
    axes.legend()
    axes.set_title(f"Per-class accuracy (n={evaluation.n})")
    return _save(figure, path)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    denominator = np.broadcast_to(denominator, numerator.shape)
    result = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=result, where=denominator != 0)
    return result


def _figure(width: float, height: float, columns: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(1, columns)
    return figure, axes


def _save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110)
    return path


@dataclass(frozen=True, eq=False)
class ModelEvaluationRun:
    """A trained model evaluated on the test split and compared with the current champion on the
    same images; its figures are logged to the training run."""

    evaluation: Evaluation
    confusion_png: Path
    per_class_png: Path
    champion_version: int | None = None
    champion_evaluation: Evaluation | None = None

    def per_class_rows(self) -> list[dict[str, Any]]:
        e = self.evaluation
        return [
            {
                "class": name,
                "precision": round(float(e.precision[i]), 4),
                "recall": round(float(e.recall[i]), 4),
                "f1": round(float(e.f1[i]), 4),
                "support": int(e.support[i]),
            }
            for i, name in enumerate(e.class_names)
        ]

    def vs_champion_rows(self) -> list[dict[str, Any]]:
        """metric, this model, the champion, delta; empty when there is no champion."""
        if self.champion_evaluation is None:
            return []
        return [
            {"metric": name, **{k: round(v, 4) for k, v in values.items()}}
            for name, values in compare(self.evaluation, self.champion_evaluation).items()
        ]


def evaluate_against_champion(
    model_dir: Path,
    images: np.ndarray,
    labels: np.ndarray,
    out_dir: Path,
    *,
    models: Registry,
    run_id: str,
    log: Callable[[str], None] = print,
) -> ModelEvaluationRun:
    """Evaluate the model saved in ``model_dir`` (and MLflow's champion, when there is one) on
    ``images``; write the confusion matrix and per-class accuracy into ``out_dir`` and log the
    test metrics (``test_<name>``) and plots to the MLflow run ``run_id``."""
    from cifar_assets.ml import tracking
    from cifar_assets.ml.model import load_model
    from cifar_assets.ml.registry import RegistryLookupError

    evaluation = evaluate(predict_logits(load_model(model_dir), images, log=log), labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    confusion = confusion_matrix_png(evaluation, out_dir / "confusion_matrix.png")
    per_class = per_class_accuracy_png(evaluation, out_dir / "per_class_accuracy.png")
    tracking.log_epoch_metrics(
        models.uri, run_id, 0, {f"test_{k}": v for k, v in evaluation.scalars().items()}
    )
    for plot in (confusion, per_class):
        tracking.log_artifact(models.uri, run_id, plot, "plots")
    try:
        champion = models.champion()
    except RegistryLookupError:  # nothing registered yet: the first model
        champion = None
    if champion is None:
        return ModelEvaluationRun(evaluation, confusion, per_class)
    champion_model = models.load(champion.version)
    champion_evaluation = evaluate(predict_logits(champion_model, images, log=log), labels)
    delta = evaluation.accuracy - champion_evaluation.accuracy
    log(f"Accuracy against champion v{champion.version}: {delta:+.4f}")
    return ModelEvaluationRun(
        evaluation, confusion, per_class, champion.version, champion_evaluation
    )
