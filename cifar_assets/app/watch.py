"""What the Watch page shows, read from files and services, never from Dagster itself:

- the live rollout: MLflow's aliases, Triton's live versions and the router's weights (and the
  stage of a staged rollout) from :meth:`Rollout.state`, its disagreements from
  :meth:`Rollout.check`, and the latest transitions from its journal;
- requests and feedback per version from the router's capture, accuracy with Wilson intervals
  (``ab_stats.wilson_interval``, as ``ab_test_report`` computes them);
- the latest ``ab_test_report`` decision (``<storage>/ab_test_report/ab_report.json``) and the
  latest drift reports (``<storage>/drift_report/<batch>/report.json`` with their PNGs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cifar_assets.app.config import AppConfig

if TYPE_CHECKING:
    import pandas as pd

AB_REPORT_DIR = "ab_test_report"  # where ab_test_report writes (assets/monitoring_assets.py)
AB_REPORT_FILE = "ab_report.json"
AB_RESULTS_PNG = "ab_results.png"
DRIFT_REPORT_DIR = "drift_report"
DRIFT_REPORT_FILE = "report.json"
DRIFT_PICTURES = ("drift_overview.png", "moved_features.png")
TRAFFIC_COLUMNS = ("version", "requests", "feedback", "correct", "accuracy", "ci_low", "ci_high")


@dataclass(frozen=True)
class LifecycleView:
    state: dict[str, Any] | None  # LifecycleState.to_dict(); None when it could not be read
    problems: list[str]  # where MLflow, the router and Triton disagree
    transitions: list[dict[str, Any]]  # the latest finished transitions, newest first
    error: str | None = None  # why the state could not be read


@dataclass(frozen=True)
class ABReportFile:
    decision: str
    reason: str
    control: int
    treatment: int
    written_at: datetime
    path: Path
    picture: Path | None


@dataclass(frozen=True)
class DriftReportFile:
    batch: str
    written_at: datetime
    drift: bool
    score: float
    images: int
    model_version: int
    batch_accuracy: float | None
    moved_features: list[str]
    pictures: list[Path] = field(default_factory=list)


def lifecycle(config: AppConfig, transitions: int = 5) -> LifecycleView:
    """The rollout's state as its owner reads it; a registry or state file that cannot be read
    becomes ``error``, in words, instead of an exception."""
    from cifar_assets.ml.registry import Registry
    from cifar_assets.serving.rollout import Rollout

    try:
        rollout = Rollout(
            models=Registry(config.tracking_uri, config.model_name),
            triton=config.triton_url,
            repo=config.triton_repo,
            state_dir=config.state_dir,
        )
        state = rollout.state().to_dict()
        problems = rollout.check()
        done = [r for r in rollout.journal() if r.get("phase") == "done"]
    except Exception as error:  # MLflow unreachable, a damaged state file: say so on the page
        return LifecycleView(
            None,
            [],
            [],
            f"The rollout state could not be read from MLflow ({config.tracking_uri}) and "
            f"{config.state_dir}: {type(error).__name__}: {error}",
        )
    return LifecycleView(state, problems, done[::-1][:transitions])


def traffic_by_version(capture_dir: Path, alpha: float = 0.05) -> pd.DataFrame:
    """Per served version: requests, images with feedback, correct ones, accuracy and its Wilson
    interval at ``1 - alpha`` (NaN without feedback); columns TRAFFIC_COLUMNS."""
    import pandas as pd

    from cifar_assets.drift.ab_stats import wilson_interval
    from cifar_assets.serving.capture import join_feedback, read_capture

    requests = read_capture(capture_dir).groupby("served_version").size()
    labelled = join_feedback(capture_dir).groupby("served_version")["correct"].agg(["size", "sum"])
    rows = []
    for version in sorted(requests.index):
        n = int(labelled["size"].get(version, 0))
        correct = int(labelled["sum"].get(version, 0))
        low, high = wilson_interval(correct, n, alpha) if n else (float("nan"), float("nan"))
        rows.append(
            {
                "version": int(version),
                "requests": int(requests[version]),
                "feedback": n,
                "correct": correct,
                "accuracy": correct / n if n else float("nan"),
                "ci_low": low,
                "ci_high": high,
            }
        )
    return pd.DataFrame(rows, columns=list(TRAFFIC_COLUMNS))


def _written_at(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)


def latest_ab_report(storage_dir: Path) -> ABReportFile | None:
    """The decision of the last ab_test_report materialization, if it has run."""
    path = storage_dir / AB_REPORT_DIR / AB_REPORT_FILE
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    picture = path.parent / AB_RESULTS_PNG
    return ABReportFile(
        decision=str(report["decision"]),
        reason=str(report["reason"]),
        control=int(report["control"]),
        treatment=int(report["treatment"]),
        written_at=_written_at(path),
        path=path,
        picture=picture if picture.is_file() else None,
    )


def latest_drift_reports(storage_dir: Path, limit: int = 3) -> list[DriftReportFile]:
    """The ``limit`` most recently written drift reports, newest first."""
    files = sorted(
        (storage_dir / DRIFT_REPORT_DIR).glob(f"*/{DRIFT_REPORT_FILE}"),
        key=lambda path: path.stat().st_mtime,
        reverse=True,
    )
    reports = []
    for path in files[:limit]:
        report = json.loads(path.read_text())
        reports.append(
            DriftReportFile(
                batch=path.parent.name,
                written_at=_written_at(path),
                drift=bool(report["drift"]),
                score=float(report["score"]),
                images=int(report["n"]),
                model_version=int(report["model_version"]),
                batch_accuracy=report.get("batch_accuracy"),
                moved_features=list(report.get("moved_features", [])),
                pictures=[p for p in (path.parent / n for n in DRIFT_PICTURES) if p.is_file()],
            )
        )
    return reports
