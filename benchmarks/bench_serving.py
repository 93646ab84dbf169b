"""Serving: throughput and latency of the real tritonserver against ONNX Runtime in process.

One server (``cifar_assets.serving.launcher.start_scratch_server``, as the serving tests start
theirs) serves version 1 = an exported ResNet18 (ImageNet stem) in FP32 and version 2 = the same
model quantized to INT8 (``quantize_int8``). Load comes from
``cifar_assets.serving.loadtest.run_load`` (one client per thread, ``threads`` = concurrency) and
the floor from ``ort_baseline``: in this process, one intra-op thread like the served model, the
very ``model_serving.onnx`` the server runs, fed the same uint8 images, so it does the server's
work (normalisation in the graph included) without the server. The old baseline (``model.onnx``
after numpy normalisation) is measured beside it at batch 32. Paths: direct ORT, Triton
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

from common import (
    PROJECT_ROOT,
    Goal,
    Template,
    blocks_apart,
    fmt,
    log,
    main,
    median,
    percentile,
    section_facts,
    table,
)

PRECISIONS = {"fp32": 1, "int8": 2}  # precision -> Triton version
GOAL_THROUGHPUT = 0.95
GOAL_ROUTER = 1.05
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
    from cifar_assets.serving.launcher import start_scratch_server
    from cifar_assets.serving.loadtest import ort_baseline, process_tree_cpu_ms, run_load
    from cifar_assets.serving.repository import (
        MODEL_NAME,
        ROUTER_NAME,
        SERVING_ONNX,
        set_ab_weights,
    )

    cells = plan(quick)
    rounds, seconds = (1, 1.0) if quick else (3, 1.0)
    ort_repeats = {1: 20, 32: 3, 64: 2} if quick else {1: 200, 32: 30, 64: 15}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as scratch:
        base = Path(scratch)
        models = export_models(base)
        began = time.perf_counter()
        server = start_scratch_server(
            base, {PRECISIONS[p]: path for p, path in models.items()}, sample_rate=0.1
        )
        start_seconds = time.perf_counter() - began
        log(f"tritonserver ready in {start_seconds:.1f} s (pid {server.pid})")
        server_pid = server.pid
        assert server_pid is not None
        served_onnx = {
            p: server.config.repo / MODEL_NAME / str(v) / SERVING_ONNX
            for p, v in PRECISIONS.items()
        }
        raw: dict[str, Any] = {}
        try:
            for round_index in range(rounds):
                log(f"round {round_index + 1}/{rounds}")
                for precision, version in PRECISIONS.items():
                    set_ab_weights({version: 1.0}, state_dir=server.config.state_dir)
                    baselines = [("ort", served_onnx[precision], batch) for batch in ort_repeats]
                    baselines.append(("ort_numpy", models[precision], 32))
                    for name, onnx_file, batch in baselines:
                        report = ort_baseline(str(onnx_file), batch, ort_repeats[batch])
                        key = f"{precision}/{name}/{batch}/1"
                        entry = raw.setdefault(key, {"rates": [], "latencies": []})
                        entry["rates"].append(report.images_per_s)
                        entry["latencies"].extend(report.latencies_ms)
                    for batch, threads in cells:
                        paths = list(PATHS) + ([ROUTER_HTTP] if (batch, threads) == (1, 1) else [])
                        for path, protocol, routed in paths:
                            url = server.http_url if protocol == "http" else server.grpc_url
                            cpu_before = process_tree_cpu_ms(server_pid)
                            own_before = process_tree_cpu_ms(server_pid, children=False)
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
                            own_ms = process_tree_cpu_ms(server_pid, children=False) - own_before
                            key = f"{precision}/{path}/{batch}/{threads}"
                            entry = raw.setdefault(
                                key,
                                {
                                    "rates": [],
                                    "latencies": [],
                                    "failures": {},
                                    "served_versions": {},
                                    "server_cpu_ms": 0.0,
                                    "tritonserver_cpu_ms": 0.0,
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
                            entry["tritonserver_cpu_ms"] += own_ms
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
            server.stop()
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
            requests = max(entry["requests_incl_warmup"], 1)
            figures["server_cpu_ms_per_request"] = entry["server_cpu_ms"] / requests
            # tritonserver's own process (HTTP/gRPC, scheduler, python backend's side of the
            # shared memory); the rest of server_cpu is the stubs (python + ONNX Runtime).
            figures["tritonserver_cpu_ms_per_request"] = entry["tritonserver_cpu_ms"] / requests
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
    """Triton batch-32 throughput / direct ORT doing the same work, and router p50 /
    direct-version p50.

    At concurrency 1 every Triton batch is one request of 32 images: the floor is ORT at batch
    32. At higher concurrency the dynamic batcher may run two requests as one call of 64, which
    is cheaper per image: the floor is then ORT's better rate of batch 32 and batch 64, so
    batching alone cannot lift a ratio above what ORT would reach given the same images."""
    out: dict[str, Any] = {"throughput_vs_ort": {}, "router_vs_direct": {}}
    for precision in PRECISIONS:
        ort32 = cells.get(f"{precision}/ort/32/1")
        ort64 = cells.get(f"{precision}/ort/64/1")
        for batch, threads in plan_cells:
            if batch == 32 and ort32:
                floor = ort32["images_per_s"]
                if threads > 1 and ort64:
                    floor = max(floor, ort64["images_per_s"])
                for path in ("http", "grpc", "router_grpc"):
                    cell = cells.get(f"{precision}/{path}/32/{threads}")
                    if cell:
                        out["throughput_vs_ort"][f"{precision}/{path}/32/{threads}"] = (
                            cell["images_per_s"] / floor
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
    "ort_numpy": "direct ORT, numpy normalisation",
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


def router_notes(template: Template, cells: dict[str, Any]) -> list[str]:
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
            cpu_added = router["server_cpu_ms_per_request"] - plain["server_cpu_ms_per_request"]
            notes += template.lines(
                "router_note",
                precision=precision.upper(),
                protocol=direct.upper() if direct == "http" else "gRPC",
                p50_added=f"{router['p50_ms'] - plain['p50_ms']:.2f}",
                direct_p50=f"{plain['p50_ms']:.2f}",
                router_p50=f"{router['p50_ms']:.2f}",
                cpu_added=f"{cpu_added:.2f}",
            )
    if not notes:
        return []
    return template.lines("router_notes", notes=notes)


def _batch32_cost(template: Template, cells: dict[str, Any]) -> list[str]:
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
                template.text(
                    "batch32_part",
                    precision=precision.upper(),
                    served_low=f"{min(served):.1f}",
                    served_high=f"{max(served):.1f}",
                    direct=f"{direct['p50_ms']:.1f}",
                )
            )
    if not parts:
        return []
    own = [
        cells[key]["tritonserver_cpu_ms_per_request"]
        for key in cells
        if key.endswith("/32/1") and "tritonserver_cpu_ms_per_request" in cells[key]
    ]
    return template.lines(
        "batch32_cost",
        costs="; ".join(parts),
        own_low=f"{min(own):.1f}",
        own_high=f"{max(own):.1f}",
    )


def render(section: dict[str, Any], sections: dict[str, Any]) -> list[str]:
    template = Template("serving")
    parameters = section["parameters"]
    cells = section["cells"]
    precisions = []
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
                    fmt(figures.get("tritonserver_cpu_ms_per_request"), 1),
                    failures,
                )
            )
        rows.sort(
            key=lambda row: (int(row[1]), int(row[2]), list(PATH_NAMES.values()).index(row[0]))
        )
        precisions.append(
            template.lines(
                "precision",
                precision=precision.upper(),
                version=str(PRECISIONS[precision]),
                table=table(
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
                        "of which tritonserver",
                        "failed",
                    ],
                    rows,
                ),
            )
        )
    throughput_rows = [
        (key.replace("/", ", "), f"{value:.2f}")
        for key, value in section["ratios"]["throughput_vs_ort"].items()
    ]
    router_rows = [
        (key.replace("/", ", "), f"{value['p50']:.2f}", f"{value['p99']:.2f}")
        for key, value in section["ratios"]["router_vs_direct"].items()
    ]
    above_one = any(v > 1 for v in section["ratios"]["throughput_vs_ort"].values())
    return template.lines(
        "section",
        model=parameters["model"],
        capture_rate=str(parameters["capture_input_sample_rate"]),
        server_start_seconds=f"{section['server_start_seconds']:.0f}",
        rounds=str(parameters["rounds"]),
        seconds_per_cell=f"{parameters['seconds_per_cell_and_round']:.1f}",
        dropped=str(parameters["dropped"]),
        precisions=blocks_apart(precisions),
        goal_throughput=str(GOAL_THROUGHPUT),
        throughput_table=table(["precision, path, batch, concurrency", "ratio"], throughput_rows),
        batch32_cost=_batch32_cost(template, cells),
        goal_router=str(GOAL_ROUTER),
        router_table=table(
            ["precision, path, batch, concurrency", "p50 ratio", "p99 ratio"], router_rows
        ),
        router_notes=router_notes(template, cells),
        noise_note=template.lines("noise_note") if above_one else [],
        facts=section_facts(section),
    )


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
