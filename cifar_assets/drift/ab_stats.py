"""A/B test analysis of two served model versions: traffic split, accuracy, latency, a decision.

Pure numpy/scipy on a table of served requests (one row per image), so the same code runs in an
asset, a notebook or a test:

- **Sample ratio mismatch (SRM)**: a chi-square goodness-of-fit test of the observed requests per
  version against the intended weights. ``p < 0.001`` (the usual industry threshold) means the
  assignment itself is broken (a router bug, a crashed version), so no comparison can be trusted.
- **Accuracy**: per version with a Wilson score interval, from the requests that got feedback.
- **Always-valid test of the accuracy difference**: the mixture sequential probability ratio test
  (mSPRT) of Johari, Koomen, Pekelis and Walsh ("Always valid inference", Operations Research
  2022) for a difference of two proportions, with a normal mixing distribution of standard
  deviation ``min_effect`` and the pooled binomial variance. Its p-value is evaluated after every
  feedback label, in time order, and the running minimum is kept, so the report is valid however
  often it is looked at: under equal accuracies the chance that it *ever* falls below ``alpha`` is
  at most about ``alpha`` (Ville's inequality; the normal approximation makes it asymptotic,
  hence the 30-label minimum per arm before it starts). The sign of the difference when the
  p-value first crossed ``alpha`` gives the winner.
- **Fixed-horizon sample size**: the labelled requests per arm a classical two-sided z-test needs
  to find ``min_effect`` with 80% power, for planning; the z-test p-value is reported too, but it
  is only valid when read once, at that sample size.

Decision: ``rollback`` on SRM, on a significantly higher error rate of the treatment (when the
table has an ``error`` column), or when the treatment is significantly less accurate;
``promote`` when it is significantly more accurate and neither problem exists; ``keep_testing``
otherwise. Every decision comes with a reason in words.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

Decision = Literal["promote", "rollback", "keep_testing"]
SRM_THRESHOLD = 0.001
MIN_LABELS_PER_ARM = 30  # the normal approximation behind the mSPRT needs this many per arm
_TRAJECTORY_POINTS = 200


class ABDataError(ValueError):
    """The A/B records or parameters are malformed; the message says which and how to fix it."""


@dataclass(frozen=True)
class VersionStats:
    version: int
    intended_weight: float
    requests: int
    share: float
    n_feedback: int
    n_correct: int
    accuracy: float | None
    accuracy_ci: tuple[float, float] | None  # Wilson score interval at 1 - alpha
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    error_rate: float | None  # None when the records have no "error" column


@dataclass(frozen=True)
class SRMCheck:
    observed: dict[int, int]
    expected: dict[int, float]
    chi_square: float
    p_value: float
    unexpected_versions: list[int]
    mismatch: bool


@dataclass(frozen=True)
class SequentialTest:
    """Always-valid (mSPRT) comparison of a proportion between treatment and control."""

    metric: str
    n_control: int
    n_treatment: int
    control_rate: float | None
    treatment_rate: float | None
    difference: float | None  # treatment - control
    p_value: float  # always valid: min over every look so far
    fixed_horizon_p_value: float | None  # two-sided z-test, valid only read once at a planned n
    significant: bool
    direction: int  # sign of the difference when the p-value first fell below alpha; 0 if never
    crossed_at: int | None  # labelled requests (both arms) seen when it first fell below alpha
    tau: float
    trajectory: list[tuple[int, float]]  # (labelled requests seen, always-valid p-value)


@dataclass(frozen=True)
class ABReport:
    control: int
    treatment: int
    alpha: float
    min_effect: float
    versions: dict[int, VersionStats]
    srm: SRMCheck
    accuracy_test: SequentialTest
    error_test: SequentialTest | None
    fixed_horizon_n_per_arm: int
    decision: Decision
    reason: str

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["versions"] = {str(version): asdict(stats) for version, stats in self.versions.items()}
        data["srm"]["observed"] = {str(k): v for k, v in self.srm.observed.items()}
        data["srm"]["expected"] = {str(k): v for k, v in self.srm.expected.items()}
        return data


def wilson_interval(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; stays inside [0, 1] at 0 or n successes.
    ``(0, 1)`` when there are no trials."""
    from scipy.stats import binomtest

    if n == 0:
        return (0.0, 1.0)
    interval = binomtest(successes, n).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return (float(interval.low), float(interval.high))


def two_proportion_z_test(
    control_successes: int, control_n: int, treatment_successes: int, treatment_n: int
) -> float:
    """Two-sided p-value of the pooled two-proportion z-test (valid for one look only)."""
    from scipy.special import ndtr

    pooled = (control_successes + treatment_successes) / (control_n + treatment_n)
    variance = pooled * (1 - pooled) * (1 / control_n + 1 / treatment_n)
    if variance <= 0:
        return 1.0
    z = (treatment_successes / treatment_n - control_successes / control_n) / np.sqrt(variance)
    return float(2 * ndtr(-abs(z)))


def fixed_horizon_sample_size(
    baseline_rate: float, min_effect: float, alpha: float = 0.05, power: float = 0.8
) -> int:
    """Labelled requests per arm for a two-sided two-proportion z-test to detect ``min_effect``
    (an absolute change of ``baseline_rate``) with the given power, arms of equal size."""
    from scipy.special import ndtri

    p1 = float(np.clip(baseline_rate, 0.01, 0.99))
    p2 = p1 + min_effect if p1 + min_effect < 1 else p1 - min_effect
    mean = (p1 + p2) / 2
    z_alpha, z_power = float(ndtri(1 - alpha / 2)), float(ndtri(power))
    root = z_alpha * np.sqrt(2 * mean * (1 - mean)) + z_power * np.sqrt(
        p1 * (1 - p1) + p2 * (1 - p2)
    )
    return int(np.ceil(root**2 / min_effect**2))


def msprt_p_values(
    is_treatment: np.ndarray, outcome: np.ndarray, tau: float, min_per_arm: int = MIN_LABELS_PER_ARM
) -> tuple[np.ndarray, np.ndarray]:
    """Always-valid p-values after each observation (time order) and the running difference.

    With ``theta`` the difference of the two observed rates and ``v`` its variance under the null
    (pooled rate, smoothed by one success and one failure so it is never zero), the mixture
    likelihood ratio is ``sqrt(v / (v + tau^2)) * exp(tau^2 theta^2 / (2 v (v + tau^2)))``; the
    p-value is the running minimum of its inverse.
    """
    treated = np.asarray(is_treatment, dtype=bool)
    success = np.asarray(outcome, dtype=bool)
    n_treatment = np.cumsum(treated)
    n_control = np.cumsum(~treated)
    k_treatment = np.cumsum(treated & success)
    k_control = np.cumsum(~treated & success)
    started = (n_control >= min_per_arm) & (n_treatment >= min_per_arm)
    safe_control, safe_treatment = np.maximum(n_control, 1), np.maximum(n_treatment, 1)
    theta = k_treatment / safe_treatment - k_control / safe_control
    pooled = (k_control + k_treatment + 1) / (n_control + n_treatment + 2)
    variance = pooled * (1 - pooled) * (1 / safe_control + 1 / safe_treatment)
    tau2 = tau * tau
    log_ratio = 0.5 * np.log(variance / (variance + tau2)) + tau2 * theta**2 / (
        2 * variance * (variance + tau2)
    )
    p_values = np.where(started, np.minimum(1.0, np.exp(-log_ratio)), 1.0)
    return np.minimum.accumulate(p_values), theta


def _sequential_test(
    metric: str, is_treatment: np.ndarray, outcome: np.ndarray, alpha: float, tau: float
) -> SequentialTest:
    n = len(outcome)
    treated, success = is_treatment.astype(bool), outcome.astype(bool)
    n_treatment, n_control = int(treated.sum()), int((~treated).sum())
    k_treatment, k_control = int((treated & success).sum()), int((~treated & success).sum())
    control_rate = k_control / n_control if n_control else None
    treatment_rate = k_treatment / n_treatment if n_treatment else None
    if n == 0:
        p_values, theta = np.ones(0), np.zeros(0)
    else:
        p_values, theta = msprt_p_values(treated, success, tau)
    crossed = np.flatnonzero(p_values < alpha)
    crossed_at = int(crossed[0]) + 1 if crossed.size else None
    direction = int(np.sign(theta[crossed[0]])) if crossed.size else 0
    step = max(1, n // _TRAJECTORY_POINTS)
    points = sorted({*range(step - 1, n, step), n - 1}) if n else []
    return SequentialTest(
        metric=metric,
        n_control=n_control,
        n_treatment=n_treatment,
        control_rate=control_rate,
        treatment_rate=treatment_rate,
        difference=None
        if control_rate is None or treatment_rate is None
        else treatment_rate - control_rate,
        p_value=float(p_values[-1]) if n else 1.0,
        fixed_horizon_p_value=two_proportion_z_test(k_control, n_control, k_treatment, n_treatment)
        if n_control and n_treatment
        else None,
        significant=crossed_at is not None and direction != 0,
        direction=direction,
        crossed_at=crossed_at,
        tau=tau,
        trajectory=[(i + 1, float(p_values[i])) for i in points],
    )


def _correct_flags(column: pd.Series) -> np.ndarray:
    """``correct`` as float 1.0 / 0.0, NaN where no feedback exists."""
    values = column.to_numpy()
    if values.dtype == bool:
        return values.astype(np.float64)
    missing = np.asarray(pd.isna(values), dtype=bool)
    flags = np.full(len(values), np.nan)
    try:
        flags[~missing] = values[~missing].astype(np.float64)
        valid = bool(np.isin(flags[~missing], (0.0, 1.0)).all())
    except (TypeError, ValueError):
        valid = False
    if not valid:
        bad = [i for i in np.flatnonzero(~missing) if values[i] not in (True, False)]
        raise ABDataError(
            f"records['correct'] holds {[values[i] for i in bad[:5]]} at rows "
            f"{column.index[bad[:5]].tolist()}; use True/False, or NaN where no feedback exists."
        )
    return flags


def _check_inputs(
    records: pd.DataFrame,
    intended_weights: dict[int, float],
    control: int,
    treatment: int,
    alpha: float,
    min_effect: float,
) -> None:
    missing = [c for c in ("served_version", "correct", "latency_ms") if c not in records.columns]
    if missing:
        raise ABDataError(
            f"A/B records lack columns {missing} (they have {list(records.columns)}); build them "
            "from the capture with join_feedback, one row per served image."
        )
    if control == treatment:
        raise ABDataError(
            f"control and treatment are both version {control}; compare two different versions."
        )
    for role, version in (("control", control), ("treatment", treatment)):
        if intended_weights.get(version, 0) <= 0:
            raise ABDataError(
                f"The {role} version {version} has no positive weight in intended_weights "
                f"{intended_weights}; pass the weights the router was configured with."
            )
    if any(weight < 0 for weight in intended_weights.values()):
        raise ABDataError(f"intended_weights {intended_weights} has a negative weight.")
    if not 0 < alpha < 1 or not 0 < min_effect < 1:
        raise ABDataError(
            f"alpha={alpha} and min_effect={min_effect} must lie strictly between 0 and 1 "
            "(e.g. alpha=0.05, min_effect=0.02 for two accuracy points)."
        )


def _srm_check(version: np.ndarray, intended_weights: dict[int, float]) -> SRMCheck:
    from scipy.stats import chisquare

    weighted = sorted(v for v, w in intended_weights.items() if w > 0)
    total_weight = sum(intended_weights[v] for v in weighted)
    observed = {v: int((version == v).sum()) for v in weighted}
    n = sum(observed.values())
    expected = {v: n * intended_weights[v] / total_weight for v in weighted}
    unexpected = sorted(int(v) for v in np.unique(version) if v not in weighted)
    if n == 0 or len(weighted) < 2:
        chi_square, p_value = 0.0, 1.0
    else:
        test = chisquare([observed[v] for v in weighted], [expected[v] for v in weighted])
        chi_square, p_value = float(test.statistic), float(test.pvalue)
    return SRMCheck(
        observed=observed,
        expected=expected,
        chi_square=chi_square,
        p_value=p_value,
        unexpected_versions=unexpected,
        mismatch=p_value < SRM_THRESHOLD or bool(unexpected),
    )


def _version_stats(
    version: int,
    weight: float,
    served: np.ndarray,
    correct: np.ndarray,
    latency: np.ndarray,
    error: np.ndarray | None,
    alpha: float,
) -> VersionStats:
    rows = served == version
    requests = int(rows.sum())
    labelled = correct[rows & ~np.isnan(correct)]
    n_correct = int(labelled.sum())
    times = latency[rows & ~np.isnan(latency)]
    return VersionStats(
        version=version,
        intended_weight=weight,
        requests=requests,
        share=requests / len(served) if len(served) else 0.0,
        n_feedback=len(labelled),
        n_correct=n_correct,
        accuracy=n_correct / len(labelled) if len(labelled) else None,
        accuracy_ci=wilson_interval(n_correct, len(labelled), alpha) if len(labelled) else None,
        latency_p50_ms=float(np.quantile(times, 0.5)) if len(times) else None,
        latency_p95_ms=float(np.quantile(times, 0.95)) if len(times) else None,
        error_rate=float(error[rows].mean()) if error is not None and requests else None,
    )


def analyse_ab(
    records: pd.DataFrame,
    intended_weights: dict[int, float],
    control: int,
    treatment: int,
    alpha: float = 0.05,
    min_effect: float = 0.02,
) -> ABReport:
    """Analyse an A/B test; ``records`` has one row per served image with ``served_version``,
    ``correct`` (bool, NaN without feedback) and ``latency_ms``, optionally ``time`` (rows are
    taken in time order, else in table order) and ``error`` (bool: the request failed)."""
    _check_inputs(records, intended_weights, control, treatment, alpha, min_effect)
    frame = records.sort_values("time", kind="stable") if "time" in records.columns else records
    if frame["served_version"].isna().any():
        raise ABDataError(
            "records['served_version'] has missing values; every served row needs the model "
            "version that answered it (drop rows of failed routing first)."
        )
    served = frame["served_version"].to_numpy(dtype=np.int64)
    correct = _correct_flags(frame["correct"])
    latency = frame["latency_ms"].to_numpy(dtype=np.float64)
    error = frame["error"].to_numpy(dtype=bool) if "error" in frame.columns else None

    srm = _srm_check(served, intended_weights)
    versions = {
        version: _version_stats(version, float(weight), served, correct, latency, error, alpha)
        for version, weight in sorted(intended_weights.items())
    }
    in_test = (served == control) | (served == treatment)
    labelled = in_test & ~np.isnan(correct)
    accuracy_test = _sequential_test(
        "accuracy", served[labelled] == treatment, correct[labelled] > 0.5, alpha, tau=min_effect
    )
    error_test = None
    if error is not None:
        error_test = _sequential_test(
            "error_rate", served[in_test] == treatment, error[in_test], alpha, tau=min_effect
        )
    control_accuracy = versions[control].accuracy
    horizon = fixed_horizon_sample_size(
        0.5 if control_accuracy is None else control_accuracy, min_effect, alpha
    )
    decision, reason = _decide(
        srm, accuracy_test, error_test, horizon, control, treatment, alpha, min_effect
    )
    return ABReport(
        control=control,
        treatment=treatment,
        alpha=alpha,
        min_effect=min_effect,
        versions=versions,
        srm=srm,
        accuracy_test=accuracy_test,
        error_test=error_test,
        fixed_horizon_n_per_arm=horizon,
        decision=decision,
        reason=reason,
    )


def _decide(
    srm: SRMCheck,
    accuracy: SequentialTest,
    errors: SequentialTest | None,
    horizon: int,
    control: int,
    treatment: int,
    alpha: float,
    min_effect: float,
) -> tuple[Decision, str]:
    if srm.mismatch:
        observed = ", ".join(f"v{v}: {n}" for v, n in srm.observed.items())
        expected = ", ".join(f"v{v}: {n:.0f}" for v, n in srm.expected.items())
        extra = (
            f"; traffic also reached versions {srm.unexpected_versions} outside the test"
            if srm.unexpected_versions
            else ""
        )
        return "rollback", (
            f"Sample ratio mismatch: requests {observed} against expected {expected} "
            f"(chi-square p={srm.p_value:.2g} < {SRM_THRESHOLD}){extra}. The assignment is "
            "broken, so the comparison cannot be trusted: roll back and check the router."
        )
    if errors is not None and errors.significant and errors.direction > 0:
        return "rollback", (
            f"Version {treatment} fails more requests than version {control} "
            f"({errors.treatment_rate:.2%} against {errors.control_rate:.2%}, always-valid "
            f"p={errors.p_value:.2g} < {alpha})."
        )
    if accuracy.significant:
        verdict: Decision = "promote" if accuracy.direction > 0 else "rollback"
        word = "more" if accuracy.direction > 0 else "less"
        return verdict, (
            f"Version {treatment} is significantly {word} accurate than version {control}: "
            f"{accuracy.treatment_rate:.2%} against {accuracy.control_rate:.2%} "
            f"(always-valid p={accuracy.p_value:.2g} < {alpha}, first reached after "
            f"{accuracy.crossed_at} labelled requests)."
        )
    if accuracy.n_control < MIN_LABELS_PER_ARM or accuracy.n_treatment < MIN_LABELS_PER_ARM:
        return "keep_testing", (
            f"Not enough feedback yet: {accuracy.n_control} labelled requests for version "
            f"{control} and {accuracy.n_treatment} for version {treatment}; the test starts at "
            f"{MIN_LABELS_PER_ARM} per arm."
        )
    return "keep_testing", (
        f"No significant accuracy difference yet (always-valid p={accuracy.p_value:.2g}, "
        f"difference {accuracy.difference:+.2%}); a fixed-horizon test would need {horizon} "
        f"labelled requests per arm to find a change of {min_effect:.0%} with 80% power; "
        f"there are {accuracy.n_control} and {accuracy.n_treatment}."
    )


def ab_results_png(report: ABReport, path: Path) -> Path:
    """Accuracy with Wilson intervals and latency per version, and the always-valid p-value over
    the labelled requests seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (acc_axis, latency_axis, p_axis) = plt.subplots(1, 3, figsize=(13, 3.6))
    stats = list(report.versions.values())
    labels = [f"v{s.version}" for s in stats]
    positions = np.arange(len(stats))
    accuracy = [s.accuracy or 0.0 for s in stats]
    # clipped at 0: at an accuracy of exactly 0 or 1 rounding can put the bound a hair inside
    low = [
        max(0.0, (s.accuracy or 0.0) - s.accuracy_ci[0]) if s.accuracy_ci else 0.0 for s in stats
    ]
    high = [
        max(0.0, s.accuracy_ci[1] - (s.accuracy or 0.0)) if s.accuracy_ci else 0.0 for s in stats
    ]
    acc_axis.bar(positions, accuracy, yerr=[low, high], capsize=6, color="tab:blue")
    acc_axis.set_xticks(positions, labels)
    acc_axis.set_ylim(0, 1)
    acc_axis.set_title(f"Accuracy ({1 - report.alpha:.0%} Wilson interval)")
    width = 0.38
    latency_axis.bar(
        positions - width / 2, [s.latency_p50_ms or 0 for s in stats], width, label="p50"
    )
    latency_axis.bar(
        positions + width / 2, [s.latency_p95_ms or 0 for s in stats], width, label="p95"
    )
    latency_axis.set_xticks(positions, labels)
    latency_axis.set_title("Latency (ms)")
    latency_axis.legend()
    trajectory = report.accuracy_test.trajectory
    if trajectory:
        seen, p_values = zip(*trajectory, strict=True)
        # An overwhelming effect drives the p-value to 0, which a log axis cannot show.
        p_axis.plot(seen, np.maximum(p_values, 1e-16), color="tab:green")
    p_axis.axhline(report.alpha, color="tab:red", linestyle="--", label=f"alpha {report.alpha}")
    p_axis.set_yscale("log")
    p_axis.set_xlabel("labelled requests")
    p_axis.set_title(f"Always-valid p-value: {report.decision}")
    p_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
