"""A/B analysis on planted traffic: sample ratio mismatch, real and absent accuracy differences,
the always-valid test under repeated peeking, and the fixed-horizon sample size."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cifar_assets.drift.ab_stats import (
    ABDataError,
    ab_results_png,
    analyse_ab,
    fixed_horizon_sample_size,
    two_proportion_z_test,
    wilson_interval,
)

CONTROL, TREATMENT = 1, 2


def traffic(
    n: int,
    treatment_share: float,
    accuracy: dict[int, float],
    seed: int,
    feedback_rate: float = 1.0,
    error_rate: dict[int, float] | None = None,
) -> pd.DataFrame:
    """``n`` served images in time order, each version right with its own probability."""
    rng = np.random.default_rng(seed)
    version = np.where(rng.random(n) < treatment_share, TREATMENT, CONTROL)
    right = rng.random(n) < np.where(version == TREATMENT, accuracy[TREATMENT], accuracy[CONTROL])
    correct = pd.Series(right, dtype=object).where(rng.random(n) < feedback_rate)
    frame = pd.DataFrame(
        {
            "time": pd.date_range("2026-01-01", periods=n, freq="s", tz="UTC"),
            "served_version": version,
            "correct": correct,
            "latency_ms": np.where(version == TREATMENT, 12.0, 8.0) + rng.exponential(2.0, n),
        }
    )
    if error_rate is not None:
        frame["error"] = rng.random(n) < np.where(
            version == TREATMENT, error_rate[TREATMENT], error_rate[CONTROL]
        )
    return frame


def test_srm_caught_when_split_skewed() -> None:
    frame = traffic(10_000, 0.10, {CONTROL: 0.8, TREATMENT: 0.8}, seed=1)
    # Plant an 85/15 split against the intended 90/10.
    frame["served_version"] = np.where(np.arange(10_000) % 20 < 3, TREATMENT, CONTROL)

    report = analyse_ab(frame, {CONTROL: 0.9, TREATMENT: 0.1}, CONTROL, TREATMENT)

    print(f"\nSRM 85/15 vs 90/10: chi2={report.srm.chi_square:.1f} p={report.srm.p_value:.2g}")
    assert report.srm.observed == {CONTROL: 8500, TREATMENT: 1500}
    assert report.srm.expected == pytest.approx({CONTROL: 9000.0, TREATMENT: 1000.0})
    # (500^2 / 9000) + (500^2 / 1000) = 277.8
    assert report.srm.chi_square == pytest.approx(277.78, abs=0.01)
    assert report.srm.mismatch and report.srm.p_value < 1e-30
    assert report.decision == "rollback"
    assert "Sample ratio mismatch" in report.reason


def test_srm_not_raised_when_split_matches() -> None:
    frame = traffic(10_000, 0.10, {CONTROL: 0.8, TREATMENT: 0.8}, seed=2)

    report = analyse_ab(frame, {CONTROL: 0.9, TREATMENT: 0.1}, CONTROL, TREATMENT)

    print(f"\nSRM at 90/10: p={report.srm.p_value:.3f}")
    assert not report.srm.mismatch
    assert report.srm.p_value > 0.001
    assert report.versions[TREATMENT].share == pytest.approx(0.10, abs=0.01)


def test_traffic_to_a_version_outside_the_test_is_a_mismatch() -> None:
    frame = traffic(2_000, 0.5, {CONTROL: 0.8, TREATMENT: 0.8}, seed=3)
    frame.loc[frame.index[:50], "served_version"] = 7

    report = analyse_ab(frame, {CONTROL: 0.5, TREATMENT: 0.5}, CONTROL, TREATMENT)

    assert report.srm.unexpected_versions == [7]
    assert report.decision == "rollback"
    assert "[7]" in report.reason


def test_real_accuracy_difference_promotes() -> None:
    frame = traffic(4_000, 0.5, {CONTROL: 0.80, TREATMENT: 0.88}, seed=4, feedback_rate=0.8)

    report = analyse_ab(frame, {CONTROL: 0.5, TREATMENT: 0.5}, CONTROL, TREATMENT)

    test = report.accuracy_test
    print(f"\n0.80 vs 0.88: p={test.p_value:.2g} crossed after {test.crossed_at} labels")
    assert report.decision == "promote", report.reason
    assert test.direction == 1 and test.difference == pytest.approx(0.08, abs=0.03)
    assert test.crossed_at is not None and test.crossed_at < test.n_control + test.n_treatment
    for version, truth in ((CONTROL, 0.80), (TREATMENT, 0.88)):
        stats = report.versions[version]
        assert stats.accuracy_ci is not None
        assert stats.accuracy_ci[0] < truth < stats.accuracy_ci[1]
        assert stats.n_feedback == pytest.approx(0.8 * stats.requests, rel=0.08)
    latency = frame.loc[frame["served_version"] == TREATMENT, "latency_ms"]
    assert report.versions[TREATMENT].latency_p95_ms == pytest.approx(latency.quantile(0.95))
    assert report.versions[CONTROL].latency_p50_ms == pytest.approx(8.0 + 2.0 * np.log(2), abs=0.2)


def test_worse_treatment_rolls_back() -> None:
    frame = traffic(4_000, 0.5, {CONTROL: 0.88, TREATMENT: 0.80}, seed=5)

    report = analyse_ab(frame, {CONTROL: 0.5, TREATMENT: 0.5}, CONTROL, TREATMENT)

    assert report.decision == "rollback"
    assert report.accuracy_test.direction == -1
    assert "less accurate" in report.reason


def test_higher_error_rate_rolls_back_even_when_more_accurate() -> None:
    frame = traffic(
        6_000,
        0.5,
        {CONTROL: 0.80, TREATMENT: 0.88},
        seed=6,
        error_rate={CONTROL: 0.01, TREATMENT: 0.06},
    )

    report = analyse_ab(frame, {CONTROL: 0.5, TREATMENT: 0.5}, CONTROL, TREATMENT)

    assert report.error_test is not None and report.error_test.direction == 1
    assert report.decision == "rollback"
    assert "fails more requests" in report.reason
    assert report.versions[TREATMENT].error_rate == pytest.approx(0.06, abs=0.015)


def test_little_feedback_keeps_testing() -> None:
    frame = traffic(400, 0.5, {CONTROL: 0.8, TREATMENT: 0.8}, seed=7, feedback_rate=0.1)

    report = analyse_ab(frame, {CONTROL: 0.5, TREATMENT: 0.5}, CONTROL, TREATMENT)

    assert report.decision == "keep_testing"
    assert "Not enough feedback" in report.reason
    assert report.accuracy_test.p_value == 1.0


def test_no_false_winner_under_repeated_peeking() -> None:
    """200 A/A tests, each looked at every 100 requests: the always-valid test must name a winner
    at most about alpha of the time, while the naive z-test read at every look does not."""
    alpha, simulations, n, look_every = 0.05, 200, 2_000, 100
    started = time.perf_counter()
    always_valid_false, naive_false = 0, 0
    for seed in range(simulations):
        frame = traffic(n, 0.5, {CONTROL: 0.8, TREATMENT: 0.8}, seed=1000 + seed)
        stopped, naive = False, False
        for end in range(look_every, n + 1, look_every):
            report = analyse_ab(
                frame.iloc[:end], {CONTROL: 0.5, TREATMENT: 0.5}, CONTROL, TREATMENT, alpha=alpha
            )
            stopped = stopped or report.decision != "keep_testing"
            fixed_p = report.accuracy_test.fixed_horizon_p_value
            naive = naive or (fixed_p is not None and fixed_p < alpha)
        always_valid_false += stopped
        naive_false += naive
    rate, naive_rate = always_valid_false / simulations, naive_false / simulations
    elapsed = time.perf_counter() - started
    print(
        f"\nA/A with peeking every {look_every} of {n}: always-valid false winner rate {rate:.3f}, "
        f"naive z-test {naive_rate:.3f} ({simulations} simulations, {elapsed:.1f} s)"
    )
    margin = 2.33 * np.sqrt(alpha * (1 - alpha) / simulations)  # one-sided 99% binomial margin
    assert rate <= alpha + margin
    # The simulation can see peeking: the naive test read 20 times finds far more false winners.
    assert naive_rate > alpha + margin


def test_fixed_horizon_sample_size_gives_the_promised_power() -> None:
    n = fixed_horizon_sample_size(0.80, 0.02, alpha=0.05, power=0.8)
    rng = np.random.default_rng(8)
    control = rng.binomial(n, 0.80, size=2_000)
    treatment = rng.binomial(n, 0.82, size=2_000)
    found = np.mean(
        [two_proportion_z_test(c, n, t, n) < 0.05 for c, t in zip(control, treatment, strict=True)]
    )
    print(f"\nfixed horizon n per arm for 0.80 -> 0.82: {n}, simulated power {found:.3f}")
    assert 5_500 < n < 6_500
    assert found == pytest.approx(0.80, abs=0.03)


def test_wilson_interval_matches_published_values() -> None:
    # Newcombe (1998), Statistics in Medicine 17: 857-872, table I: 81/263 -> 0.2553-0.3662.
    low, high = wilson_interval(81, 263, alpha=0.05)
    assert (low, high) == pytest.approx((0.2553, 0.3662), abs=5e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=5e-4)
    # Values of the closed form (z = ndtri(1 - alpha/2)) this project used before scipy's, to
    # float precision; the 99% and 80% levels check that alpha reaches the interval.
    assert wilson_interval(81, 263) == pytest.approx((0.2552885198782742, 0.3662095769828000))
    assert wilson_interval(10, 10) == pytest.approx((0.7224672001371107, 1.0))
    assert wilson_interval(997, 1000, alpha=0.01) == pytest.approx(
        (0.9882064833170751, 0.9992418987689385)
    )
    assert wilson_interval(5, 7, alpha=0.2) == pytest.approx(
        (0.47246281655659694, 0.8746640094625457)
    )
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_srm_p_values_match_the_chi_square_distribution() -> None:
    # chi2 = 1 with one degree of freedom: P(X > 1) = 0.3173105 (two-sided 1-sigma); with two
    # degrees of freedom P(X > 5) = exp(-5/2).
    def srm(counts: dict[int, int], weights: dict[int, float]) -> tuple[float, float]:
        served = np.repeat(list(counts), list(counts.values()))
        records = pd.DataFrame({"served_version": served, "correct": np.nan, "latency_ms": 1.0})
        report = analyse_ab(records, weights, 1, 2)
        return report.srm.chi_square, report.srm.p_value

    assert srm({1: 55, 2: 45}, {1: 0.5, 2: 0.5}) == pytest.approx((1.0, 0.31731050786291115))
    assert srm({1: 30, 2: 40, 3: 50}, {1: 1.0, 2: 1.0, 3: 2.0}) == pytest.approx(
        (5.0, np.exp(-2.5))
    )


def test_bad_records_are_refused_with_a_hint() -> None:
    frame = traffic(100, 0.5, {CONTROL: 0.8, TREATMENT: 0.8}, seed=9).drop(columns="latency_ms")
    with pytest.raises(ABDataError, match=r"lack columns \['latency_ms'\].*join_feedback"):
        analyse_ab(frame, {CONTROL: 0.5, TREATMENT: 0.5}, CONTROL, TREATMENT)
    frame = traffic(100, 0.5, {CONTROL: 0.8, TREATMENT: 0.8}, seed=9)
    frame.loc[frame.index[3], "correct"] = "yes"
    with pytest.raises(ABDataError, match=r"'yes'.*True/False"):
        analyse_ab(frame, {CONTROL: 0.5, TREATMENT: 0.5}, CONTROL, TREATMENT)
    with pytest.raises(ABDataError, match="treatment version 2 has no positive weight"):
        analyse_ab(frame, {CONTROL: 1.0}, CONTROL, TREATMENT)


def test_report_serialises_and_plots(tmp_path: Path) -> None:
    frame = traffic(3_000, 0.3, {CONTROL: 0.80, TREATMENT: 0.88}, seed=10)
    report = analyse_ab(frame, {CONTROL: 0.7, TREATMENT: 0.3}, CONTROL, TREATMENT)

    data = json.loads(json.dumps(report.to_dict()))
    assert data["decision"] == report.decision
    assert data["versions"]["2"]["requests"] == report.versions[TREATMENT].requests
    assert data["accuracy_test"]["trajectory"][-1][1] == report.accuracy_test.p_value

    path = ab_results_png(report, tmp_path / "ab.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
