"""Load generation and latency measurement against a running Triton (perf_analyzer does not run
on this machine's glibc, so the project brings its own).

``run_load`` sends requests from several threads, each with its own client, for a duration, a
request count or until told to stop, and reports every outcome: latencies, failures with their
messages, and for the A/B router which version served each request.
``python -m cifar_assets.serving.loadtest`` prints the README's table: batch-1 latency, the
server's CPU per batch-1 request, and batch-32 throughput, each path measured in turn over
several rounds so that a burst of load from elsewhere does not land on one path only.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cifar_assets.serving.repository import MODEL_NAME, ROUTER_NAME

Protocol = Literal["http", "grpc"]


@dataclass
class LoadReport:
    images_per_request: int
    duration_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    served_versions: Counter[int] = field(default_factory=Counter)

    @property
    def succeeded(self) -> int:
        return len(self.latencies_ms)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")

    @property
    def images_per_s(self) -> float:
        return (
            self.succeeded * self.images_per_request / self.duration_s if self.duration_s else 0.0
        )


def run_load(
    url: str,
    protocol: Protocol = "grpc",
    model: str = ROUTER_NAME,
    version: int | None = None,
    batch_size: int = 1,
    threads: int = 2,
    duration_s: float | None = None,
    requests_per_thread: int | None = None,
    stop: threading.Event | None = None,
    warmup: int = 3,
) -> LoadReport:
    """Send uint8 requests of ``batch_size`` random images until ``duration_s`` has passed, each
    thread has sent ``requests_per_thread``, or ``stop`` is set. Router requests carry a user id
    of their own."""
    if sum(x is not None for x in (duration_s, requests_per_thread, stop)) != 1:
        raise ValueError("give exactly one of duration_s, requests_per_thread or stop")
    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    images = np.random.default_rng(0).integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)
    report = LoadReport(images_per_request=batch_size)
    lock = threading.Lock()
    routed = model == ROUTER_NAME
    start_line = threading.Barrier(threads + 1)

    def send(client: Any, number: int) -> tuple[float, int | None]:
        tensor = module.InferInput("images_uint8", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        options: dict[str, Any] = {}
        if routed:
            options = {"parameters": {"user_id": f"user-{number}"}, "request_id": uuid.uuid4().hex}
        began = time.perf_counter()
        result = client.infer(
            model, [tensor], model_version="" if version is None else str(version), **options
        )
        elapsed = (time.perf_counter() - began) * 1000.0
        served = int(result.as_numpy("served_version")[0, 0]) if routed else None
        return elapsed, served

    def worker(index: int) -> None:
        client = module.InferenceServerClient(url)
        try:
            for number in range(warmup):
                send(client, -number - 1)
        except Exception as exc:
            with lock:
                report.failures[f"warm-up: {exc}"[:300]] += 1
        start_line.wait()
        deadline = time.monotonic() + duration_s if duration_s is not None else None
        number = 0
        while (
            (deadline is not None and time.monotonic() < deadline)
            or (requests_per_thread is not None and number < requests_per_thread)
            or (stop is not None and not stop.is_set())
        ):
            try:
                elapsed, served = send(client, index * 1_000_000 + number)
            except Exception as exc:
                with lock:
                    report.failures[str(exc)[:300]] += 1
            else:
                with lock:
                    report.latencies_ms.append(elapsed)
                    if served is not None:
                        report.served_versions[served] += 1
            number += 1

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    start_line.wait()
    began = time.perf_counter()
    for thread in workers:
        thread.join()
    report.duration_s = time.perf_counter() - began
    return report


def ort_baseline(onnx_path: str, batch_size: int, repeats: int, threads: int = 1) -> LoadReport:
    """The same uint8 images through ONNX Runtime in this process, with the served model's
    threading (one intra-op thread, no spinning): the floor Triton is compared to.

    Given a version's ``model_serving.onnx`` (what Triton runs), the pixels go in as uint8 and
    the graph normalises them, exactly the work the server does; given a plain ``model.onnx``,
    they are normalised with numpy first (``normalise_uint8``), as before the graph did it."""
    import onnxruntime as ort

    from cifar_assets.ml.model import normalise_uint8

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)
    takes_uint8 = "images_uint8" in {value.name for value in session.get_inputs()}
    no_floats = np.zeros((0, 3, 32, 32), dtype=np.float32)

    def run() -> None:
        if takes_uint8:
            session.run(["logits"], {"images_uint8": images, "input": no_floats})
        else:
            session.run(["logits"], {"input": normalise_uint8(images)})

    report = LoadReport(images_per_request=batch_size)
    for _ in range(3):
        run()
    began = time.perf_counter()
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        report.latencies_ms.append((time.perf_counter() - start) * 1000.0)
    report.duration_s = time.perf_counter() - began
    return report


def process_tree_cpu_ms(pid: int, children: bool = True) -> float:
    """CPU time (user + system) used so far by ``pid`` and all its descendants (the Triton stubs).

    On a shared machine, wall-clock latency swings with other people's load; the server's CPU
    per request does not, so it is the figure to compare designs by. ``children=False``: the
    process alone (tritonserver without its stubs).
    """
    parents: dict[int, int] = {}
    cpu_ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        cpu_ticks[int(entry)] = int(fields[11]) + int(fields[12])
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += cpu_ticks.get(current, 0)
        if children:
            todo.extend(child for child, parent in parents.items() if parent == current)
    return total * 1000.0 / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> None:
    from cifar_assets.serving.launcher import read_pid_file
    from cifar_assets.settings import get_settings

    settings = get_settings()
    parser = argparse.ArgumentParser(description="Triton latency and throughput table")
    parser.add_argument("--http-url", default=settings.triton_http_url)
    parser.add_argument("--grpc-url", default=settings.triton_grpc_url)
    parser.add_argument(
        "--onnx", help="model_serving.onnx of a live version, for the ONNX Runtime baseline"
    )
    parser.add_argument("--requests", type=int, default=100, help="batch-1 requests per round")
    parser.add_argument("--seconds", type=float, default=3.0, help="batch-32 seconds per round")
    parser.add_argument("--rounds", type=int, default=5, help="rows are measured in turn")
    args = parser.parse_args(argv)
    record = read_pid_file(settings.var_dir / "triton")
    server_pid = int(record["pid"]) if record else None
    rows: list[tuple[str, str, Protocol, str]] = [
        ("Triton HTTP", args.http_url, "http", MODEL_NAME),
        ("Triton gRPC", args.grpc_url, "grpc", MODEL_NAME),
        ("router HTTP", args.http_url, "http", ROUTER_NAME),
        ("router gRPC", args.grpc_url, "grpc", ROUTER_NAME),
    ]
    results: dict[str, list[tuple[float, float, float]]] = {}
    for _ in range(args.rounds):
        if args.onnx:
            single = ort_baseline(args.onnx, 1, args.requests)
            batch = ort_baseline(args.onnx, 32, max(1, int(args.seconds * 10)))
            row = (single.median_ms, batch.images_per_s, float("nan"))
            results.setdefault("ONNX Runtime in process", []).append(row)
        for name, url, protocol, model in rows:
            before = process_tree_cpu_ms(server_pid) if server_pid else float("nan")
            single = run_load(url, protocol, model, threads=1, requests_per_thread=args.requests)
            after = process_tree_cpu_ms(server_pid) if server_pid else float("nan")
            batch = run_load(
                url, protocol, model, batch_size=32, threads=2, duration_s=args.seconds
            )
            cpu = (after - before) / (single.succeeded + 3)  # 3 warm-up requests
            results.setdefault(name, []).append((single.median_ms, batch.images_per_s, cpu))
    print(
        f"| path ({args.rounds} rounds, median) | batch 1 median ms | batch 1 server CPU ms "
        "| batch 32 images/s |\n|---|---|---|---|"
    )
    for name, values in results.items():
        latency, throughput, cpu = (
            statistics.median(column) for column in zip(*values, strict=True)
        )
        cpu_text = "-" if math.isnan(cpu) else f"{cpu:.2f}"
        print(f"| {name} | {latency:.2f} | {cpu_text} | {throughput:.0f} |")


if __name__ == "__main__":
    main()
