"""The A/B router's two execution modes against calling the version directly, side by side.

    .venv/bin/python benchmarks/router_modes.py [ROUNDS] [--out results.json]
    .venv/bin/python benchmarks/router_modes.py [ROUNDS] --shadow [--out results.json]

One tritonserver with the serving benchmark's models (ResNet18 ImageNet stem, v1 FP32, v2 INT8).
Each round, for each version and each router mode (``inprocess``, ``bls``), the router is
reloaded in that mode with all weight on the version, then batch-1 requests from one client run
for 1 s directly against the version and 1 s through the router, over HTTP and gRPC, the order of
the pair alternating between rounds. Prints the p50/p99 latency, throughput and server CPU per
request of each cell and its ratio to direct; writes the raw figures as JSON with ``--out``.

With ``--shadow``: the cost of a shadow target to the user's answer (the issue's goal: router p50
with a shadow target at most 1.05x without). v1 serves all traffic in ``inprocess`` mode; each
round measures 3 s of batch-1 HTTP requests from one client without a shadow target and 3 s with
every request mirrored to v2 (the same FP32 file under another version number: a candidate as
heavy as the champion), the order alternating between rounds, the shadow target written as the
rollout writes it. Prints each round's p50s, the medians over rounds and their ratio, and how many
requests the router really mirrored.

A benchmark: it prints figures and never fails on time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import export_models

from cifar_assets.serving import repository
from cifar_assets.serving.capture import read_shadow
from cifar_assets.serving.launcher import start_scratch_server
from cifar_assets.serving.loadtest import process_tree_cpu_ms, run_load
from cifar_assets.serving.rollout import write_shadow_target

MODES = ("inprocess", "bls")
WARMUP = 3
SHADOW_WARMUP = 10  # the first request after a change may open the candidate's session
SHADOW_PHASE_S = 3.0


def shadow_overhead(rounds: int, out: Path | None) -> None:
    """Router p50 with and without a shadow target, alternating (module docstring)."""
    p50: dict[str, list[float]] = {"without": [], "with": []}
    sent_with_shadow = 0
    with tempfile.TemporaryDirectory(prefix="router-shadow-") as scratch:
        base = Path(scratch)
        models = export_models(base)
        candidate = shutil.copy(models["fp32"], base / "candidate.onnx")
        server = start_scratch_server(base, {1: models["fp32"], 2: Path(candidate)})
        config = server.config
        load_start = load_average()
        try:
            for round_index in range(rounds):
                phases: list[tuple[str, tuple[int, float] | None]] = [
                    ("without", None),
                    ("with", (2, 1.0)),
                ]
                for name, shadow in phases[:: 1 if round_index % 2 == 0 else -1]:
                    write_shadow_target(config.state_dir, shadow)
                    # The router re-reads its files at least once a second; a mirror still
                    # queued from the previous phase drains meanwhile.
                    time.sleep(1.5)
                    result = run_load(
                        config.http_url,
                        "http",
                        model=repository.ROUTER_NAME,
                        batch_size=1,
                        threads=1,
                        duration_s=SHADOW_PHASE_S,
                        warmup=SHADOW_WARMUP,
                    )
                    if result.failed:
                        raise RuntimeError(f"{result.failed} requests failed: {result.failures}")
                    p50[name].append(float(np.percentile(result.latencies_ms, 50)))
                    if shadow is not None:
                        sent_with_shadow += result.succeeded + SHADOW_WARMUP
                print(
                    f"round {round_index + 1}/{rounds}: p50 without {p50['without'][-1]:.2f} ms, "
                    f"with shadow {p50['with'][-1]:.2f} ms",
                    file=sys.stderr,
                    flush=True,
                )
            write_shadow_target(config.state_dir, None)
            time.sleep(2)  # the shadow thread writes its last records
            mirrored = int((read_shadow(config.capture_dir)["shadow_version"] == 2).sum())
        finally:
            server.stop()
        load_end = load_average()
    without, with_shadow = statistics.median(p50["without"]), statistics.median(p50["with"])
    ratios = [w / wo for w, wo in zip(p50["with"], p50["without"], strict=True)]
    print(f"load average at the start {load_start}, at the end {load_end}; {rounds} rounds")
    print(
        f"router p50 (median of {rounds} rounds): without shadow {without:.2f} ms, with shadow "
        f"{with_shadow:.2f} ms, ratio {with_shadow / without:.3f} (goal <= 1.05); median "
        f"per-round ratio {statistics.median(ratios):.3f}; mirrored {mirrored} of "
        f"{sent_with_shadow} requests sent with a shadow target"
    )
    if out is not None:
        payload = {
            "load_average": [load_start, load_end],
            "rounds": rounds,
            "p50_ms": p50,
            "median_p50_ms": {"without": without, "with": with_shadow},
            "ratio": with_shadow / without,
            "mirrored": mirrored,
            "sent_with_shadow": sent_with_shadow,
        }
        out.write_text(json.dumps(payload, indent=2) + "\n")


def load_average() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rounds", nargs="?", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--shadow", action="store_true", help="measure the shadow target's cost instead"
    )
    args = parser.parse_args()
    if args.shadow:
        shadow_overhead(args.rounds, args.out)
        return
    cells: dict[str, dict[str, Any]] = {}

    def measure(key: str, url: str, protocol: str, model: str, version: int | None) -> None:
        before = process_tree_cpu_ms(server.pid)
        result = run_load(
            url,
            protocol,
            model=model,
            version=version,
            batch_size=1,
            threads=1,
            duration_s=1.0,
            warmup=WARMUP,
        )
        cell = cells.setdefault(key, {"rates": [], "latencies": [], "cpu_ms": 0.0, "n": 0})
        cell["cpu_ms"] += process_tree_cpu_ms(server.pid) - before
        cell["n"] += result.succeeded + result.failed + WARMUP
        cell["rates"].append(result.images_per_s)
        cell["latencies"].extend(result.latencies_ms)

    with tempfile.TemporaryDirectory(prefix="router-modes-") as scratch:
        base = Path(scratch)
        models = export_models(base)
        server = start_scratch_server(base, {1: models["fp32"], 2: models["int8"]})
        config = server.config
        load_start = load_average()
        try:
            for round_index in range(args.rounds):
                for precision, version in (("fp32", 1), ("int8", 2)):
                    repository.set_ab_weights({version: 1.0}, state_dir=config.state_dir)
                    for mode in MODES:
                        repository.load_router(
                            config.http_url,
                            repo=config.repo,
                            state_dir=config.state_dir,
                            capture_dir=config.capture_dir,
                            capture_input_sample_rate=config.capture_input_sample_rate,
                            execution=mode,
                        )
                        time.sleep(2)
                        for protocol in ("http", "grpc"):
                            url = config.http_url if protocol == "http" else config.grpc_url
                            pair = [
                                (f"{precision}/direct/{protocol}", repository.MODEL_NAME, version),
                                (f"{precision}/{mode}/{protocol}", repository.ROUTER_NAME, None),
                            ]
                            for key, model, served in pair[:: 1 if round_index % 2 else -1]:
                                measure(key, url, protocol, model, served)
                print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            server.stop()
        load_end = load_average()

    figures = {
        key: {
            "images_per_s": float(np.median(cell["rates"])),
            "p50_ms": float(np.percentile(cell["latencies"], 50)),
            "p99_ms": float(np.percentile(cell["latencies"], 99)),
            "server_cpu_ms_per_request": cell["cpu_ms"] / max(cell["n"], 1),
            "requests": len(cell["latencies"]),
        }
        for key, cell in cells.items()
    }
    print(f"load average at the start {load_start}, at the end {load_end}; {args.rounds} rounds")
    print("| cell | images/s | p50 ms | p99 ms | server CPU ms/request | p50 / direct |")
    print("|---|---|---|---|---|---|")
    for key in sorted(figures):
        precision, _, protocol = key.split("/")
        direct = figures[f"{precision}/direct/{protocol}"]
        cell = figures[key]
        print(
            f"| {key} | {cell['images_per_s']:.0f} | {cell['p50_ms']:.2f} | {cell['p99_ms']:.2f} "
            f"| {cell['server_cpu_ms_per_request']:.2f} | {cell['p50_ms'] / direct['p50_ms']:.2f} |"
        )
    if args.out is not None:
        payload = {"load_average": [load_start, load_end], "rounds": args.rounds, "cells": figures}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
