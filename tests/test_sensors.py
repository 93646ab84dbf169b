"""Schedules and sensors evaluated against a real (temporary) Dagster instance."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from cifar_assets.data.imageset import save_npz
from cifar_assets.definitions import defs
from cifar_assets.drift.incoming import capture_window_key
from cifar_assets.schedules import daily_drift_schedule
from cifar_assets.sensors import (
    RetrainingConfigError,
    drift_retraining_sensor,
    evaluate_retraining,
    incoming_batch_sensor,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def instance(
    project_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[dg.DagsterInstance]:
    monkeypatch.delenv("CIFAR_RETRAINING_CONFIG", raising=False)
    with dg.instance_for_test(temp_dir=project_env["DAGSTER_HOME"]) as test_instance:
        yield test_instance


def report_drift(instance: dg.DagsterInstance, batch: str, drift: bool, labelled: bool) -> None:
    instance.add_dynamic_partitions("incoming_batches", [batch])
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key="drift_report",
            partition=batch,
            metadata={"drift": drift, "labelled": labelled, "score": 0.99 if drift else 0.1},
        )
    )


def test_drift_report_requests_exactly_one_retraining(instance: dg.DagsterInstance) -> None:
    report_drift(instance, "batch-a", drift=True, labelled=True)
    context = dg.build_sensor_context(instance=instance, definitions=defs)
    first = evaluate_retraining(context)
    assert isinstance(first, dg.SensorResult)
    assert len(first.run_requests or []) == 1
    request = (first.run_requests or [])[0]
    assert request.run_key is not None and request.run_key.startswith("retrain-batch-a-")
    ops = request.run_config["ops"]
    assert ops["cifar10_raw"]["config"]["extra_batches"][0].endswith(
        "incoming_batch/batch-a/value.imageset.npz"
    )
    assert ops["registered_model"]["config"] == {"promote_automatically": False}
    assert ops["triton_deployment"]["config"] == {"role": "challenger", "challenger_share": 0.1}
    # the training recipe is configs/retraining.yaml's CPU recipe, not the GPU defaults
    assert ops["trained_model"]["config"]["epochs"] == 4
    assert ops["trained_model"]["config"]["stem"] == "imagenet"
    assert ops["cifar10_raw"]["config"]["source"] == "synthetic"
    # and the whole request is a valid run config of retraining_job
    dg.validate_run_config(defs.resolve_job_def("retraining_job"), request.run_config)

    # the same report evaluated again requests nothing
    again = evaluate_retraining(dg.build_sensor_context(instance=instance, cursor=first.cursor))
    assert isinstance(again, dg.SkipReason)


def test_unlabelled_drift_retrains_without_adding_the_batch(instance: dg.DagsterInstance) -> None:
    report_drift(instance, "batch-u", drift=True, labelled=False)
    result = evaluate_retraining(dg.build_sensor_context(instance=instance))
    assert isinstance(result, dg.SensorResult)
    raw = (result.run_requests or [])[0].run_config["ops"]["cifar10_raw"]["config"]
    assert "extra_batches" not in raw and raw["num_images"] == 3000


def test_no_drift_and_cooldown_request_nothing(instance: dg.DagsterInstance) -> None:
    report_drift(instance, "calm", drift=False, labelled=True)
    calm = evaluate_retraining(dg.build_sensor_context(instance=instance))
    assert isinstance(calm, dg.SensorResult) and not calm.run_requests
    assert "no drift" in (calm.skip_reason.skip_message or "")  # type: ignore[union-attr]

    report_drift(instance, "storm-1", drift=True, labelled=True)
    fired = evaluate_retraining(dg.build_sensor_context(instance=instance, cursor=calm.cursor))
    assert isinstance(fired, dg.SensorResult) and len(fired.run_requests or []) == 1
    report_drift(instance, "storm-2", drift=True, labelled=True)
    cooled = evaluate_retraining(dg.build_sensor_context(instance=instance, cursor=fired.cursor))
    assert isinstance(cooled, dg.SensorResult) and not cooled.run_requests
    assert "cooldown" in (cooled.skip_reason.skip_message or "")  # type: ignore[union-attr]
    # after the cooldown the next drift report fires again
    cursor = json.loads(cooled.cursor or "{}")
    cursor["last_request_time"] -= 7 * 3600
    report_drift(instance, "storm-3", drift=True, labelled=True)
    later = evaluate_retraining(
        dg.build_sensor_context(instance=instance, cursor=json.dumps(cursor))
    )
    assert isinstance(later, dg.SensorResult) and len(later.run_requests or []) == 1


def test_retraining_in_progress_is_skipped_with_the_reason(instance: dg.DagsterInstance) -> None:
    job = defs.resolve_job_def("retraining_job")
    run = instance.create_run_for_job(job_def=job, run_config={})
    instance.handle_run_event(  # the run is now STARTED
        run.run_id,
        dg.DagsterEvent(event_type_value=dg.DagsterEventType.RUN_START.value, job_name=job.name),
    )
    report_drift(instance, "busy", drift=True, labelled=True)
    result = evaluate_retraining(dg.build_sensor_context(instance=instance))
    assert isinstance(result, dg.SensorResult) and not result.run_requests
    assert run.run_id in (result.skip_reason.skip_message or "")  # type: ignore[union-attr]


def test_retraining_base_config_comes_from_the_env_and_the_sensor_wins(
    instance: dg.DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "my-retraining.yaml"
    base.write_text(
        "ops:\n"
        "  cifar10_raw:\n"
        "    config:\n"
        "      {source: synthetic, num_images: 500, extra_batches: [/data/old.imageset.npz]}\n"
        "  trained_model:\n"
        "    config: {epochs: 1, batch_size: 32, stem: imagenet}\n"
        "  registered_model:\n"
        "    config: {promote_automatically: true, promotion_margin: 0.01}\n"
    )
    monkeypatch.setenv("CIFAR_RETRAINING_CONFIG", str(base))
    report_drift(instance, "batch-e", drift=True, labelled=True)

    result = evaluate_retraining(dg.build_sensor_context(instance=instance))

    assert isinstance(result, dg.SensorResult)
    ops = (result.run_requests or [])[0].run_config["ops"]
    assert ops["trained_model"]["config"] == {"epochs": 1, "batch_size": 32, "stem": "imagenet"}
    extra = ops["cifar10_raw"]["config"]["extra_batches"]
    assert extra[0] == "/data/old.imageset.npz" and extra[1].endswith("batch-e/value.imageset.npz")
    assert ops["cifar10_raw"]["config"]["num_images"] == 500
    # a retraining never promotes itself, whatever the file says; its other settings stay
    assert ops["registered_model"]["config"] == {
        "promote_automatically": False,
        "promotion_margin": 0.01,
    }
    dg.validate_run_config(
        defs.resolve_job_def("retraining_job"), (result.run_requests or [])[0].run_config
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "does not exist"),
        ("ops:\n  trained_model: {config: {epochs: 4\n", "is not valid YAML"),
        ("- just\n- a list\n", "has no 'ops:' mapping"),
        (
            "ops:\n  cifar10_raw: {config: {extra_batches: one.npz}}\n",
            "sets ops.cifar10_raw.config.extra_batches to 'one.npz'; it must be a list",
        ),
    ],
)
def test_broken_retraining_config_fails_the_tick_and_keeps_the_report(
    instance: dg.DagsterInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    content: str | None,
    problem: str,
) -> None:
    base = tmp_path / "retraining.yaml"
    if content is not None:
        base.write_text(content)
    monkeypatch.setenv("CIFAR_RETRAINING_CONFIG", str(base))
    report_drift(instance, "batch-x", drift=True, labelled=True)

    with pytest.raises(RetrainingConfigError) as error:
        evaluate_retraining(dg.build_sensor_context(instance=instance))
    assert f"retraining base config {base} {problem}" in str(error.value)
    assert "Point CIFAR_RETRAINING_CONFIG at a YAML run config" in str(error.value)
    # The sensor itself raises it too, not a skip: the daemon then records a failed tick (red
    # in the UI) whose error is this message.
    with pytest.raises(RetrainingConfigError, match=problem):
        drift_retraining_sensor.evaluate_tick(dg.build_sensor_context(instance=instance))

    # fixed, the same drift report is still handled: the failed ticks did not move the cursor
    monkeypatch.setenv("CIFAR_RETRAINING_CONFIG", str(PROJECT_ROOT / "configs" / "retraining.yaml"))
    fixed = evaluate_retraining(dg.build_sensor_context(instance=instance))
    assert isinstance(fixed, dg.SensorResult) and len(fixed.run_requests or []) == 1


def test_incoming_sensor_registers_each_new_batch_once(
    instance: dg.DagsterInstance, project_env: dict[str, str]
) -> None:
    incoming = Path(project_env["CIFAR_VAR_DIR"]) / "incoming"
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    save_npz(incoming / "monday.npz", {"images": images})
    first = incoming_batch_sensor(dg.build_sensor_context(instance=instance))
    assert isinstance(first, dg.SensorResult)
    assert [r.partition_key for r in first.run_requests or []] == ["monday"]
    assert first.dynamic_partitions_requests[0].partition_keys == ["monday"]  # type: ignore[index,union-attr]
    instance.add_dynamic_partitions("incoming_batches", ["monday"])
    assert isinstance(
        incoming_batch_sensor(dg.build_sensor_context(instance=instance)), dg.SkipReason
    )


def write_capture(capture_dir: Path, when: datetime, count: int) -> None:
    """Capture files in the router's layout (see cifar_assets.serving.capture)."""
    records = capture_dir / "records"
    records.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        lines.append(
            json.dumps(
                {
                    "time": (when + timedelta(seconds=i)).isoformat(),
                    "request_id": f"r{i}",
                    "item": 0,
                    "user_id": f"u{i}",
                    "served_version": 1,
                    "predicted_class": i % 10,
                    "predicted_label": "cat",
                    "confidence": 0.5,
                    "latency_ms": 3.0,
                }
            )
        )
    (records / "test.jsonl").write_text("\n".join(lines) + "\n")
    images = np.random.default_rng(1).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    save_npz(
        capture_dir / "inputs" / "test-0.npz",
        {"images": images, "request_ids": np.asarray([f"r{i}" for i in range(count)])},
    )


def test_daily_schedule_checks_the_last_24_hours_of_capture(
    instance: dg.DagsterInstance, project_env: dict[str, str]
) -> None:
    assert daily_drift_schedule.cron_schedule == "0 6 * * *"
    assert daily_drift_schedule.execution_timezone == "UTC"
    tick = datetime(2026, 11, 26, 6, 0, tzinfo=UTC)
    empty = daily_drift_schedule(
        dg.build_schedule_context(instance=instance, scheduled_execution_time=tick)
    )
    assert isinstance(empty, dg.SkipReason)

    write_capture(Path(project_env["CIFAR_VAR_DIR"]) / "capture", tick - timedelta(hours=3), 12)
    request = daily_drift_schedule(
        dg.build_schedule_context(instance=instance, scheduled_execution_time=tick)
    )
    assert isinstance(request, dg.RunRequest)
    key = capture_window_key(tick - timedelta(days=1), tick)
    assert request.partition_key == key == "capture-20261125T060000Z-20261126T060000Z"
    assert request.tags["captured_images"] == "12"
    assert key in instance.get_dynamic_partitions("incoming_batches")
