"""The ``ab_test_report`` stage without Dagster: the running A/B test judged from captured traffic
and feedback, the staged rollout's stage judged (and, when asked, acted on), files written and one
finished MLflow run in ``monitoring/<model>``. Every stage has a picture: the A/B comparison while
two versions take traffic, the shadow evidence (counts, model time, agreement) while the
challenger only receives mirrored requests.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cifar_assets.artifacts import ABTestSummary

if TYPE_CHECKING:
    import pandas as pd

    from cifar_assets.drift.ab_stats import ABReport
    from cifar_assets.serving.gates import StageJudgement
    from cifar_assets.serving.rollout import Rollout, RolloutPlan


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
    shadow_png: Path | None = None  # the shadow stage's evidence, while the stage is shadow
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


def shadow_evidence_png(
    mirrored: pd.DataFrame,
    champion: int,
    challenger: int,
    thresholds: RolloutPlan,
    path: Path,
) -> Path:
    """The shadow stage's evidence as one picture: how many requests were mirrored (against
    the plan's need), answered, failed and agreed; the model CPU time per image of the
    challenger against the champion's on the same batches, with their p95; and the running top-1
    agreement against the plan's floor. ``mirrored`` is gates.mirrored_answers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    failed = mirrored["error"].notna()
    answered = mirrored[~failed]
    agrees = (answered["predicted_class"] == answered["champion_class"]).to_numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (count_axis, time_axis, agree_axis) = plt.subplots(1, 3, figsize=(13, 3.6))
    counts = {
        "mirrored": len(mirrored),
        "answered": len(answered),
        "failed": int(failed.sum()),
        "agreed": int(agrees.sum()),
    }
    bars = count_axis.bar(list(counts), list(counts.values()), color="tab:blue")
    count_axis.bar_label(bars)
    count_axis.axhline(
        thresholds.shadow_requests,
        color="tab:red",
        linestyle="--",
        label=f"needed {thresholds.shadow_requests}",
    )
    count_axis.set_title(f"Requests mirrored to v{challenger}")
    count_axis.legend()
    times = {
        f"v{champion} (champion)": answered["champion_model_cpu_ms"].dropna().to_numpy(float),
        f"v{challenger} (shadow)": answered["model_cpu_ms"].dropna().to_numpy(float),
    }
    p95 = {k: float(np.quantile(v, 0.95)) if len(v) else float("nan") for k, v in times.items()}
    if all(len(v) for v in times.values()):
        time_axis.boxplot(list(times.values()), whis=(5, 95), showfliers=False)
        time_axis.set_xticks([1, 2], list(times))
        time_axis.scatter([1, 2], list(p95.values()), color="tab:red", zorder=3, label="p95")
        time_axis.legend()
    champion_p95, challenger_p95 = p95.values()
    time_axis.set_ylabel("model CPU ms per image")
    time_axis.set_title(
        f"p95 ratio {challenger_p95 / champion_p95:.2f} "
        f"(limit {thresholds.max_p95_latency_ratio:g})"
        if champion_p95 > 0
        else "p95 ratio: no answers yet"
    )
    if len(agrees):
        agree_axis.plot(
            np.arange(1, len(agrees) + 1), np.cumsum(agrees) / np.arange(1, len(agrees) + 1)
        )
    agree_axis.axhline(
        thresholds.min_shadow_agreement,
        color="tab:red",
        linestyle="--",
        label=f"floor {thresholds.min_shadow_agreement:g}",
    )
    agree_axis.set_ylim(0, 1.02)
    agree_axis.set_xlabel("answered mirrored requests")
    agree_axis.set_title(
        f"Agreement with v{champion}: {agrees.mean():.1%}" if len(agrees) else "No answers yet"
    )
    agree_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


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
    from cifar_assets.serving.gates import act, judge_stage, mirrored_answers
    from cifar_assets.serving.rollout import FIXED, SHADOW

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
        if state.stage == SHADOW and state.plan is not None:
            run.shadow_png = shadow_evidence_png(
                mirrored_answers(state, capture_dir),
                state.champion or 0,
                state.challenger or 0,
                state.plan,
                out_dir / "shadow_evidence.png",
            )
            run.files.append(run.shadow_png)
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
