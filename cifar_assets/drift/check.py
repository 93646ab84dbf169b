"""One production batch checked against the champion's detectors, end to end: what the
``drift_report`` asset runs, callable without Dagster.

The champion is MLflow's ``champion`` alias: its drift baseline (fitted by ``drift_baseline`` for
that version) holds the detectors and names the model whose embeddings and predictions they
compare. The check writes ``report.json`` and its pictures into ``out_dir``, logs them as a
finished MLflow run in ``monitoring/<model>``, and updates the drift status the metrics exporter
serves.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cifar_assets.data.imageset import ImageSet
from cifar_assets.drift.report import DriftReport

if TYPE_CHECKING:
    from cifar_assets.ml.registry import Registry


class NoDetectorsError(RuntimeError):
    """There is no champion, or no usable drift baseline for it: nothing to check a batch with."""


@dataclass(frozen=True)
class DriftCheck:
    """A finished check: the report, where its files are, and its MLflow run."""

    report: DriftReport
    champion: int
    baseline_dir: Path
    report_file: Path
    overview_png: Path
    moved_features_png: Path | None
    mlflow_run_id: str
    labelled: bool

    def detector_rows(self) -> list[dict[str, Any]]:
        """One row per detector: name, p-value, distance, threshold, verdict."""
        return [
            {"detector": name, **{k: v for k, v in values.items() if k != "details"}}
            for name, values in self.report.to_dict()["detectors"].items()
        ]


def check_incoming_batch(
    batch: ImageSet,
    batch_name: str,
    *,
    models: Registry,
    storage_dir: Path,
    out_dir: Path,
    run_tags: Mapping[str, str],
    artifact_location: str | None = None,
    log: Callable[[str], None] = print,
) -> DriftCheck:
    """Check ``batch`` against the champion's detectors; see the module docstring."""
    from cifar_assets.data.features import compute_features
    from cifar_assets.drift.baseline import (
        MODEL_FILE,
        BaselineVersionError,
        DriftBaseline,
        baseline_dir,
    )
    from cifar_assets.drift.report import check_batch, drift_overview_png, feature_distribution_png
    from cifar_assets.metrics import write_drift_status
    from cifar_assets.ml import tracking
    from cifar_assets.ml.embeddings import embed, predict_proba
    from cifar_assets.ml.model import load_model
    from cifar_assets.ml.registry import CHAMPION

    champion = models.aliases().get(CHAMPION)
    if champion is None:
        raise NoDetectorsError(
            f"{models.name} has no champion in {models.uri}, so there are no detectors to check "
            "this batch with: run main_job first."
        )
    directory = baseline_dir(storage_dir, champion)
    try:
        baseline = DriftBaseline.load(directory, expected_model_version=champion)
        model_dir = json.loads((directory / MODEL_FILE).read_text())["model_dir"]
    except (FileNotFoundError, BaselineVersionError) as error:
        raise NoDetectorsError(
            f"No usable drift baseline for champion v{champion} under {directory} ({error}). "
            "Materialize drift_baseline for that version (main_job or retraining_job does)."
        ) from error
    log(f"Checking against champion v{champion}'s detectors ({directory})")
    model = load_model(Path(model_dir))
    features = compute_features(batch, log=log)
    labels = batch.labels if (batch.labels >= 0).any() else None
    probabilities = predict_proba(model, batch.images, log=log)
    embeddings = embed(model, batch.images, log=log)
    report = check_batch(baseline, embeddings, probabilities, features, labels, log=log)

    out_dir.mkdir(parents=True, exist_ok=True)
    report_file = out_dir / "report.json"
    report_file.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    overview = drift_overview_png(report, baseline, probabilities, out_dir / "drift_overview.png")
    moved = None
    if report.moved_features:
        moved = feature_distribution_png(
            baseline.features.reference_features(),
            features,
            report.moved_features,
            out_dir / "moved_features.png",
        )
    run_id = tracking.log_monitoring_run(
        models.uri,
        models.name,
        run_name=f"drift-{batch_name}",
        tags={"kind": "drift_report", "batch": batch_name, "model_version": report.model_version}
        | dict(run_tags),
        params={"p_val": report.p_val, "images": report.n, "model_version": report.model_version},
        metrics={
            "drift": float(report.drift),
            "score": report.score,
            "combined_p_value": report.combined_p_value,
            "batch_accuracy": report.batch_accuracy,
            **{f"p_value_{result.name}": result.p_value for result in report.results},
            **{f"distance_{result.name}": result.distance for result in report.results},
        },
        files=[report_file, overview, *([moved] if moved else [])],
        artifact_location=artifact_location,
    )
    write_drift_status(storage_dir, batch_name, report.score, report.drift)
    log(
        f"Batch {batch_name}: drift={report.drift} score={report.score:.3f} "
        f"moved={report.moved_features[:5]}"
    )
    return DriftCheck(
        report, champion, directory, report_file, overview, moved, run_id, labels is not None
    )
