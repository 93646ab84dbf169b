"""Drift detectors behind the project's own small interface: ``fit`` / ``score`` / ``save`` / ``load``.

Four detectors, each answering one question about a batch of production data:

- :class:`EmbeddingMMDDetector` (data drift): do the model's penultimate-layer embeddings come from
  the reference distribution? A maximum mean discrepancy permutation test on a PCA projection.
- :class:`SoftmaxKSDetector` (data drift, black-box shift detection): did the distribution of the
  ten softmax outputs move? Kolmogorov-Smirnov per class, Bonferroni-corrected.
- :class:`UncertaintyKSDetector` (model drift, label-free): did the model become less sure? A
  one-sided KS test on the entropy of the softmax outputs.
- :class:`FeatureKSDetector` (explanation): which feature-store features moved? KS per feature,
  corrected for the number of features, sorted by the KS statistic.

Licence: the statistical tests run in alibi-detect 0.13, which is under the Business Source
License 1.1 (no production use without a commercial licence). Callers only ever see
:class:`DetectorResult` and the four methods above, so replacing alibi-detect touches this module
alone: the KS tests are ``scipy.stats.ks_2samp`` per column, and the MMD test is a Gaussian-kernel
MMD² with a permutation loop in torch (about forty lines). Each detector is saved with alibi-detect's
own ``save_detector`` (a ``config.toml`` plus ``.npy`` arrays, no pickles) beside a
``detector.json`` with the project's parameters; alibi-detect is imported only inside the methods
that use it, because its import takes about 15 s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import numpy as np
import pandas as pd

from cifar_assets.data.imageset import CLASSES
from cifar_assets.fileio import write_text_atomic
from cifar_assets.progress import heartbeat

if TYPE_CHECKING:
    from alibi_detect.cd import KSDrift, MMDDrift

DetectorKind = Literal["data", "model", "feature"]
DETECTOR_FORMAT_VERSION = 1
PARAMS_FILE = "detector.json"
ARRAYS_FILE = "arrays.npz"
ALIBI_DIR = "alibi"


@dataclass(frozen=True)
class DetectorResult:
    """One detector's answer for one batch. ``drift`` is ``p_value < threshold``."""

    name: str
    kind: DetectorKind
    drift: bool
    p_value: float
    threshold: float
    distance: float | None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DriftDetectorError(ValueError):
    """A detector was used wrongly or given malformed data; the message says how to fix it."""


class _AlibiDetector:
    """Shared save/load and bookkeeping; subclasses set ``name``/``kind`` and build the test."""

    name: ClassVar[str]
    kind: ClassVar[DetectorKind]

    def __init__(self, p_val: float = 0.05) -> None:
        if not 0.0 < p_val < 1.0:
            raise DriftDetectorError(
                f"{type(self).__name__}: p_val={p_val} is not a significance level; pass a value "
                "strictly between 0 and 1, such as 0.05."
            )
        self.p_val = float(p_val)
        self._alibi: Any = None

    def params(self) -> dict[str, Any]:
        """Constructor arguments, stored in ``detector.json`` so ``load`` rebuilds the same detector."""
        return {"p_val": self.p_val}

    def _arrays(self) -> dict[str, np.ndarray]:
        return {}

    def _restore_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        return None

    def _result(self, p_value: float, distance: float, details: dict[str, Any]) -> DetectorResult:
        """This detector's answer: drift when ``p_value`` is below its significance level."""
        return DetectorResult(
            name=self.name,
            kind=self.kind,
            drift=p_value < self.p_val,
            p_value=p_value,
            threshold=self.p_val,
            distance=distance,
            details=details,
        )

    def _require_fitted(self) -> Any:
        if self._alibi is None:
            raise DriftDetectorError(
                f"{type(self).__name__} has no reference yet: call fit(reference) or "
                f"{type(self).__name__}.load(directory) before score(batch)."
            )
        return self._alibi

    def save(self, directory: Path) -> None:
        from alibi_detect.saving import save_detector

        detector = self._require_fitted()
        # Created first: alibi-detect logs a warning whenever it has to create the folder itself.
        (directory / ALIBI_DIR).mkdir(parents=True, exist_ok=True)
        save_detector(detector, directory / ALIBI_DIR)
        arrays = self._arrays()
        if arrays:
            np.savez(directory / ARRAYS_FILE, **arrays)
        meta = {
            "type": type(self).__name__,
            "format_version": DETECTOR_FORMAT_VERSION,
            "params": self.params(),
        }
        write_text_atomic(directory / PARAMS_FILE, json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> Self:
        from alibi_detect.saving import load_detector

        meta_file = directory / PARAMS_FILE
        config = directory / ALIBI_DIR / "config.toml"
        for required in (meta_file, config):
            if not required.is_file():
                raise FileNotFoundError(
                    f"Detector file {required} is missing: {directory} is not a saved "
                    f"{cls.__name__}. Fit the detector again and save it there."
                )
        meta = json.loads(meta_file.read_text())
        if meta.get("type") != cls.__name__:
            raise DriftDetectorError(
                f"{meta_file} holds a {meta.get('type')!r}, not a {cls.__name__}; load it with "
                f"that class, or point to the {cls.__name__}'s directory."
            )
        if meta.get("format_version") != DETECTOR_FORMAT_VERSION:
            raise DriftDetectorError(
                f"{meta_file} has format version {meta.get('format_version')}, this code reads "
                f"version {DETECTOR_FORMAT_VERSION}; fit and save the detector again."
            )
        detector = cls(**meta["params"])
        # Passing config.toml itself means load_detector never falls back to unpickling meta.dill.
        detector._alibi = load_detector(config)
        arrays_file = directory / ARRAYS_FILE
        if arrays_file.is_file():
            with np.load(arrays_file, allow_pickle=False) as data:
                detector._restore_arrays({key: data[key] for key in data.files})
        return detector


def _matrix(values: Any, what: str, columns: int | None = None) -> np.ndarray:
    """A finite float32 (N, D) array, or an error naming ``what`` and the problem."""
    array = np.asarray(values)
    if array.ndim != 2 or array.shape[0] == 0:
        raise DriftDetectorError(
            f"{what}: expected a non-empty 2-D array (N, D), got shape {array.shape}."
        )
    if columns is not None and array.shape[1] != columns:
        raise DriftDetectorError(
            f"{what}: expected {columns} columns like the reference, got {array.shape[1]}; "
            "score batches produced by the same model and feature code as the reference."
        )
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
        raise DriftDetectorError(
            f"{what}: rows {rows[:5].tolist()} hold NaN or infinite values; drop or repair them "
            "before checking for drift."
        )
    return array


def check_probabilities(probabilities: Any, what: str) -> np.ndarray:
    """Softmax outputs (N, C) whose rows sum to one; logits are refused with a hint."""
    array = _matrix(probabilities, what)
    sums = array.sum(axis=1)
    if (array < 0).any() or (array > 1).any() or not np.allclose(sums, 1.0, atol=1e-3):
        raise DriftDetectorError(
            f"{what}: rows must be probabilities in [0, 1] summing to 1 (row sums range "
            f"{sums.min():.3f}..{sums.max():.3f}); pass softmax outputs, not logits."
        )
    return array


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats of each row of softmax outputs, shape (N,)."""
    clipped = np.clip(probabilities.astype(np.float64), 1e-12, 1.0)
    return -(clipped * np.log(clipped)).sum(axis=1)


def _ks_batch(detector: KSDrift, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw per-column KS p-values and statistics of a batch against the reference."""
    prediction = detector.predict(batch, drift_type="feature")
    data = prediction["data"]
    return np.asarray(data["p_val"], dtype=np.float64), np.asarray(data["distance"], np.float64)


class EmbeddingMMDDetector(_AlibiDetector):
    """MMD permutation test on embeddings projected onto the reference's top principal components.

    The projection (fitted on the reference, then fixed) keeps the directions in which the
    reference varies and drops the hundreds of near-constant ones, so the Gaussian kernel's
    median-heuristic bandwidth measures the distances that matter. Measured on a randomly
    initialised ResNet18 (300 reference, batches of 200): 32 components kept 86% of the reference
    variance and flagged the same corrupted batches as the full 512 dimensions, with no false
    alarm on 40 clean batches for 8, 32 or 512 components. The permutations are drawn from torch's
    generator seeded by ``seed``, so a batch gets the same p-value every time it is checked (a
    fixed set of permutations chosen independently of the data keeps the test valid). The p-value
    is alibi-detect's, ``b / B`` where ``b`` of the ``B = n_permutations`` permuted statistics
    reach the observed one (so it can be 0); the report gives ``B`` from this detector's
    parameters.
    """

    name = "mmd_embeddings"
    kind = "data"

    def __init__(
        self,
        p_val: float = 0.05,
        n_permutations: int = 100,
        projection_dim: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(p_val)
        if n_permutations < 1 / p_val:
            raise DriftDetectorError(
                f"EmbeddingMMDDetector: n_permutations={n_permutations} cannot reach p-values "
                f"below p_val={p_val}; use at least {int(np.ceil(1 / p_val))} (100 or more)."
            )
        self.n_permutations = int(n_permutations)
        self.projection_dim = int(projection_dim)
        self.seed = int(seed)
        self._mean: np.ndarray | None = None
        self._components: np.ndarray | None = None
        self._explained: float | None = None

    def params(self) -> dict[str, Any]:
        return {
            "p_val": self.p_val,
            "n_permutations": self.n_permutations,
            "projection_dim": self.projection_dim,
            "seed": self.seed,
        }

    def _pca(self) -> tuple[np.ndarray, np.ndarray]:
        if self._mean is None or self._components is None:
            raise DriftDetectorError(
                "The embedding detector has no PCA yet: call fit(reference) or load(directory) "
                "before scoring or saving it."
            )
        return self._mean, self._components

    def _arrays(self) -> dict[str, np.ndarray]:
        mean, components = self._pca()
        return {
            "mean": mean,
            "components": components,
            "explained": np.asarray(self._explained),
        }

    def _restore_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self._mean, self._components = arrays["mean"], arrays["components"]
        self._explained = float(arrays["explained"])

    def _project(self, embeddings: np.ndarray) -> np.ndarray:
        mean, components = self._pca()
        return ((embeddings - mean) @ components.T).astype(np.float32)

    def fit(self, reference: np.ndarray) -> Self:
        from alibi_detect.cd import MMDDrift

        embeddings = _matrix(reference, "reference embeddings")
        self._mean = embeddings.mean(axis=0)
        # SVD of the centred reference: rows of vt are the principal directions.
        _, singular, vt = np.linalg.svd(embeddings - self._mean, full_matrices=False)
        keep = min(self.projection_dim, vt.shape[0])
        self._components = vt[:keep].astype(np.float32)
        variance = singular.astype(np.float64) ** 2
        self._explained = float(variance[:keep].sum() / max(variance.sum(), 1e-30))
        self._alibi = MMDDrift(
            self._project(embeddings),
            backend="pytorch",
            p_val=self.p_val,
            n_permutations=self.n_permutations,
            device="cpu",
        )
        return self

    def score(self, batch: np.ndarray, log: Callable[[str], None] | None = None) -> DetectorResult:
        """The permutation test of one batch (alibi-detect's ``predict``); while it runs, a line
        goes to ``log`` every 10 s (see :func:`cifar_assets.progress.heartbeat`)."""
        import torch

        detector: MMDDrift = self._require_fitted()
        embeddings = _matrix(batch, "batch embeddings", columns=self._pca()[0].shape[0])
        projected = self._project(embeddings)
        threads = torch.get_num_threads()
        # The permutation loop is a hundred small tensor operations; with several intra-op
        # threads each waits at a barrier for all of them, and on a busy machine a descheduled
        # thread stalls every step (measured on 2 shared cores: 4.6 s per check with two
        # threads, 0.6 s with one).
        torch.set_num_threads(1)
        try:
            with (
                torch.random.fork_rng(devices=[]),
                heartbeat(f"MMD permutation test ({len(projected)} images)", log),
            ):
                torch.manual_seed(self.seed)
                data = detector.predict(projected, return_p_val=True, return_distance=True)["data"]
        finally:
            torch.set_num_threads(threads)
        p_value = float(data["p_val"])
        return self._result(
            p_value,
            float(data["distance"]),
            {
                "statistic": "MMD^2 (Gaussian kernel, median-heuristic bandwidth)",
                "distance_threshold": float(data["distance_threshold"]),
                "n_permutations": self.n_permutations,
                "projection_dim": int(self._components.shape[0])
                if self._components is not None
                else 0,
                "explained_variance": self._explained,
                "n_batch": int(embeddings.shape[0]),
            },
        )


class SoftmaxKSDetector(_AlibiDetector):
    """KS test per softmax output (black-box shift detection), Bonferroni-corrected.

    The reported ``p_value`` is the Bonferroni-adjusted one, ``min(1, C * min p)``, so the
    detector flags drift exactly when alibi-detect's batch-level Bonferroni rule does, and the
    p-value compares directly with ``threshold``.
    """

    name = "ks_softmax"
    kind = "data"

    def fit(self, reference: np.ndarray) -> Self:
        from alibi_detect.cd import KSDrift

        probabilities = check_probabilities(reference, "reference probabilities")
        self._alibi = KSDrift(probabilities, p_val=self.p_val, correction="bonferroni")
        return self

    def reference_probabilities(self) -> np.ndarray:
        """The softmax outputs the detector was fitted on (N, classes)."""
        return np.asarray(self._require_fitted().x_ref, dtype=np.float32)

    def score(self, batch: np.ndarray) -> DetectorResult:
        detector: KSDrift = self._require_fitted()
        probabilities = check_probabilities(batch, "batch probabilities")
        if probabilities.shape[1] != detector.n_features:
            raise DriftDetectorError(
                f"batch probabilities: {probabilities.shape[1]} classes, the reference has "
                f"{detector.n_features}; score outputs of the model the baseline was fitted on."
            )
        p_values, statistics = _ks_batch(detector, probabilities)
        adjusted = float(min(1.0, p_values.min() * len(p_values)))
        names = (
            list(CLASSES)
            if len(p_values) == len(CLASSES)
            else [str(i) for i in range(len(p_values))]
        )
        return self._result(
            adjusted,
            float(statistics.max()),
            {
                "statistic": "largest KS statistic over the softmax outputs",
                "correction": "bonferroni",
                "per_class": {
                    name: {"p_value": float(p), "statistic": float(s)}
                    for name, p, s in zip(names, p_values, statistics, strict=True)
                },
                "n_batch": int(probabilities.shape[0]),
            },
        )


class UncertaintyKSDetector(_AlibiDetector):
    """One-sided KS test: is the entropy of the batch's predictions larger than the reference's?

    A model facing inputs it was not trained for tends to spread its probability mass; this needs
    no labels. Only an increase counts (alternative ``"greater"`` in scipy's sense: the reference
    CDF lies above the batch's), since a model growing more confident is no reason to retrain.
    """

    name = "ks_uncertainty"
    kind = "model"

    def fit(self, reference: np.ndarray) -> Self:
        from alibi_detect.cd import KSDrift

        probabilities = check_probabilities(reference, "reference probabilities")
        self._alibi = KSDrift(
            entropy(probabilities)[:, None].astype(np.float32),
            p_val=self.p_val,
            alternative="greater",
        )
        return self

    def score(self, batch: np.ndarray) -> DetectorResult:
        detector: KSDrift = self._require_fitted()
        probabilities = check_probabilities(batch, "batch probabilities")
        batch_entropy = entropy(probabilities)
        p_values, statistics = _ks_batch(detector, batch_entropy[:, None].astype(np.float32))
        p_value = float(p_values[0])
        return self._result(
            p_value,
            float(statistics[0]),
            {
                "statistic": "one-sided KS statistic on prediction entropy (nats)",
                "reference_mean_entropy": float(np.mean(detector.x_ref)),
                "batch_mean_entropy": float(batch_entropy.mean()),
                "n_batch": int(probabilities.shape[0]),
            },
        )


def feature_columns(features: pd.DataFrame) -> list[str]:
    """The numeric feature columns of a feature-store table (the ``id`` key excluded)."""
    return [
        str(column)
        for column in features.columns
        if column != "id"
        and (pd.api.types.is_numeric_dtype(features[column]) or features[column].dtype == bool)
    ]


class FeatureKSDetector(_AlibiDetector):
    """KS test per feature-store feature; says which features moved, largest move first.

    ``correction`` is ``"bonferroni"`` (controls the chance of naming any unmoved feature) or
    ``"fdr"`` (Benjamini-Hochberg: controls the expected share of wrongly named features, and names
    more of the moved ones). A feature moved when its adjusted p-value is below ``p_val``.
    """

    name = "ks_features"
    kind = "feature"

    def __init__(
        self,
        p_val: float = 0.05,
        correction: Literal["bonferroni", "fdr"] = "bonferroni",
        feature_names: list[str] | None = None,
    ) -> None:
        super().__init__(p_val)
        if correction not in ("bonferroni", "fdr"):
            raise DriftDetectorError(
                f"FeatureKSDetector: correction={correction!r} is unknown; use 'bonferroni' or 'fdr'."
            )
        self.correction = correction
        self.feature_names = list(feature_names or [])

    def params(self) -> dict[str, Any]:
        return {
            "p_val": self.p_val,
            "correction": self.correction,
            "feature_names": self.feature_names,
        }

    def _select(self, features: pd.DataFrame, what: str) -> np.ndarray:
        missing = [name for name in self.feature_names if name not in features.columns]
        if missing:
            raise DriftDetectorError(
                f"{what}: feature columns {missing} are missing; compute the batch's features "
                "with the same feature code (schema) as the baseline's reference."
            )
        return _matrix(features[self.feature_names].to_numpy(dtype=np.float64), what)

    def fit(self, reference: pd.DataFrame) -> Self:
        from alibi_detect.cd import KSDrift

        self.feature_names = feature_columns(reference)
        if not self.feature_names:
            raise DriftDetectorError(
                "reference features: no numeric feature columns besides 'id'; pass the feature "
                "store table (cifar_assets.data.features.compute_features)."
            )
        values = self._select(reference, "reference features")
        self._alibi = KSDrift(values, p_val=self.p_val, correction=self.correction)
        return self

    def reference_features(self) -> pd.DataFrame:
        """The reference table the detector compares against (for plots)."""
        detector: KSDrift = self._require_fitted()
        return pd.DataFrame(np.asarray(detector.x_ref), columns=self.feature_names)

    def _adjust(self, p_values: np.ndarray) -> np.ndarray:
        if self.correction == "bonferroni":
            return np.minimum(1.0, p_values * len(p_values))
        from scipy.stats import false_discovery_control

        return np.asarray(false_discovery_control(p_values, method="bh"), dtype=np.float64)

    def score(self, batch: pd.DataFrame) -> DetectorResult:
        detector: KSDrift = self._require_fitted()
        values = self._select(batch, "batch features")
        p_values, statistics = _ks_batch(detector, values)
        adjusted = self._adjust(p_values)
        order = np.argsort(-statistics, kind="stable")
        table = [
            {
                "feature": self.feature_names[i],
                "statistic": float(statistics[i]),
                "p_value": float(p_values[i]),
                "adjusted_p_value": float(adjusted[i]),
                "moved": bool(adjusted[i] < self.p_val),
            }
            for i in order
        ]
        moved = [row["feature"] for row in table if row["moved"]]
        return self._result(
            float(adjusted.min()),
            float(statistics.max()),
            {
                "statistic": "largest KS statistic over the features",
                "correction": self.correction,
                "moved": moved,
                "features": table,
                "n_batch": int(values.shape[0]),
            },
        )
