"""The gates of a staged rollout: does the challenger's stage pass, wait, or fail?

Judged on the traffic captured since the stage began (cifar_assets.serving.capture):

- shadow: the challenger's answers to mirrored requests, without labels: enough of them, its
  error rate, its p95 model CPU time per image against the champion's on the same batches as an
  SLO ratio, and its top-1 agreement
  with the champion; with feedback, its accuracy against the champion's on the same requests;
- canary: the split the users saw: sample ratio mismatch (chi-square), the challenger's error
  rate and p95 latency ratio, and the always-valid sequential accuracy test once feedback exists
  (cifar_assets.drift.ab_stats), so looking at it at every step stays valid.

A failed gate means ``rollback``; a stage with too little traffic means ``hold``; otherwise
``advance``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cifar_assets.serving.rollout import (
    CANARY,
    SHADOW,
    LifecycleState,
    Rollout,
    RolloutPlan,
    Transition,
)

if TYPE_CHECKING:
    import pandas as pd

Action = Literal["advance", "hold", "rollback"]


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    value: float | None
    limit: float
    detail: str


@dataclass(frozen=True)
class StageJudgement:
    stage: str
    action: Action
    reason: str
    gates: list[Gate] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _since(frame: pd.DataFrame, started: str | None) -> pd.DataFrame:
    import pandas as pd

    if started is None or frame.empty:
        return frame
    return frame[frame["time"] >= pd.Timestamp(started)]


def mirrored_answers(state: LifecycleState, capture_dir: Path) -> pd.DataFrame:
    """The challenger's answers to requests mirrored to it since ``state``'s stage began
    (capture.SHADOW_COLUMNS): what the shadow stage is judged on."""
    from cifar_assets.serving.capture import read_shadow

    shadow = _since(read_shadow(capture_dir), state.stage_started)
    return shadow[shadow["shadow_version"] == state.challenger]


def _p95(values: Any) -> float | None:
    array = np.asarray(values, dtype=np.float64)
    array = array[~np.isnan(array)]
    return float(np.quantile(array, 0.95)) if len(array) else None


def _latency_gate(candidate: float | None, champion: float | None, plan: RolloutPlan) -> Gate:
    ratio = candidate / champion if candidate is not None and champion else None
    return Gate(
        "p95_latency_ratio",
        ratio is None or ratio <= plan.max_p95_latency_ratio,
        ratio,
        plan.max_p95_latency_ratio,
        f"challenger p95 {candidate or 0:.2f} ms against champion p95 {champion or 0:.2f} ms "
        "(model CPU time per image; router latency where the router does not record it)",
    )


def judge_stage(state: LifecycleState, capture_dir: Path) -> StageJudgement:
    """Judge the running stage of ``state``'s staged rollout on the capture under
    ``capture_dir``."""
    from cifar_assets.serving.capture import join_feedback, read_capture, read_errors

    plan, stage = state.plan, state.stage
    if plan is None or stage is None or state.challenger is None or state.champion is None:
        raise ValueError(
            f"No staged rollout is running (stage {stage or 'none'}); deploy a challenger with "
            "a rollout plan first."
        )
    served = _since(read_capture(capture_dir), state.stage_started)
    errors = _since(read_errors(capture_dir), state.stage_started)
    feedback = _since(join_feedback(capture_dir), state.stage_started)
    if stage == SHADOW:
        shadow = mirrored_answers(state, capture_dir)
        return _judge_shadow(state.champion, state.challenger, plan, shadow, served, feedback)
    if stage.startswith(CANARY):
        weights = {v: w for v, w in state.weights.items() if w > 0}
        return _judge_canary(
            stage, weights, state.champion, state.challenger, plan, served, errors, feedback
        )
    raise ValueError(f"Stage {stage!r} is not a staged rollout stage (shadow or canary-<i>).")


def _judge_shadow(
    champion: int,
    challenger: int,
    plan: RolloutPlan,
    shadow: pd.DataFrame,
    served: pd.DataFrame,
    feedback: pd.DataFrame,
) -> StageJudgement:
    n = len(shadow)
    evidence: dict[str, Any] = {"mirrored": n, "needed": plan.shadow_requests}
    if n < plan.shadow_requests:
        return StageJudgement(
            SHADOW, "hold", f"{n} of {plan.shadow_requests} mirrored requests so far", [], evidence
        )
    failed = shadow["error"].notna()
    answered = shadow[~failed]
    agreement = (
        float((answered["predicted_class"] == answered["champion_class"]).mean())
        if len(answered)
        else 0.0
    )
    gates = [
        Gate(
            "error_rate",
            float(failed.mean()) <= plan.max_error_rate,
            float(failed.mean()),
            plan.max_error_rate,
            f"{int(failed.sum())} of {n} mirrored requests failed on v{challenger}",
        ),
        # Model time per image on the same mirrored batches, challenger against champion.
        # The model's CPU time per image on the same mirrored batches, challenger against
        # champion: the shadow runs on a background thread, whose wall time a busy machine
        # stretches (the same file measured 1.75x slower at p95 by wall time, under load).
        _latency_gate(
            _p95(answered["model_cpu_ms"]), _p95(answered["champion_model_cpu_ms"]), plan
        ),
        Gate(
            "shadow_agreement",
            agreement >= plan.min_shadow_agreement,
            agreement,
            plan.min_shadow_agreement,
            f"v{challenger} predicts v{champion}'s class on {agreement:.1%} of "
            f"{len(answered)} mirrored images",
        ),
    ]
    # Labels for mirrored requests judge both answers to the same images.
    labelled = answered.merge(feedback[["request_id", "item", "label"]], on=["request_id", "item"])
    if len(labelled):
        champion_right = (labelled["champion_class"] == labelled["label"]).to_numpy()
        challenger_right = (labelled["predicted_class"] == labelled["label"]).to_numpy()
        gates.append(
            _accuracy_gate(
                np.tile([False, True], len(labelled)),
                np.column_stack([champion_right, challenger_right]).ravel(),
                plan,
                f"on {len(labelled)} labelled mirrored images: challenger "
                f"{challenger_right.mean():.1%}, champion {champion_right.mean():.1%}",
            )
        )
    return _verdict(SHADOW, gates, evidence | {"agreement": agreement})


def _judge_canary(
    stage: str,
    weights: dict[int, float],
    champion: int,
    challenger: int,
    plan: RolloutPlan,
    served: pd.DataFrame,
    errors: pd.DataFrame,
    feedback: pd.DataFrame,
) -> StageJudgement:
    from scipy.stats import chisquare

    counts = {v: int((served["served_version"] == v).sum()) for v in sorted(weights)}
    failures = {v: int((errors["served_version"] == v).sum()) for v in sorted(weights)}
    evidence: dict[str, Any] = {
        "requests": {str(v): n for v, n in counts.items()},
        "errors": {str(v): n for v, n in failures.items()},
        "weights": {str(v): w for v, w in weights.items()},
    }
    if counts.get(challenger, 0) < plan.min_requests:
        return StageJudgement(
            stage,
            "hold",
            f"{counts.get(challenger, 0)} of {plan.min_requests} challenger requests so far",
            [],
            evidence,
        )
    total = sum(counts.values())
    expected = [total * weights[v] / sum(weights.values()) for v in counts]
    srm_p = float(chisquare(list(counts.values()), expected).pvalue)
    attempts = counts[challenger] + failures[challenger]
    error_rate = failures[challenger] / attempts if attempts else 0.0
    rows = served["served_version"]
    # The versions' own model time per image where the router records it (inprocess): the
    # router's latency of a version that runs second in a mixed batch includes the first's.
    cost = "model_ms" if served["model_ms"].notna().all() and len(served) else "latency_ms"
    evidence["latency_measure"] = cost
    gates = [
        Gate(
            "sample_ratio",
            srm_p >= plan.srm_alpha,
            srm_p,
            plan.srm_alpha,
            f"requests {counts} against weights {weights} (chi-square p={srm_p:.3g})",
        ),
        Gate(
            "error_rate",
            error_rate <= plan.max_error_rate,
            error_rate,
            plan.max_error_rate,
            f"{failures[challenger]} of {attempts} requests failed on v{challenger}",
        ),
        _latency_gate(
            _p95(served.loc[rows == challenger, cost]),
            _p95(served.loc[rows == champion, cost]),
            plan,
        ),
    ]
    labelled = feedback[feedback["served_version"].isin([champion, challenger])]
    per_arm = min(
        int((labelled["served_version"] == champion).sum()),
        int((labelled["served_version"] == challenger).sum()),
    )
    evidence["labelled_per_arm"] = per_arm
    if len(labelled):
        gates.append(
            _accuracy_gate(
                (labelled["served_version"] == challenger).to_numpy(),
                labelled["correct"].to_numpy(dtype=bool),
                plan,
                f"always-valid test on {len(labelled)} labelled requests",
            )
        )
    judgement = _verdict(stage, gates, evidence)
    if judgement.action == "advance" and per_arm < plan.min_labelled_per_arm:
        return StageJudgement(
            stage,
            "hold",
            f"{per_arm} of {plan.min_labelled_per_arm} labelled requests per arm so far",
            gates,
            evidence,
        )
    return judgement


def _accuracy_gate(
    is_challenger: np.ndarray, correct: np.ndarray, plan: RolloutPlan, detail: str
) -> Gate:
    """Fails when the always-valid sequential test finds the challenger less accurate."""
    from cifar_assets.drift.ab_stats import msprt_p_values

    p_values, theta = msprt_p_values(is_challenger, correct, tau=0.02)
    worse = bool(p_values[-1] < plan.accuracy_alpha and theta[-1] < 0)
    return Gate(
        "accuracy",
        not worse,
        float(p_values[-1]),
        plan.accuracy_alpha,
        f"{detail}, difference {theta[-1]:+.1%} (challenger - champion)",
    )


def _verdict(stage: str, gates: list[Gate], evidence: dict[str, Any]) -> StageJudgement:
    failed = [gate for gate in gates if not gate.passed]
    if failed:
        reason = "; ".join(
            f"{gate.name} failed: {gate.detail} (value {gate.value:.4g}, limit {gate.limit:g})"
            if gate.value is not None
            else f"{gate.name} failed: {gate.detail}"
            for gate in failed
        )
        return StageJudgement(stage, "rollback", reason, gates, evidence)
    return StageJudgement(
        stage, "advance", "every gate passed: " + ", ".join(g.name for g in gates), gates, evidence
    )


def act(rollout: Rollout, judgement: StageJudgement, actor: str) -> Transition | None:
    """Carry out a judgement through the rollout: advance steps the plan (the last step
    promotes), rollback retires the challenger, hold does nothing."""
    evidence = {"stage": judgement.stage, "reason": judgement.reason, **judgement.evidence}
    if judgement.action == "advance":
        return rollout.step(reason=judgement.reason, actor=actor, evidence=evidence)
    if judgement.action == "rollback":
        challenger = rollout.state().challenger
        if challenger is None:
            return None
        return rollout.retire(
            challenger, reason=f"gate failed: {judgement.reason}", actor=actor, evidence=evidence
        )
    return None
