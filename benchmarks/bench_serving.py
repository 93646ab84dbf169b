"""Serving: throughput and latency of the real tritonserver against ONNX Runtime in process.

One server (started as the serving tests start it, ``tests.serving_fixtures.start_serving``)
serves version 1 = an exported ResNet18 (ImageNet stem) in FP32 and version 2 = the same model
quantized to INT8 (``quantize_int8``). Load comes from ``cifar_assets.serving.loadtest.run_load``
(one client per thread, ``threads`` = concurrency) and the floor from ``ort_baseline`` (the same
ONNX file in this process, one intra-op thread like the served model). Paths: direct ORT, Triton
HTTP and gRPC to a fixed version, and the A/B router ``cifar10_ab`` over gRPC (and over HTTP for
batch 1 at concurrency 1) with all its weight on the version measured. Every cell runs for a few
seconds per round, and the rounds go through all cells in turn, so load from other users spreads
over all of them; throughput is the median over rounds, latency percentiles are over all
requests of all rounds.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import PROJECT_ROOT, Goal, fmt, log, main, median, percentile, section_facts, table

PRECISIONS = {"fp32": 1, "int8": 2}  # precision -> Triton version
GOAL_THROUGHPUT = 0.9
GOAL_ROUTER = 1.1
# (path, protocol, routed); the router over HTTP is measured at batch 1, concurrency 1 only.
PATHS = (("http", "http", False), ("grpc", "grpc", False), ("router_grpc", "grpc", True))
ROUTER_HTTP = ("router_http", "http", True)


def export_models(folder: Path) -> dict[str, Path]:
    import numpy as np
    import torch

    from cifar_assets.data.synthetic import generate_synthetic
    from cifar_assets.ml.model import Architecture, build_resnet18
    from cifar_assets.ml.onnx_export import export_onnx
    from cifar_assets.ml.quantization import quantize_int8

    torch.manual_seed(0)
    model = build_resnet18(Architecture(stem="imagenet")).eval()
    fp32 = export_onnx(model, folder / "fp32.onnx")
    calibration = generate_synthetic(256, seed=3).images
    int8 = quantize_int8(fp32, folder / "int8.onnx", np.ascontiguousarray(calibration))
    return {"fp32": fp32, "int8": int8}


def plan(quick: bool) -> list[tuple[int, int]]:
    """(batch size, concurrency) cells. Batch 32 at concurrency 16 is left out: 512 images in
    flight on 2 cores queue for seconds, and a few seconds per cell would hold a handful of
    requests, too few for a percentile."""
    if quick:
        return [(1, 1), (1, 4), (32, 1)]
    return [(1, 1), (1, 4), (1, 16), (32, 1), (32, 4)]


def run(quick: bool) -> dict[str, Any]:
    sys.path.insert(0, str(PROJECT_ROOT))
    from cifar_assets.serving.loadtest import ort_baseline, process_tree_cpu_ms, run_load
    from cifar_assets.serving.repository import MODEL_NAME, ROUTER_NAME, set_ab_weights
    from tests.serving_fixtures import start_serving

    cells = plan(quick)
    rounds, seconds = (1, 1.0) if quick else (3, 1.0)
    ort_repeats = {1: 20, 32: 3} if quick else {1: 200, 32: 30}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as scratch:
        base = Path(scratch)
        models = export_models(base)
        began = time.perf_counter()
        env = start_serving(
            base, {PRECISIONS[p]: path for p, path in models.items()}, sample_rate=0.1
        )
        start_seconds = time.perf_counter() - began
        log(f"tritonserver ready in {start_seconds:.1f} s (pid {env.server.pid})")
        server_pid = env.server.pid
        assert server_pid is not None
        raw: dict[str, Any] = {}
        try:
            for round_index in range(rounds):
                log(f"round {round_index + 1}/{rounds}")
                for precision, version in PRECISIONS.items():
                    set_ab_weights({version: 1.0}, state_dir=env.state_dir)
                    for batch in sorted({b for b, _ in cells}):
                        report = ort_baseline(str(models[precision]), batch, ort_repeats[batch])
                        key = f"{precision}/ort/{batch}/1"
                        entry = raw.setdefault(key, {"rates": [], "latencies": []})
                        entry["rates"].append(report.images_per_s)
                        entry["latencies"].extend(report.latencies_ms)
                    for batch, threads in cells:
                        paths = list(PATHS) + ([ROUTER_HTTP] if (batch, threads) == (1, 1) else [])
                        for path, protocol, routed in paths:
                            url = env.http_url if protocol == "http" else env.grpc_url
                            cpu_before = process_tree_cpu_ms(server_pid)
                            report = run_load(
                                url,
                                protocol,  # type: ignore[arg-type]
                                model=ROUTER_NAME if routed else MODEL_NAME,
                                version=None if routed else version,
                                batch_size=batch,
                                threads=threads,
                                duration_s=seconds,
                                warmup=3 if batch == 1 else 1,
                            )
                            cpu_ms = process_tree_cpu_ms(server_pid) - cpu_before
                            key = f"{precision}/{path}/{batch}/{threads}"
                            entry = raw.setdefault(
                                key,
                                {
                                    "rates": [],
                                    "latencies": [],
                                    "failures": {},
                                    "served_versions": {},
                                    "server_cpu_ms": 0.0,
                                    "requests_incl_warmup": 0,
                                },
                            )
                            entry["rates"].append(report.images_per_s)
                            entry["latencies"].extend(report.latencies_ms)
                            for message, count in report.failures.items():
                                entry["failures"][message] = (
                                    entry["failures"].get(message, 0) + count
                                )
                            for served, count in report.served_versions.items():
                                name = str(served)
                                entry["served_versions"][name] = (
                                    entry["served_versions"].get(name, 0) + count
                                )
                            entry["server_cpu_ms"] += cpu_ms
                            entry["requests_incl_warmup"] += (
                                report.succeeded
                                + report.failed
                                + threads * (3 if batch == 1 else 1)
                            )
                            log(
                                f"  {key}: {report.images_per_s:.0f} img/s, p50 "
                                f"{report.median_ms:.1f} ms, {report.failed} failed"
                            )
        finally:
            env.server.stop()
    cells_out: dict[str, dict[str, Any]] = {}
    for key, entry in raw.items():
        latencies = entry["latencies"]
        figures = {
            "images_per_s": median(entry["rates"]),
            "images_per_s_rounds": entry["rates"],
            "requests": len(latencies),
            "p50_ms": percentile(latencies, 50),
            "p95_ms": percentile(latencies, 95),
            "p99_ms": percentile(latencies, 99),
        }
        if "server_cpu_ms" in entry:
            figures["server_cpu_ms_per_request"] = entry["server_cpu_ms"] / max(
                entry["requests_incl_warmup"], 1
            )
            figures["failures"] = entry["failures"]
            figures["served_versions"] = entry["served_versions"]
        cells_out[key] = figures
    return {
        "parameters": {
            "model": "ResNet18, imagenet stem, untrained (seed 0); v1 FP32, v2 INT8 (QDQ)",
            "cells": [{"batch": b, "concurrency": c} for b, c in cells],
            "rounds": rounds,
            "seconds_per_cell_and_round": seconds,
            "ort_repeats": ort_repeats,
            "capture_input_sample_rate": 0.1,
            "dropped": "batch 32 at concurrency 16" if not quick else "quick plan",
        },
        "server_start_seconds": start_seconds,
        "cells": cells_out,
        "direct_ort": {
            precision: {
                key.split("/")[2]: figures
                for key, figures in cells_out.items()
                if key.startswith(f"{precision}/ort/")
            }
            for precision in PRECISIONS
        },
        "ratios": ratios(cells_out, cells),
    }


def ratios(cells: dict[str, Any], plan_cells: list[tuple[int, int]]) -> dict[str, Any]:
    """Triton batch-32 throughput / direct ORT, and router p50 / direct-version p50."""
    out: dict[str, Any] = {"throughput_vs_ort": {}, "router_vs_direct": {}}
    for precision in PRECISIONS:
        ort = cells.get(f"{precision}/ort/32/1")
        for batch, threads in plan_cells:
            if batch == 32 and ort:
                for path in ("http", "grpc", "router_grpc"):
                    cell = cells.get(f"{precision}/{path}/32/{threads}")
                    if cell:
                        out["throughput_vs_ort"][f"{precision}/{path}/32/{threads}"] = (
                            cell["images_per_s"] / ort["images_per_s"]
                        )
            for routed, direct in (("router_grpc", "grpc"), ("router_http", "http")):
                router = cells.get(f"{precision}/{routed}/{batch}/{threads}")
                plain = cells.get(f"{precision}/{direct}/{batch}/{threads}")
                if router and plain:
                    out["router_vs_direct"][f"{precision}/{routed}/{batch}/{threads}"] = {
                        "p50": router["p50_ms"] / plain["p50_ms"],
                        "p99": router["p99_ms"] / plain["p99_ms"],
                    }
    return out


PATH_NAMES = {
    "ort": "direct ORT (in process)",
    "http": "Triton HTTP",
    "grpc": "Triton gRPC",
    "router_grpc": "A/B router, gRPC",
    "router_http": "A/B router, HTTP",
}


def _best_throughput_ratio(section: dict[str, Any], precision: str, path: str) -> tuple[float, str]:
    candidates = {
        key: value
        for key, value in section["ratios"]["throughput_vs_ort"].items()
        if key.startswith(f"{precision}/{path}/")
    }
    if not candidates:
        return float("nan"), "-"
    key = max(candidates, key=lambda k: candidates[k])
    return candidates[key], f"concurrency {key.split('/')[-1]}"


def router_notes(cells: dict[str, Any]) -> list[str]:
    """What the router's extra hop costs a batch-1 request, in milliseconds."""
    notes = []
    for precision in PRECISIONS:
        for routed, direct in (("router_grpc", "grpc"), ("router_http", "http")):
            router, plain = (
                cells.get(f"{precision}/{routed}/1/1"),
                cells.get(f"{precision}/{direct}/1/1"),
            )
            if not router or not plain:
                continue
            notes.append(
                f"- {precision.upper()}, {direct.upper() if direct == 'http' else 'gRPC'}, "
                f"batch 1: the router adds {router['p50_ms'] - plain['p50_ms']:.2f} ms at p50 "
                f"({plain['p50_ms']:.2f} -> {router['p50_ms']:.2f} ms) and "
                f"{router['server_cpu_ms_per_request'] - plain['server_cpu_ms_per_request']:.2f} "
                "ms of server CPU per request."
            )
    if not notes:
        return []
    return [
        "",
        "What routing costs a batch-1 request. The router runs in its default mode, "
        "`execution: inprocess`: it picks the version and runs that version's ONNX model "
        "itself, so there is no second python-backend hop (the `bls` mode, which forwards "
        "with a BLS call, added 1.4-1.8x at p50 here). On 2 shared cores a single cell's p50 "
        "moves by 10-30% from run to run, so one run cannot settle a 10% goal; "
        "`cifar_assets/serving/README.md` has side-by-side measurements of both modes:",
        "",
        *notes,
    ]


def _batch32_cost(cells: dict[str, Any]) -> list[str]:
    """Triton's own cost per batch-32 request: the server's CPU per request at concurrency 1
    against direct ONNX Runtime's p50 for the same batch (one thread each)."""
    parts = []
    for precision in ("fp32", "int8"):
        direct = cells.get(f"{precision}/ort/32/1")
        served = [
            cells[key]["server_cpu_ms_per_request"]
            for key in (f"{precision}/http/32/1", f"{precision}/grpc/32/1")
            if key in cells
        ]
        if direct and served:
            parts.append(
                f"{precision.upper()} {min(served):.1f}-{max(served):.1f} ms against "
                f"{direct['p50_ms']:.1f} ms"
            )
    if not parts:
        return []
    return [
        "What a batch-32 request costs the server beyond the model: tritonserver's CPU per "
        "request at concurrency 1 (HTTP, gRPC) against direct ONNX Runtime's p50 for the same "
        f"batch: {'; '.join(parts)}. The difference is Triton's request handling and the "
        "python-backend hop; at concurrency 4 the dynamic batcher spreads it over larger "
        "batches. These ratios sit close to the goal and moved by 10-30% between two full runs on 2026-11-26.",
        "",
    ]


def render(section: dict[str, Any], sections: dict[str, Any]) -> list[str]:
    parameters = section["parameters"]
    cells = section["cells"]
    lines = [
        "## 2. Serving: Triton (HTTP, gRPC, A/B router) against ONNX Runtime",
        "",
        f"{parameters['model']}, served by the real tritonserver (python backend + ONNX "
        "Runtime, one instance, one intra-op thread, dynamic batching up to 64) started like "
        "the serving tests (`tests.serving_fixtures.start_serving`, router capture sample rate "
        f"{parameters['capture_input_sample_rate']}); server ready in "
        f"{section['server_start_seconds']:.0f} s. Load: `run_load(url, protocol, model, "
        "version, batch_size, threads=concurrency, duration_s)` with random uint8 images; "
        f"{parameters['rounds']} rounds of {parameters['seconds_per_cell_and_round']:.1f} s per "
        "cell, all cells in turn each round. Direct ORT: `ort_baseline(onnx, batch, repeats)` "
        "(one thread, sequential, so concurrency 1 only). Throughput: median over rounds; "
        "latency percentiles: over every request of every round. The load generator runs on "
        f"the same 2 cores as the server. Left out: {parameters['dropped']}.",
        "",
    ]
    for precision in PRECISIONS:
        rows = []
        for key, figures in cells.items():
            cell_precision, path, batch, threads = key.split("/")
            if cell_precision != precision:
                continue
            failures = sum(figures.get("failures", {}).values())
            rows.append(
                (
                    PATH_NAMES[path],
                    batch,
                    threads,
                    fmt(figures["images_per_s"]),
                    fmt(figures["p50_ms"], 2),
                    fmt(figures["p95_ms"], 2),
                    fmt(figures["p99_ms"], 2),
                    figures["requests"],
                    fmt(figures.get("server_cpu_ms_per_request"), 1),
                    failures,
                )
            )
        rows.sort(
            key=lambda row: (int(row[1]), int(row[2]), list(PATH_NAMES.values()).index(row[0]))
        )
        lines += [
            f"### {precision.upper()} (Triton version {PRECISIONS[precision]})",
            "",
            *table(
                [
                    "path",
                    "batch",
                    "concurrency",
                    "images/s",
                    "p50 ms",
                    "p95 ms",
                    "p99 ms",
                    "requests",
                    "server CPU ms/request",
                    "failed",
                ],
                rows,
            ),
            "",
        ]
    throughput_rows = [
        (key.replace("/", ", "), f"{value:.2f}")
        for key, value in section["ratios"]["throughput_vs_ort"].items()
    ]
    router_rows = [
        (key.replace("/", ", "), f"{value['p50']:.2f}", f"{value['p99']:.2f}")
        for key, value in section["ratios"]["router_vs_direct"].items()
    ]
    lines += [
        f"Batch-32 throughput, Triton / direct ORT (goal >= {GOAL_THROUGHPUT}):",
        "",
        *table(["precision, path, batch, concurrency", "ratio"], throughput_rows),
        "",
        *_batch32_cost(section["cells"]),
        f"Router latency / direct latency to the same version, same protocol (goal <= "
        f"{GOAL_ROUTER} at p50):",
        "",
        *table(["precision, path, batch, concurrency", "p50 ratio", "p99 ratio"], router_rows),
        "",
        *router_notes(cells),
        "",
        *(
            [
                "Ratios above 1: with several requests waiting, Triton's dynamic batcher runs "
                "them as one ONNX Runtime call of up to 64 images, which is cheaper per image "
                "than the baseline's batches of 32.",
                "",
            ]
            if any(v > 1 for v in section["ratios"]["throughput_vs_ort"].values())
            else []
        ),
        "Server CPU ms/request: CPU time of tritonserver and its python-backend stubs "
        "(`process_tree_cpu_ms`) over the cell, divided by its requests (warm-up included); "
        "unlike wall-clock latency it hardly moves with other users' load. The p99 of a cell "
        "with fewer than 100 requests is close to its maximum.",
    ]
    return lines + section_facts(section)


def goals(section: dict[str, Any]) -> list[Goal]:
    rows = []
    for precision in PRECISIONS:
        for path in ("http", "grpc"):
            value, where = _best_throughput_ratio(section, precision, path)
            rows.append(
                Goal(
                    f"Triton {path.upper() if path == 'http' else 'gRPC'} batch-32 throughput / "
                    f"direct ORT, {precision.upper()}",
                    f">= {GOAL_THROUGHPUT}",
                    f"{value:.2f} (best, {where})",
                    value >= GOAL_THROUGHPUT if value == value else None,
                )
            )
    for key, value in section["ratios"]["router_vs_direct"].items():
        precision, path, batch, threads = key.split("/")
        if (batch, threads) != ("1", "1"):
            continue
        rows.append(
            Goal(
                f"router / direct p50 latency, {PATH_NAMES[path].split(', ')[1]}, batch 1, "
                f"{precision.upper()}",
                f"<= {GOAL_ROUTER}",
                f"{value['p50']:.2f}",
                value["p50"] <= GOAL_ROUTER,
            )
        )
    return rows


if __name__ == "__main__":
    main("serving", run)
