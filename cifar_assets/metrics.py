"""The project's Prometheus metrics, exported with prometheus-client on PROMETHEUS_PORT.

Triton's own metrics stay on its metrics port. These are the model-level figures: the exporter
follows the A/B router's traffic capture (append-only JSON lines) and the feedback file, and
reads the latest drift report, so serving itself pays nothing for them. Run it with
``cifar-metrics`` (or ``python -m cifar_assets.metrics``).

| metric | type | labels |
|---|---|---|
| cifar10_predictions_total | counter | version, predicted_class |
| cifar10_inference_latency_seconds | histogram | version |
| cifar10_model_accuracy | gauge | version (share correct among requests with feedback) |
| cifar10_data_drift_score | gauge | batch (latest drift report) |
| cifar10_api_requests_total | counter | model, version |
| cifar10_ab_requests_total | counter | version (A/B requests per served version) |
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cifar_assets.data.imageset import CLASSES
from cifar_assets.fileio import write_text_atomic
from cifar_assets.logs import get_logger
from cifar_assets.serving.repository import default_state_dir, read_ab_weights
from cifar_assets.settings import get_settings

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
DRIFT_STATUS_FILE = "drift_status.json"
# How long feedback waits for its request to show up in the capture before it is dropped.
PENDING_FEEDBACK_S = 600.0


class MetricsExporter:
    """Turns captured traffic into Prometheus metrics; ``poll()`` reads what is new."""

    def __init__(
        self,
        capture_dir: Path,
        storage_dir: Path,
        registry: CollectorRegistry | None = None,
        state_dir: Path | None = None,
    ):
        self.capture_dir = capture_dir
        self.storage_dir = storage_dir
        self.state_dir = state_dir  # Triton's state folder: the router's weights
        self.registry = registry or CollectorRegistry()
        self.predictions = Counter(
            "cifar10_predictions",
            "Images classified, by version and predicted class.",
            ["version", "predicted_class"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cifar10_inference_latency_seconds",
            "Router-side latency per request.",
            ["version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.accuracy = Gauge(
            "cifar10_model_accuracy",
            "Share of correct predictions among requests with feedback.",
            ["version"],
            registry=self.registry,
        )
        self.drift_score = Gauge(
            "cifar10_data_drift_score",
            "Score of the latest drift report (above 1 - p_val: drift).",
            ["batch"],
            registry=self.registry,
        )
        self.requests = Counter(
            "cifar10_api_requests",
            "Inference requests served.",
            ["model", "version"],
            registry=self.registry,
        )
        self.ab_requests = Counter(
            "cifar10_ab_requests",
            "A/B router requests per served version.",
            ["version"],
            registry=self.registry,
        )
        self.ab_weight = Gauge(
            "cifar10_ab_weight",
            "The A/B router's intended share of traffic per version (the SRM alert compares the "
            "observed split with it).",
            ["version"],
            registry=self.registry,
        )
        self._offsets: dict[Path, int] = {}
        self._seen_requests: set[str] = set()
        self._predicted: dict[tuple[str, int], tuple[str, int]] = {}
        self._feedback_offset = 0
        # Feedback can arrive before the router has written its request to the capture (the
        # capture is flushed about once a second): kept here, with the time it was first read,
        # and counted once its request appears; dropped with a log line after PENDING_FEEDBACK_S.
        self._pending_feedback: list[tuple[float, dict[str, Any]]] = []
        self._correct: dict[str, list[int]] = {}
        self._drift_status: dict[str, Any] | None = None
        self._log = get_logger("metrics")

    def poll(self) -> int:
        """Read new capture lines, feedback and the drift status; returns new records seen."""
        new = 0
        for path in sorted((self.capture_dir / "records").glob("*.jsonl")):
            for record in self._new_lines(path):
                self._count(record)
                new += 1
        self._read_feedback()
        self._read_drift()
        self._read_weights()
        return new

    def _read_weights(self) -> None:
        if self.state_dir is None:
            return
        self.ab_weight.clear()
        for version, weight in read_ab_weights(self.state_dir).items():
            self.ab_weight.labels(str(version)).set(weight)

    def _new_lines(self, path: Path) -> list[dict[str, Any]]:
        offset = self._offsets.get(path, 0)
        with path.open("rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
        # a line still being written has no newline yet: leave it for the next poll
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offsets[path] = offset + len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def _count(self, record: dict[str, Any]) -> None:
        version = str(record["served_version"])
        predicted = int(record["predicted_class"])
        self.predictions.labels(version, CLASSES[predicted]).inc()
        self._predicted[(str(record["request_id"]), int(record.get("item", 0)))] = (
            version,
            predicted,
        )
        if record["request_id"] not in self._seen_requests:
            self._seen_requests.add(record["request_id"])
            self.requests.labels("cifar10_ab", version).inc()
            self.ab_requests.labels(version).inc()
            self.latency.labels(version).observe(float(record["latency_ms"]) / 1000.0)
            self._log.debug(
                "request counted",
                extra={
                    "request_id": str(record["request_id"]),
                    "version": version,
                    "latency_ms": float(record["latency_ms"]),
                },
            )

    def _read_feedback(self) -> None:
        path = self.capture_dir / "feedback.jsonl"
        if not path.is_file():
            return
        with path.open("rb") as handle:
            handle.seek(self._feedback_offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._feedback_offset += len(complete)
        now = time.monotonic()
        entries = self._pending_feedback + [
            (now, json.loads(line)) for line in complete.splitlines() if line.strip()
        ]
        self._pending_feedback = []
        for first_read, entry in entries:
            served = self._predicted.get((str(entry["request_id"]), int(entry.get("item", 0))))
            if served is None:
                if now - first_read < PENDING_FEEDBACK_S:
                    self._pending_feedback.append((first_read, entry))
                else:
                    self._log.warning(
                        "feedback for a request never seen in the capture, not counted",
                        extra={"request_id": str(entry["request_id"])},
                    )
                continue
            version, predicted = served
            tally = self._correct.setdefault(version, [0, 0])
            tally[0] += int(predicted == int(entry["label"]))
            tally[1] += 1
            self.accuracy.labels(version).set(tally[0] / tally[1])

    def _read_drift(self) -> None:
        path = self.storage_dir / "drift_report" / DRIFT_STATUS_FILE
        if path.is_file():
            status = json.loads(path.read_text())
            self.drift_score.clear()
            self.drift_score.labels(status["batch"]).set(float(status["score"]))
            if status != self._drift_status:
                self._drift_status = status
                self._log.info(
                    "drift status read",
                    extra={
                        "batch": status["batch"],
                        "score": float(status["score"]),
                        "drift": bool(status["drift"]),
                    },
                )

    def serve(
        self, port: int, interval_s: float = 1.0, stop: threading.Event | None = None
    ) -> None:
        """Serve /metrics on ``port`` and poll every ``interval_s`` until ``stop`` is set."""
        server, thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        self._log.info(
            "metrics exporter listening",
            extra={"port": port, "capture_dir": str(self.capture_dir), "interval_s": interval_s},
        )
        stop = stop or threading.Event()
        try:
            while not stop.is_set():
                new = self.poll()
                if new:
                    self._log.debug("capture records read", extra={"records": new})
                stop.wait(interval_s)
        except Exception:
            self._log.exception("metrics exporter stopped by an error")
            raise
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
        self._log.info("metrics exporter stopped", extra={"port": port})


def write_drift_status(storage_dir: Path, batch: str, score: float, drift: bool) -> None:
    """Written by the drift_report asset; read by the exporter for the drift gauge."""
    write_text_atomic(
        storage_dir / "drift_report" / DRIFT_STATUS_FILE,
        json.dumps({"batch": batch, "score": score, "drift": drift, "time": time.time()}),
    )


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(description="Serve the project's Prometheus metrics.")
    parser.add_argument("--port", type=int, default=settings.prometheus_port)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    args = parser.parse_args(argv)
    MetricsExporter(
        settings.capture_dir, settings.storage_dir, state_dir=default_state_dir()
    ).serve(args.port, args.interval)


if __name__ == "__main__":
    main()
