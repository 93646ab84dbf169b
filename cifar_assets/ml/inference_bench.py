"""Throughput and latency of an ONNX model under ONNX Runtime on this CPU, without any server.

The direct-ORT figure is the ceiling that Triton's throughput is compared against. Input is fixed
random normalised data: a CNN's cost does not depend on pixel values.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def benchmark_onnx(
    path: Path,
    batch_size: int,
    n_batches: int,
    warmup: int,
    threads: int | None = None,
    repeats: int = 3,
) -> dict[str, float]:
    """Time ``n_batches`` inferences of ``batch_size`` images after ``warmup`` untimed ones,
    ``repeats`` times; each figure is the median over the repeats.

    Returns images_per_s (images over the summed batch latencies) and the p50/p95/p99 batch
    latency in milliseconds.
    """
    from cifar_assets.ml.onnx_export import INPUT_NAME, OUTPUT_NAME, ort_session

    if batch_size < 1 or n_batches < 1 or warmup < 0 or repeats < 1:
        raise ValueError(
            f"benchmark_onnx needs batch_size >= 1, n_batches >= 1, warmup >= 0 and repeats >= 1; "
            f"got batch_size={batch_size}, n_batches={n_batches}, warmup={warmup}, "
            f"repeats={repeats}."
        )
    session = ort_session(path, threads=threads)
    feed = {
        INPUT_NAME: np.random.default_rng(0).standard_normal((batch_size, 3, 32, 32), np.float32)
    }
    for _ in range(warmup):
        session.run([OUTPUT_NAME], feed)
    runs: list[dict[str, float]] = []
    for _ in range(repeats):
        latencies = np.empty(n_batches)
        for index in range(n_batches):
            started = time.perf_counter()
            session.run([OUTPUT_NAME], feed)
            latencies[index] = time.perf_counter() - started
        p50, p95, p99 = np.percentile(latencies * 1000.0, [50, 95, 99])
        runs.append(
            {
                "images_per_s": batch_size * n_batches / float(latencies.sum()),
                "p50_ms": float(p50),
                "p95_ms": float(p95),
                "p99_ms": float(p99),
            }
        )
    return {key: float(np.median([run[key] for run in runs])) for key in runs[0]}
