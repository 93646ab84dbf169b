"""The drift baseline of one model version: its fitted detectors and a summary of the reference.

A baseline is fitted on held-out data the model did not train on (the test or validation split),
so the reference accuracy it records is an honest estimate of what the model does on data from
the training distribution. It belongs to exactly one model version: the embeddings and softmax
outputs it compares against come from that model, so a baseline loaded for another version raises
:class:`BaselineVersionError` instead of comparing outputs of two different networks.

Significance levels: ``p_val`` is the false alarm rate of the data-drift verdict. The verdict
fires when any of the three data-drift detectors (MMD on embeddings, KS on softmax outputs, KS on
the feature-store features) fires, so each of them runs at ``p_val / 3`` (Bonferroni); the
label-free uncertainty detector, which is reported but does not decide, runs at ``p_val``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from cifar_assets.drift.detectors import (
    DriftDetectorError,
    EmbeddingMMDDetector,
    FeatureKSDetector,
    SoftmaxKSDetector,
    UncertaintyKSDetector,
    check_probabilities,
)
from cifar_assets.fileio import write_text_atomic

BASELINE_FORMAT_VERSION = 1
BASELINE_FILE = "baseline.json"
DATA_DETECTORS = 3  # MMD on embeddings, KS on softmax outputs, KS on features


MODEL_FILE = "model.json"  # beside the detectors: the registered version and its model folder


def baseline_dir(storage_dir: Path, model_version: int) -> Path:
    """Where the detectors of one registered model version are kept."""
    return storage_dir / "drift_baseline" / f"v{model_version}"


class BaselineVersionError(ValueError):
    """A saved baseline belongs to another model version or another format version."""


@dataclass(frozen=True)
class ReferenceSummary:
    """What the reference batch looked like: size, labelled accuracy, features, when fitted."""

    n: int
    n_labelled: int
    n_correct: int
    feature_names: list[str]
    fitted_at: str

    @property
    def accuracy(self) -> float | None:
        return self.n_correct / self.n_labelled if self.n_labelled else None


@dataclass
class DriftBaseline:
    model_version: int
    p_val: float
    reference: ReferenceSummary
    mmd: EmbeddingMMDDetector
    softmax_ks: SoftmaxKSDetector
    uncertainty: UncertaintyKSDetector
    features: FeatureKSDetector

    @property
    def reference_accuracy(self) -> float | None:
        return self.reference.accuracy

    def save(self, directory: Path) -> None:
        """Write ``baseline.json`` and one folder per detector into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        for name, detector in self._detectors().items():
            detector.save(directory / name)
        summary = {
            "format_version": BASELINE_FORMAT_VERSION,
            "model_version": self.model_version,
            "p_val": self.p_val,
            "reference": {
                "n": self.reference.n,
                "n_labelled": self.reference.n_labelled,
                "n_correct": self.reference.n_correct,
                "accuracy": self.reference.accuracy,
                "feature_names": self.reference.feature_names,
                "fitted_at": self.reference.fitted_at,
            },
            "detectors": {name: detector.params() for name, detector in self._detectors().items()},
        }
        write_text_atomic(directory / BASELINE_FILE, json.dumps(summary, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path, expected_model_version: int | None = None) -> DriftBaseline:
        """Read a saved baseline; with ``expected_model_version``, refuse one of another model."""
        meta = read_baseline_metadata(directory)
        # baselines written before versions were ints hold "7": read either
        if (
            expected_model_version is not None
            and int(meta["model_version"]) != expected_model_version
        ):
            raise BaselineVersionError(
                f"The drift baseline in {directory} belongs to model version "
                f"{meta['model_version']}, not {expected_model_version}; fit a baseline for "
                f"model version {expected_model_version} (re-materialize drift_baseline)."
            )
        reference = meta["reference"]
        return cls(
            model_version=int(meta["model_version"]),
            p_val=float(meta["p_val"]),
            reference=ReferenceSummary(
                n=int(reference["n"]),
                n_labelled=int(reference["n_labelled"]),
                n_correct=int(reference["n_correct"]),
                feature_names=list(reference["feature_names"]),
                fitted_at=str(reference["fitted_at"]),
            ),
            mmd=EmbeddingMMDDetector.load(directory / "mmd"),
            softmax_ks=SoftmaxKSDetector.load(directory / "softmax_ks"),
            uncertainty=UncertaintyKSDetector.load(directory / "uncertainty"),
            features=FeatureKSDetector.load(directory / "features"),
        )

    def _detectors(
        self,
    ) -> dict[
        str, EmbeddingMMDDetector | SoftmaxKSDetector | UncertaintyKSDetector | FeatureKSDetector
    ]:
        return {
            "mmd": self.mmd,
            "softmax_ks": self.softmax_ks,
            "uncertainty": self.uncertainty,
            "features": self.features,
        }


def read_baseline_metadata(directory: Path) -> dict[str, Any]:
    """``baseline.json`` of a saved baseline (cheap: no alibi-detect import), format-checked."""
    path = directory / BASELINE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No drift baseline at {directory}: {BASELINE_FILE} is missing. Materialize the "
            "drift_baseline asset (or call fit_baseline(...).save(directory)) first."
        )
    meta: dict[str, Any] = json.loads(path.read_text())
    if meta.get("format_version") != BASELINE_FORMAT_VERSION:
        raise BaselineVersionError(
            f"{path} has baseline format version {meta.get('format_version')}, this code reads "
            f"version {BASELINE_FORMAT_VERSION}; fit the baseline again with this code."
        )
    return meta


def labelled_correct(probabilities: np.ndarray, labels: Any, what: str) -> tuple[int, int]:
    """(number labelled, number predicted correctly); label -1 means unlabelled and is skipped."""
    label_array = np.asarray(labels)
    if label_array.shape != (probabilities.shape[0],):
        raise DriftDetectorError(
            f"{what}: labels have shape {label_array.shape}, expected ({probabilities.shape[0]},) "
            "to match the probabilities row for row."
        )
    label_array = label_array.astype(np.int64)
    if ((label_array < -1) | (label_array >= probabilities.shape[1])).any():
        raise DriftDetectorError(
            f"{what}: labels must lie in 0..{probabilities.shape[1] - 1}, or be -1 for unlabelled "
            f"images; got values {np.unique(label_array)[:10].tolist()}."
        )
    known = label_array >= 0
    predicted = probabilities.argmax(axis=1)
    return int(known.sum()), int((predicted[known] == label_array[known]).sum())


def fit_baseline(
    embeddings: np.ndarray,
    probabilities: np.ndarray,
    features: pd.DataFrame,
    labels: np.ndarray | None = None,
    *,
    model_version: int,
    p_val: float = 0.05,
    n_permutations: int = 100,
    projection_dim: int = 32,
    feature_correction: Literal["bonferroni", "fdr"] = "bonferroni",
    seed: int = 0,
) -> DriftBaseline:
    """Fit every detector on one reference batch (rows of the three inputs describe the same
    images, in the same order) of held-out data, for the model version named."""
    probabilities = check_probabilities(probabilities, "reference probabilities")
    n = probabilities.shape[0]
    for what, rows in (
        ("reference embeddings", len(embeddings)),
        ("reference features", len(features)),
    ):
        if rows != n:
            raise DriftDetectorError(
                f"{what}: {rows} rows, but the probabilities have {n}; pass the embeddings, "
                "probabilities and features of the same images in the same order."
            )
    n_labelled, n_correct = (
        (0, 0) if labels is None else labelled_correct(probabilities, labels, "reference labels")
    )
    level = p_val / DATA_DETECTORS
    feature_detector = FeatureKSDetector(level, correction=feature_correction).fit(features)
    return DriftBaseline(
        model_version=int(model_version),
        p_val=float(p_val),
        reference=ReferenceSummary(
            n=n,
            n_labelled=n_labelled,
            n_correct=n_correct,
            feature_names=list(feature_detector.feature_names),
            fitted_at=datetime.now(UTC).isoformat(timespec="seconds"),
        ),
        mmd=EmbeddingMMDDetector(
            level, n_permutations=n_permutations, projection_dim=projection_dim, seed=seed
        ).fit(embeddings),
        softmax_ks=SoftmaxKSDetector(level).fit(probabilities),
        uncertainty=UncertaintyKSDetector(p_val).fit(probabilities),
        features=feature_detector,
    )
