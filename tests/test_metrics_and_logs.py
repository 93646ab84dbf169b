"""Prometheus metrics move as the real router serves requests; logs are JSON with their fields."""

from __future__ import annotations

import io
import json
import logging
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cifar_assets.fileio import write_json_atomic
from cifar_assets.logs import configure_logging, get_logger
from cifar_assets.metrics import MetricsExporter, write_drift_status
from cifar_assets.serving.capture import record_feedback
from cifar_assets.serving.client import infer_ab
from tests.serving_fixtures import ServingEnv, free_ports


def wait_for_records(exporter: MetricsExporter, expected: int, timeout_s: float = 20.0) -> int:
    seen = 0
    deadline = time.monotonic() + timeout_s
    while seen < expected and time.monotonic() < deadline:
        seen += exporter.poll()
        time.sleep(0.2)
    return seen


def test_metrics_move_with_served_requests_and_scrape_parses(
    triton_server: ServingEnv, tmp_path: Path
) -> None:
    exporter = MetricsExporter(triton_server.capture_dir, tmp_path / "storage")
    exporter.poll()  # start from what earlier tests captured
    before = {
        v: exporter.registry.get_sample_value("cifar10_ab_requests_total", {"version": v}) or 0.0
        for v in ("1", "2")
    }
    images = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    served = [
        infer_ab(images, user_id=f"metrics-{i}", url=triton_server.http_url) for i in range(40)
    ]
    assert wait_for_records(exporter, 40) == 40

    for version in ("1", "2"):
        sent = sum(1 for r in served if str(r.served_version) == version)
        after = exporter.registry.get_sample_value(
            "cifar10_ab_requests_total", {"version": version}
        )
        assert (after or 0.0) - before[version] == sent
    latency_count = sum(
        exporter.registry.get_sample_value(
            "cifar10_inference_latency_seconds_count", {"version": v}
        )
        or 0.0
        for v in ("1", "2")
    )
    assert latency_count >= 40

    first = served[0]
    predicted = int(np.argmax(first.logits[0]))
    record_feedback(triton_server.capture_dir, first.request_id, predicted)
    exporter.poll()
    accuracy = exporter.registry.get_sample_value(
        "cifar10_model_accuracy", {"version": str(first.served_version)}
    )
    assert accuracy is not None and 0.0 < accuracy <= 1.0

    write_drift_status(tmp_path / "storage", "batch-7", 0.97, True)
    exporter.poll()
    assert (
        exporter.registry.get_sample_value("cifar10_data_drift_score", {"batch": "batch-7"}) == 0.97
    )

    from prometheus_client import start_http_server

    (port,) = free_ports(1)
    server, thread = start_http_server(port, addr="127.0.0.1", registry=exporter.registry)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        thread.join(5)
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "cifar10_predictions",
        "cifar10_inference_latency_seconds",
        "cifar10_model_accuracy",
        "cifar10_data_drift_score",
        "cifar10_api_requests",
        "cifar10_ab_requests",
    } <= names


def test_a_half_written_line_waits_for_the_next_poll(tmp_path: Path) -> None:
    records = tmp_path / "capture" / "records"
    records.mkdir(parents=True)
    line = {
        "time": "2026-11-26T06:00:00+00:00",
        "request_id": "r1",
        "item": 0,
        "user_id": "u",
        "served_version": 3,
        "predicted_class": 2,
        "predicted_label": "bird",
        "confidence": 0.9,
        "latency_ms": 4.0,
    }
    text = json.dumps(line)
    (records / "a.jsonl").write_text(text[:20])
    exporter = MetricsExporter(tmp_path / "capture", tmp_path / "storage")
    assert exporter.poll() == 0
    (records / "a.jsonl").write_text(text + "\n")
    assert exporter.poll() == 1
    assert (
        exporter.registry.get_sample_value(
            "cifar10_predictions_total", {"version": "3", "predicted_class": "bird"}
        )
        == 1.0
    )


def test_router_weights_are_a_gauge_that_follows_the_file(tmp_path: Path) -> None:
    state = tmp_path / "triton"
    exporter = MetricsExporter(tmp_path / "capture", tmp_path / "storage", state_dir=state)
    write_json_atomic(state / "ab_weights.json", {"weights": {"1": 0.9, "2": 0.1}})
    exporter.poll()
    weight = exporter.registry.get_sample_value
    assert weight("cifar10_ab_weight", {"version": "1"}) == 0.9
    assert weight("cifar10_ab_weight", {"version": "2"}) == 0.1
    # A promotion leaves one version: the other's series goes away, not stays at 0.1.
    write_json_atomic(state / "ab_weights.json", {"weights": {"2": 1.0}})
    exporter.poll()
    assert weight("cifar10_ab_weight", {"version": "1"}) is None
    assert weight("cifar10_ab_weight", {"version": "2"}) == 1.0


def test_logs_are_json_with_request_and_run_ids() -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    try:
        get_logger("serving").info("served", extra={"request_id": "abc", "version": 3})
        get_logger("pipeline").warning("step done", extra={"run_id": "run-1"})
        try:
            raise ValueError("boom")
        except ValueError:
            get_logger("capture").exception("flush failed")
    finally:
        configure_logging("INFO")
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["component"] for e in entries] == ["serving", "pipeline", "capture"]
    assert entries[0]["request_id"] == "abc" and entries[0]["version"] == 3
    assert entries[1]["run_id"] == "run-1" and entries[1]["level"] == "WARNING"
    assert "ValueError: boom" in entries[2]["exception"]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)


def test_the_exporter_logs_json_lines_with_its_port_and_the_request_ids(tmp_path: Path) -> None:
    import threading

    records = tmp_path / "capture" / "records"
    records.mkdir(parents=True)
    record = {"request_id": "req-42", "item": 0, "served_version": 2, "predicted_class": 3}
    (records / "a.jsonl").write_text(json.dumps({**record, "latency_ms": 5.0}) + "\n")
    write_drift_status(tmp_path / "storage", "batch-3", 0.4, False)
    (port,) = free_ports(1)
    exporter = MetricsExporter(tmp_path / "capture", tmp_path / "storage")
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    stop = threading.Event()
    thread = threading.Thread(target=exporter.serve, args=(port, 0.05, stop))
    try:
        thread.start()
        deadline = time.monotonic() + 10
        while "req-42" not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(10)
        configure_logging("INFO")
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert {e["component"] for e in entries} == {"metrics"}
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    (started,) = [e for e in entries if e["message"] == "metrics exporter listening"]
    assert started["port"] == port and started["level"] == "INFO"
    (counted,) = [e for e in entries if e.get("request_id") == "req-42"]
    assert counted["version"] == "2" and counted["latency_ms"] == 5.0
    (drift,) = [e for e in entries if e["message"] == "drift status read"]
    assert (drift["batch"], drift["score"], drift["drift"]) == ("batch-3", 0.4, False)
    assert entries[-1]["message"] == "metrics exporter stopped"


def test_bad_log_level_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="LOG_LEVEL='LOUD'"):
        configure_logging("loud")
    assert logging.getLogger("cifar_assets").level in (logging.INFO, logging.DEBUG)


def test_grafana_dashboard_queries_metrics_the_exporter_serves(tmp_path: Path) -> None:
    import re

    from tests.conftest import PROJECT_ROOT

    dashboard = json.loads((PROJECT_ROOT / "configs/monitoring/grafana_dashboard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"cifar10_[a-z_]+", target["expr"])
    }
    exporter = MetricsExporter(tmp_path, tmp_path)
    exporter.predictions.labels("1", "cat").inc()
    exporter.latency.labels("1").observe(0.01)
    exporter.accuracy.labels("1").set(0.5)
    exporter.drift_score.labels("b").set(0.2)
    exporter.ab_requests.labels("1").inc()
    served = {sample.name for metric in exporter.registry.collect() for sample in metric.samples}
    assert queried and queried <= served


def test_feedback_read_before_its_request_is_counted_once_the_request_arrives(
    tmp_path: Path,
) -> None:
    """The exporter reads the capture, then the feedback: a request written in between has its
    feedback read first. That feedback waits for the request instead of being lost."""
    capture = tmp_path / "capture"
    (capture / "records").mkdir(parents=True)
    feedback = {"feedback_time": "2026-12-06T12:00:00+00:00", "request_id": "late", "item": 0}
    (capture / "feedback.jsonl").write_text(json.dumps(feedback | {"label": 2}) + "\n")
    exporter = MetricsExporter(capture, tmp_path / "storage")
    accuracy = exporter.registry.get_sample_value
    assert exporter.poll() == 0
    assert accuracy("cifar10_model_accuracy", {"version": "3"}) is None
    record = {"time": "2026-12-06T12:00:00+00:00", "request_id": "late", "item": 0}
    record |= {"served_version": 3, "predicted_class": 2, "latency_ms": 4.0}
    (capture / "records" / "a.jsonl").write_text(json.dumps(record) + "\n")
    assert exporter.poll() == 1
    assert accuracy("cifar10_model_accuracy", {"version": "3"}) == 1.0
    exporter.poll()  # counted once, not again on every poll
    assert exporter._correct == {"3": [1, 1]}
