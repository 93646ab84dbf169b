"""The drift report of one production batch against a model version's baseline, and its plot.

Verdict rule (what retraining reacts to):

- ``data_drift``: the MMD test on embeddings OR the KS test on softmax outputs OR the per-feature
  KS test on the feature-store features flags the batch. Each runs at ``p_val / 3``, so a batch
  from the reference distribution raises the verdict with probability at most ``p_val``. The
  features are in the verdict because the network is built to ignore some input changes that
  still matter: with the embeddings of a randomly initialised ResNet18 (ImageNet stem, which
  downsamples by 4 at once), pixelation at severity 3 left the MMD p-value at up to 0.37 and the
  softmax KS at 1, while the ``pixelation`` feature moved with p < 1e-6 (tests/test_drift.py).
- ``model_drift``: only when the batch has labels: its accuracy is significantly below the
  reference accuracy (Fisher's exact test, one-sided, at ``p_val``).
- ``drift = data_drift or model_drift``.

The label-free uncertainty test (KS on prediction entropy) is reported but does not decide: it
reacts to some shifts and not others, and would add false alarms of its own. The per-feature
table also explains *what* moved (a brightness feature, a noise feature).

``score`` (for a Prometheus gauge) is ``1 - p``, where ``p = min(1, 3 * min(p_mmd, p_softmax,
p_features))`` is the Bonferroni-combined p-value of the three data-drift tests: it lies in
[0, 1], rises with the evidence of drift, and crosses ``1 - p_val`` exactly when ``data_drift``
turns true.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cifar_assets.drift.baseline import DriftBaseline, labelled_correct
from cifar_assets.drift.detectors import (
    DetectorResult,
    DriftDetectorError,
    check_probabilities,
    entropy,
)


@dataclass(frozen=True)
class AccuracyComparison:
    """Batch accuracy against the reference's, with a one-sided test for a drop."""

    reference_accuracy: float
    batch_accuracy: float
    n_reference: int
    n_batch: int
    p_value: float  # Fisher's exact test, alternative: the batch is less accurate
    threshold: float
    significant_drop: bool

    @property
    def difference(self) -> float:
        return self.batch_accuracy - self.reference_accuracy


def compare_accuracy(
    reference_correct: int, reference_n: int, batch_correct: int, batch_n: int, p_val: float
) -> AccuracyComparison:
    """Fisher's exact test on the 2x2 table (correct, wrong) x (reference, batch).

    Exact at every sample size, so small labelled batches (a few dozen feedback labels) are
    judged as fairly as large ones.
    """
    from scipy.stats import fisher_exact

    table = [
        [reference_correct, reference_n - reference_correct],
        [batch_correct, batch_n - batch_correct],
    ]
    # "greater": the odds of being correct are higher for the reference than for the batch.
    p_value = float(fisher_exact(table, alternative="greater").pvalue)
    return AccuracyComparison(
        reference_accuracy=reference_correct / reference_n,
        batch_accuracy=batch_correct / batch_n,
        n_reference=reference_n,
        n_batch=batch_n,
        p_value=p_value,
        threshold=p_val,
        significant_drop=p_value < p_val,
    )


@dataclass(frozen=True)
class DriftReport:
    model_version: int
    n: int
    results: list[DetectorResult]
    data_drift: bool
    model_drift: bool
    moved_features: list[str]
    combined_p_value: float  # Bonferroni-combined p-value of the data-drift detectors
    p_val: float
    batch_accuracy: float | None  # None when the batch has no labels
    accuracy: AccuracyComparison | None  # None without labels on both sides

    @property
    def drift(self) -> bool:
        return self.data_drift or self.model_drift

    @property
    def score(self) -> float:
        """``1 - combined p-value`` in [0, 1]; above ``1 - p_val`` exactly when data drifted."""
        return 1.0 - self.combined_p_value

    def result(self, name: str) -> DetectorResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(
            f"No detector named {name!r} in this report; it has {[r.name for r in self.results]}."
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "n": self.n,
            "drift": self.drift,
            "data_drift": self.data_drift,
            "model_drift": self.model_drift,
            "score": self.score,
            "combined_p_value": self.combined_p_value,
            "p_val": self.p_val,
            "moved_features": list(self.moved_features),
            "batch_accuracy": self.batch_accuracy,
            "accuracy": None
            if self.accuracy is None
            else asdict(self.accuracy) | {"difference": self.accuracy.difference},
            "detectors": {result.name: result.to_dict() for result in self.results},
        }


def check_batch(
    baseline: DriftBaseline,
    embeddings: np.ndarray,
    probabilities: np.ndarray,
    features: pd.DataFrame,
    labels: np.ndarray | None = None,
    log: Callable[[str], None] | None = None,
) -> DriftReport:
    """Run every detector of ``baseline`` on one batch (rows of the inputs are the same images).
    The MMD permutation test, the one slow part, reports its progress to ``log``."""
    probabilities = check_probabilities(probabilities, "batch probabilities")
    n = probabilities.shape[0]
    for what, rows in (("batch embeddings", len(embeddings)), ("batch features", len(features))):
        if rows != n:
            raise DriftDetectorError(
                f"{what}: {rows} rows, but the probabilities have {n}; pass the embeddings, "
                "probabilities and features of the same images in the same order."
            )
    mmd = baseline.mmd.score(embeddings, log=log)
    softmax = baseline.softmax_ks.score(probabilities)
    uncertainty = baseline.uncertainty.score(probabilities)
    feature_result = baseline.features.score(features)
    data_results = (mmd, softmax, feature_result)
    combined = min(1.0, len(data_results) * min(result.p_value for result in data_results))

    batch_accuracy: float | None = None
    accuracy: AccuracyComparison | None = None
    if labels is not None:
        n_labelled, n_correct = labelled_correct(probabilities, labels, "batch labels")
        if n_labelled:
            batch_accuracy = n_correct / n_labelled
            if baseline.reference.n_labelled:
                accuracy = compare_accuracy(
                    baseline.reference.n_correct,
                    baseline.reference.n_labelled,
                    n_correct,
                    n_labelled,
                    baseline.p_val,
                )
    return DriftReport(
        model_version=baseline.model_version,
        n=n,
        results=[mmd, softmax, uncertainty, feature_result],
        data_drift=any(result.drift for result in data_results),
        model_drift=accuracy is not None and accuracy.significant_drop,
        moved_features=list(feature_result.details["moved"]),
        combined_p_value=combined,
        p_val=baseline.p_val,
        batch_accuracy=batch_accuracy,
        accuracy=accuracy,
    )


def feature_distribution_png(
    reference_features: pd.DataFrame,
    batch_features: pd.DataFrame,
    moved_features: list[str],
    path: Path,
    max_features: int = 6,
) -> Path:
    """Overlaid histograms (reference against batch) of the first ``max_features`` moved features."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import ks_2samp

    shown = moved_features[:max_features]
    for name in shown:
        for what, table in (("reference", reference_features), ("batch", batch_features)):
            if name not in table.columns:
                raise DriftDetectorError(
                    f"feature_distribution_png: feature {name!r} is not a column of the {what} "
                    "features; pass the report's moved_features with the tables it was computed on."
                )
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = max(1, min(3, len(shown)))
    rows = max(1, -(-len(shown) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    if not shown:
        axes[0][0].axis("off")
        axes[0][0].text(0.5, 0.5, "No feature moved", ha="center", va="center", fontsize=14)
    for index, axis in enumerate(axes.flat):
        if index >= len(shown):
            if shown:
                axis.axis("off")
            continue
        name = shown[index]
        reference = reference_features[name].to_numpy(dtype=np.float64)
        batch = batch_features[name].to_numpy(dtype=np.float64)
        bins = np.histogram_bin_edges(np.concatenate([reference, batch]), bins=30)
        axis.hist(reference, bins=bins, density=True, alpha=0.55, label="reference")
        axis.hist(batch, bins=bins, density=True, alpha=0.55, label="batch")
        axis.set_title(f"{name} (KS {ks_2samp(reference, batch).statistic:.2f})", fontsize=10)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def drift_overview_png(
    report: DriftReport, baseline: DriftBaseline, batch_probabilities: np.ndarray, path: Path
) -> Path:
    """One picture of a drift check: each detector's p-value against its threshold (a bar past
    the line is a flag), the predicted classes and the prediction entropy of the reference against
    the batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cifar_assets.data.imageset import CLASSES

    batch = check_probabilities(batch_probabilities, "batch probabilities")
    reference = baseline.softmax_ks.reference_probabilities()
    if batch.shape[1] != reference.shape[1]:
        raise DriftDetectorError(
            f"drift_overview_png: the batch has {batch.shape[1]} classes, the baseline "
            f"{reference.shape[1]}; pass the probabilities the report was computed on."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (test_axis, class_axis, entropy_axis) = plt.subplots(1, 3, figsize=(14, 3.8))

    names = [result.name for result in report.results]
    strength = [-np.log10(max(result.p_value, 1e-300)) for result in report.results]
    limits = [-np.log10(result.threshold) for result in report.results]
    colours = ["tab:red" if result.drift else "tab:blue" for result in report.results]
    rows = np.arange(len(names))
    test_axis.barh(rows, np.minimum(strength, 20.0), color=colours)
    test_axis.scatter(limits, rows, marker="|", s=400, color="black", label="threshold")
    test_axis.set_yticks(rows, names)
    test_axis.invert_yaxis()
    test_axis.set_xlabel("-log10 p-value (capped at 20)")
    verdict = "DRIFT" if report.drift else "no drift"
    test_axis.set_title(f"{verdict}: score {report.score:.3f}, n = {report.n}", fontsize=10)
    test_axis.legend(fontsize=8, loc="lower right")

    classes = list(CLASSES) if reference.shape[1] == len(CLASSES) else None
    count = reference.shape[1]
    shares = [
        np.bincount(values.argmax(axis=1), minlength=count) / max(len(values), 1)
        for values in (reference, batch)
    ]
    positions = np.arange(count)
    class_axis.bar(positions - 0.2, shares[0], width=0.4, label="reference")
    class_axis.bar(positions + 0.2, shares[1], width=0.4, label="batch")
    class_axis.set_xticks(positions, classes or [str(i) for i in positions], rotation=60)
    class_axis.set_ylabel("share of predictions")
    class_axis.set_title("predicted classes", fontsize=10)
    class_axis.legend(fontsize=8)

    reference_entropy, batch_entropy = entropy(reference), entropy(batch)
    bins = np.linspace(0.0, np.log(count), 31)
    entropy_axis.hist(reference_entropy, bins=bins, density=True, alpha=0.55, label="reference")
    entropy_axis.hist(batch_entropy, bins=bins, density=True, alpha=0.55, label="batch")
    entropy_axis.set_xlabel("prediction entropy (nats)")
    entropy_axis.set_title(
        f"uncertainty: mean {reference_entropy.mean():.2f} -> {batch_entropy.mean():.2f}",
        fontsize=10,
    )
    entropy_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
