"""Where Triton's batch-32 gap to ONNX Runtime comes from: ORT alone, ORT beside an idle server,
and Triton over HTTP and gRPC, alternating in rounds on one machine.

    .venv/bin/python benchmarks/serving_floor.py [ROUNDS]

One tritonserver with the serving benchmark's FP32 model (ResNet18 ImageNet stem). Each round:
the server is stopped and ORT alone runs batch-32 requests on the served ``model_serving.onnx``
(one thread, as the classifier runs it); the server is started, left idle, and ORT runs again
beside it; then one client sends batch-32 uint8 requests for 6 s over HTTP and over gRPC, and the
server's CPU per request is read from /proc. Prints each round and the medians with their ratios
to ORT alone. A benchmark: it prints figures and never fails on time.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import export_models

from cifar_assets.serving.launcher import start_scratch_server
from cifar_assets.serving.loadtest import ort_baseline, process_tree_cpu_ms, run_load
from cifar_assets.serving.repository import MODEL_NAME, SERVING_ONNX

BATCH = 32


def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="serving-floor-") as scratch:
        base = Path(scratch)
        fp32 = export_models(base)["fp32"]
        server = start_scratch_server(base, {1: fp32})
        served = server.config.repo / MODEL_NAME / "1" / SERVING_ONNX
        rates: dict[str, list[float]] = {}
        cpu_ms: dict[str, list[float]] = {}
        try:
            for round_index in range(rounds):
                server.stop()
                rates.setdefault("ort alone", []).append(
                    ort_baseline(str(served), BATCH, 20).images_per_s
                )
                server.start()
                time.sleep(5)  # idle: only the server's own threads run
                rates.setdefault("ort beside idle server", []).append(
                    ort_baseline(str(served), BATCH, 20).images_per_s
                )
                assert server.pid is not None
                for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
                    before = process_tree_cpu_ms(server.pid)
                    report = run_load(
                        url,
                        protocol,  # type: ignore[arg-type]
                        model=MODEL_NAME,
                        version=1,
                        batch_size=BATCH,
                        threads=1,
                        duration_s=6.0,
                    )
                    spent = process_tree_cpu_ms(server.pid) - before
                    rates.setdefault(f"triton {protocol}", []).append(report.images_per_s)
                    cpu_ms.setdefault(protocol, []).append(spent / max(1, report.succeeded))
                print(
                    f"round {round_index + 1}: "
                    + ", ".join(f"{name} {values[-1]:.0f} img/s" for name, values in rates.items())
                    + ", server CPU per request "
                    + ", ".join(f"{p} {v[-1]:.1f} ms" for p, v in cpu_ms.items()),
                    flush=True,
                )
        finally:
            server.stop()
    alone = statistics.median(rates["ort alone"])
    print(f"medians of {rounds} rounds, batch {BATCH}:")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"  {name:24} {median:7.1f} img/s  {median / alone:.3f} of ORT alone")
    print(f"  ORT alone per request   {1000 * BATCH / alone:7.1f} ms")
    for protocol, values in cpu_ms.items():
        print(f"  server CPU per {protocol} request {statistics.median(values):5.1f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
