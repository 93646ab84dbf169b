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

from common import PROJECT_ROOT, Goal, fmt, log, main, median, percentile, section_facts, table

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
    own = [
        cells[key]["tritonserver_cpu_ms_per_request"]
        for key in cells
        if key.endswith("/32/1") and "tritonserver_cpu_ms_per_request" in cells[key]
    ]
    return [
        "What a batch-32 request costs the server beyond the model: the CPU of tritonserver "
        "and its stubs per request at concurrency 1 (HTTP, gRPC) against direct ONNX "
        f"Runtime's p50 for the same batch: {'; '.join(parts)}. Of that, tritonserver's own "
        f"process (HTTP/gRPC, scheduler, the python backend's side) took {min(own):.1f}-"
        f"{max(own):.1f} ms; the rest is the stub, which is ONNX Runtime plus about half a "
        "millisecond of python. CPU time also grows under other users' load (shared caches "
        "and memory bandwidth), so it is compared within one run only.",
        "",
        *SPEED_NOTES,
        "",
    ]


# What was tried to close the gap, with the measurements behind it (2 shared cores; each
# figure's command is named).
SPEED_NOTES = [
    "Where the time goes, and what was tried (issue 13):",
    "",
    "- Normalisation in the graph. `write_version` derives `model_serving.onnx` from "
    "`model.onnx` (`cifar_assets.ml.onnx_export.add_uint8_input`: Transpose on the uint8 "
    "bytes, Cast, Div 255, Sub mean, Div std, then one Concat with the float input), and the "
    "classifier and the router run only that session: a dynamic batch of uint8 and float "
    "requests is one ONNX Runtime call. Its logits equal the numpy path's bit for bit "
    "(`tests/test_onnx.py::test_uint8_graph_answers_as_numpy_normalisation_does`, FP32 and "
    "INT8). What it saves is numpy's normalisation, 0.74-0.84 ms per batch of 32 measured in "
    "process; ONNX Runtime's own preprocessing costs part of that back (graph against "
    "numpy + ORT, batch 32, one thread: FP32 29.5 against 29.3 ms, INT8 18.9 against 18.5 "
    "ms, same run), so the gain is about 3% at most, as the earlier prototype found.",
    "- Copies. The python backend copies each input out of shared memory into the numpy array "
    "that `as_numpy()` returns when it builds the request's tensor (pybind11's `py::array` "
    "without a base copies; python_backend `src/pb_tensor.cc`), before `execute` runs, with "
    "or without DLPack; `to_dlpack()` would hand out the shared-memory buffer instead, but "
    "that copy has been made by then. Outputs are copied into shared memory once, from "
    "`pb_utils.Tensor(name, array)` and from `Tensor.from_dlpack` alike on a CPU. So DLPack "
    "saves nothing here; what the code does avoid is a copy of a request that is alone in "
    "its batch (its array goes to ONNX Runtime as it is). A batch-32 uint8 input is 98 KB, "
    "about 10 us to copy: not where the gap is.",
    "- Server CPU per request. The `of which tritonserver` column: HTTP/gRPC, the scheduler "
    "and the backend's side of the stub's shared memory take 0.6-1.0 ms of a batch-32 "
    "request, the python in `execute` 0.3-0.5 ms (an instrumented copy of "
    "classifier_model.py timed `execute` and `session.run` inside the stub, FP32 and INT8, "
    "40-batch averages). At concurrency 1 the stub then waits 2.3-4.8 ms between batches: the "
    "response's trip to the client and the next request's trip back, which a sequential "
    "client cannot overlap; at concurrency 4 the wait between batches fell to 0.8-1.4 ms per "
    "batch of 60-62 images (the backend's hand-over of responses and the next batch).",
    "- Contention. Whatever runs on the other core slows ONNX Runtime on this one: with a "
    "numpy matmul loop on the second core, one-thread batch-32 inference went from 18.7 to "
    "21.7 ms (INT8) and from 28.8 to 33.1 ms (FP32). The server always has its client, "
    "HTTP/gRPC threads and other users' jobs beside it; the baseline runs alone.",
    "- Dynamic batching. A batch of 64 is 1-6% cheaper per image than 32 when the machine is "
    "quiet (INT8 18.5 against 18.7 ms per 32 images, FP32 27.1 against 28.8), so at "
    "concurrency 4 the baseline is ORT's better rate of the two. More instances or intra-op "
    "threads would compare two cores against the baseline's one, so they were not tried as "
    "a way to meet the goal.",
    "- Router at batch 1, side by side (`.venv/bin/python benchmarks/router_modes.py 4`, "
    "load average 9.6 at its start, 8.6 at its end): `inprocess` p50 / direct p50 was 0.85 "
    "(gRPC) and 0.91 (HTTP) for FP32, 1.00 and 1.07 for INT8; `bls` 1.29-1.63. The router now "
    "runs the same `model_serving.onnx` as the classifier, so the one thing it adds is its "
    "routing and capture: between -0.2 and +0.2 ms of server CPU per request in that run.",
]


def render(section: dict[str, Any], sections: dict[str, Any]) -> list[str]:
    parameters = section["parameters"]
    cells = section["cells"]
    lines = [
        "## 2. Serving: Triton (HTTP, gRPC, A/B router) against ONNX Runtime",
        "",
        f"{parameters['model']}, served by the real tritonserver (python backend + ONNX "
        "Runtime, one instance, one intra-op thread, dynamic batching up to 64; the uint8 "
        "normalisation runs in the ONNX graph, `model_serving.onnx`) started by "
        "`cifar_assets.serving.launcher.start_scratch_server` as in the serving tests (router "
        f"capture sample rate {parameters['capture_input_sample_rate']}); server ready in "
        f"{section['server_start_seconds']:.0f} s. Load: `run_load(url, protocol, model, "
        "version, batch_size, threads=concurrency, duration_s)` with random uint8 images; "
        f"{parameters['rounds']} rounds of {parameters['seconds_per_cell_and_round']:.1f} s per "
        "cell, all cells in turn each round. Direct ORT: `ort_baseline(onnx, batch, repeats)` "
        "on the served version's own `model_serving.onnx`, fed the same uint8 images (one "
        "thread, sequential, so concurrency 1 only; at batch 32 and 64), and at batch 32 the "
        "plain `model.onnx` after numpy normalisation, the baseline before the graph did it. "
        "Throughput: median over rounds; "
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
                    fmt(figures.get("tritonserver_cpu_ms_per_request"), 1),
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
                    "of which tritonserver",
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
        f"Batch-32 throughput, Triton / direct ORT doing the same work (goal >= "
        f"{GOAL_THROUGHPUT}): at concurrency 1 against ORT at batch 32; at concurrency 4, "
        "where the dynamic batcher may join two requests into one call of 64, against ORT's "
        "better rate of batch 32 and 64, so that batching alone cannot lift a ratio:",
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
                "Ratios above 1 are noise: other users' load fell more on the baseline's "
                "rounds than on the server's.",
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
