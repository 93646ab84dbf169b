"""The ``ab_test_report`` stage without Dagster: the running A/B test judged from captured traffic
and feedback, the staged rollout's stage judged (and, when asked, acted on), files written and one
finished MLflow run in ``monitoring/<model>``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cifar_assets.artifacts import ABTestSummary

if TYPE_CHECKING:
    from cifar_assets.drift.ab_stats import ABReport
    from cifar_assets.serving.gates import StageJudgement
    from cifar_assets.serving.rollout import Rollout


class NoABTestError(RuntimeError):
    """Neither two weighted versions nor a staged rollout: there is nothing to report on."""


@dataclass
class ABTestRun:
    summary: ABTestSummary
    weights: dict[int, float]
    report: ABReport | None = None  # the two-version comparison, when two versions take traffic
    judgement: StageJudgement | None = None  # the staged rollout's stage, when one runs
    transition: str | None = None  # what the rollout did, when asked to act
    results_png: Path | None = None
    files: list[Path] = field(default_factory=list)
    mlflow_run_id: str = ""


def compare_versions(
    capture_dir: Path, weights: Mapping[int, float], alpha: float, min_effect: float, out_dir: Path
) -> tuple[ABReport, Path, Path]:
    """The A/B comparison of the two weighted versions (the control is the one with more traffic;
    on a 50/50 split, the older one): its report, picture and JSON file."""
    from cifar_assets.drift.ab_stats import ab_results_png, analyse_ab
    from cifar_assets.serving.capture import capture_with_feedback

    control, treatment = sorted(weights, key=lambda v: (-weights[v], v))
    records = capture_with_feedback(capture_dir)
    records = records[records["served_version"].isin(list(weights))]
    report = analyse_ab(records, dict(weights), control, treatment, alpha, min_effect)
    plot = ab_results_png(report, out_dir / "ab_results.png")
    report_file = out_dir / "ab_report.json"
    report_file.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return report, plot, report_file


def run_ab_test(
    rollout: Rollout,
    capture_dir: Path,
    out_dir: Path,
    *,
    alpha: float,
    min_effect: float,
    apply_rollout: bool,
    actor: str,
    log: Callable[[str], None] = print,
) -> ABTestRun:
    """Judge the running A/B test and, during a staged rollout, its stage; with
    ``apply_rollout``, carry out the stage's verdict through ``rollout``."""
    from cifar_assets.serving.gates import act, judge_stage
    from cifar_assets.serving.rollout import FIXED

    state = rollout.state()
    weights = {v: w for v, w in state.weights.items() if w > 0}
    staged = state.stage not in (None, FIXED)
    if len(weights) != 2 and not staged:
        raise NoABTestError(
            f"No A/B test is running: the router's weights are {weights or 'unset'} and no "
            "staged rollout runs. Deploy a challenger (retraining_job, or main_job when the gate "
            "keeps the champion) first."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    run = ABTestRun(
        ABTestSummary(state.champion or 0, state.challenger or 0, "keep_testing", ""), weights
    )
    if len(weights) == 2:
        report, run.results_png, report_file = compare_versions(
            capture_dir, weights, alpha, min_effect, out_dir
        )
        run.report = report
        run.files += [report_file, run.results_png]
        run.summary = ABTestSummary(
            report.control, report.treatment, report.decision, report.reason, report.to_dict()
        )
    if staged:
        judgement = judge_stage(state, capture_dir)
        run.judgement = judgement
        stage_file = out_dir / "stage.json"
        stage_file.write_text(json.dumps(judgement.to_dict(), indent=2, default=str) + "\n")
        run.files.append(stage_file)
        s = run.summary
        run.summary = ABTestSummary(
            s.control,
            s.treatment,
            s.decision,
            s.reason,
            {**s.details, "stage": judgement.to_dict()},
        )
        if apply_rollout:
            transition = act(rollout, judgement, actor=actor)
            run.transition = transition.action if transition else "none"
        log(f"Stage {judgement.stage}: {judgement.action}: {judgement.reason}")
    s = run.summary
    log(f"A/B v{s.control} vs v{s.treatment}: {s.decision}: {s.reason}")
    return run


def log_ab_run(
    run: ABTestRun,
    *,
    tracking_uri: str,
    model_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    artifact_location: str | None,
) -> str:
    """The report as a finished MLflow run in ``monitoring/<model>``; returns the run id."""
    from cifar_assets.ml import tracking

    summary = run.summary
    metrics: dict[str, float | None] = {}
    for version, stats in summary.details.get("versions", {}).items():
        for key in ("requests", "share", "n_feedback", "accuracy", "latency_p50_ms"):
            metrics[f"v{version}_{key}"] = stats.get(key)
    if run.report is not None:
        metrics |= {
            "srm_p_value": run.report.srm.p_value,
            "sequential_p_value": run.report.accuracy_test.p_value,
            "fixed_horizon_n_per_arm": run.report.fixed_horizon_n_per_arm,
        }
    run.mlflow_run_id = tracking.log_monitoring_run(
        tracking_uri,
        model_name,
        run_name=f"ab-v{summary.control}-vs-v{summary.treatment}",
        tags={
            "kind": "ab_test",
            "control": summary.control,
            "treatment": summary.treatment,
            "decision": summary.decision,
            "stage": run.judgement.stage if run.judgement else "none",
            "stage_action": run.judgement.action if run.judgement else "none",
        }
        | dict(tags),
        params=dict(params) | {"weights": run.weights},
        metrics=metrics,
        files=run.files,
        artifact_location=artifact_location,
    )
    return run.mlflow_run_id
