"""The A/B router's two execution modes against calling the version directly, side by side.

    .venv/bin/python benchmarks/router_modes.py [ROUNDS] [--out results.json]

One tritonserver with the serving benchmark's models (ResNet18 ImageNet stem, v1 FP32, v2 INT8).
Each round, for each version and each router mode (``inprocess``, ``bls``), the router is
reloaded in that mode with all weight on the version, then batch-1 requests from one client run
for 1 s directly against the version and 1 s through the router, over HTTP and gRPC, the order of
the pair alternating between rounds. Prints the p50/p99 latency, throughput and server CPU per
request of each cell and its ratio to direct; writes the raw figures as JSON with ``--out``.
A benchmark: it prints figures and never fails on time.
"""

from __future__ import annotations

import argparse
import json
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
from cifar_assets.serving.launcher import start_scratch_server
from cifar_assets.serving.loadtest import process_tree_cpu_ms, run_load

MODES = ("inprocess", "bls")
WARMUP = 3


def load_average() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rounds", nargs="?", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
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
