"""Schedules and sensors evaluated against a real (temporary) Dagster instance."""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from cifar_assets.data.imageset import save_npz
from cifar_assets.data.synthetic import generate_synthetic
from cifar_assets.definitions import defs
from cifar_assets.drift.incoming import capture_window_key
from cifar_assets.resources import MLflowResource, TritonResource
from cifar_assets.schedules import daily_drift_schedule
from cifar_assets.sensors import (
    BATCHES_TAG,
    COVERS_TAG,
    RetrainingConfigError,
    RetrainingPolicy,
    drift_retraining_sensor,
    evaluate_retraining,
    incoming_batch_sensor,
)
from cifar_assets.serving.launcher import free_ports
from cifar_assets.settings import get_settings
from cifar_assets.storage import AssetStore

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def instance(
    project_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[dg.DagsterInstance]:
    monkeypatch.delenv("CIFAR_RETRAINING_CONFIG", raising=False)
    with dg.instance_for_test(temp_dir=project_env["DAGSTER_HOME"]) as test_instance:
        yield test_instance


def stored_batch(batch: str) -> str:
    """Where the asset store keeps the latest incoming_batch partition ``batch``."""
    record = AssetStore(get_settings().asset_store).latest("incoming_batch", batch)
    assert record is not None
    return AssetStore(get_settings().asset_store).location(record.object)


def report_drift(instance: dg.DagsterInstance, batch: str, drift: bool, labelled: bool) -> None:
    instance.add_dynamic_partitions("incoming_batches", [batch])
    # the batch is stored as incoming_batch stores it, under its content hash
    images = generate_synthetic(20, seed=zlib.crc32(batch.encode()))
    AssetStore(get_settings().asset_store).put("incoming_batch", images, batch)
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key="drift_report",
            partition=batch,
            metadata={"drift": drift, "labelled": labelled, "score": 0.99 if drift else 0.1},
        )
    )


def retraining_run(
    instance: dg.DagsterInstance, covers: int | None, status: dg.DagsterRunStatus
) -> dg.DagsterRun:
    """A retraining_job run in the instance, as the daemon would have left it."""
    job = defs.resolve_job_def("retraining_job")
    tags = {COVERS_TAG: str(covers)} if covers is not None else {}
    run = instance.create_run_for_job(job_def=job, run_config={}, tags=tags)
    events = {
        dg.DagsterRunStatus.STARTED: [dg.DagsterEventType.RUN_START],
        dg.DagsterRunStatus.SUCCESS: [
            dg.DagsterEventType.RUN_START,
            dg.DagsterEventType.RUN_SUCCESS,
        ],
        dg.DagsterRunStatus.FAILURE: [
            dg.DagsterEventType.RUN_START,
            dg.DagsterEventType.RUN_FAILURE,
        ],
    }[status]
    for event in events:
        instance.handle_run_event(
            run.run_id, dg.DagsterEvent(event_type_value=event.value, job_name=job.name)
        )
    return run


def tick(
    instance: dg.DagsterInstance,
    cursor: str | None = None,
    now: float | None = None,
    policy: RetrainingPolicy | None = None,
) -> dg.SensorResult:
    context = dg.build_sensor_context(instance=instance, cursor=cursor)
    return evaluate_retraining(context, MLflowResource(), policy, now=now)


def sensor_context(
    instance: dg.DagsterInstance, cursor: str | None = None
) -> dg.SensorEvaluationContext:
    """A tick's context with the resources the definitions bind (settings from the env)."""
    return dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"mlflow": MLflowResource(), "triton": TritonResource()},
    )


def actions(result: dg.SensorResult) -> dict[str, str]:
    """batch -> the retraining action recorded on its drift report."""
    return {
        str(event.partition): str(event.metadata["retraining_action"].value)
        for event in result.asset_events
    }


def latest_report_id(instance: dg.DagsterInstance) -> int:
    records = instance.fetch_materializations(dg.AssetKey("drift_report"), limit=1).records
    return records[0].storage_id


def test_drift_report_requests_one_retraining_and_records_why(
    instance: dg.DagsterInstance,
) -> None:
    report_drift(instance, "batch-a", drift=True, labelled=True)
    first = tick(instance)
    (request,) = first.run_requests or []
    through = latest_report_id(instance)
    assert request.run_key == f"retrain-through-{through}-attempt-1"
    assert request.tags[COVERS_TAG] == str(through) and request.tags[BATCHES_TAG] == "batch-a"
    ops = request.run_config["ops"]
    assert ops["cifar10_raw"]["config"]["extra_batches"] == [stored_batch("batch-a")]
    assert ops["registered_model"]["config"] == {"promote_automatically": False}
    assert ops["triton_deployment"]["config"] == {"challenger_share": 0.1}
    # the training recipe is configs/retraining.yaml's CPU recipe, not the GPU defaults
    assert ops["trained_model"]["config"]["epochs"] == 4
    assert ops["trained_model"]["config"]["stem"] == "imagenet"
    assert ops["cifar10_raw"]["config"]["source"] == "synthetic"
    dg.validate_run_config(defs.resolve_job_def("retraining_job"), request.run_config)
    assert actions(first)["batch-a"].startswith(f"retraining requested (retrain-through-{through}")

    # Evaluated again before the daemon launched it: the same run key, launched only once.
    again = tick(instance, first.cursor)
    assert [r.run_key for r in again.run_requests or []] == [request.run_key]
    assert actions(again) == {}  # the report's action is recorded once


def test_all_drifted_reports_since_the_last_success_make_one_run(
    instance: dg.DagsterInstance,
) -> None:
    report_drift(instance, "calm", drift=False, labelled=True)
    report_drift(instance, "storm-1", drift=True, labelled=True)
    report_drift(instance, "storm-2", drift=True, labelled=False)
    report_drift(instance, "storm-3", drift=True, labelled=True)
    result = tick(instance)
    (request,) = result.run_requests or []
    extra = request.run_config["ops"]["cifar10_raw"]["config"]["extra_batches"]
    assert extra == [stored_batch("storm-1"), stored_batch("storm-3")]
    assert request.tags[BATCHES_TAG] == "storm-1,storm-2,storm-3"
    recorded = actions(result)
    assert recorded["calm"] == "no drift: no retraining needed"
    assert all(recorded[b].startswith("retraining requested") for b in ("storm-1", "storm-3"))


def test_running_cooldown_and_failure_wait_but_never_drop_a_report(
    instance: dg.DagsterInstance,
) -> None:
    report_drift(instance, "first", drift=True, labelled=True)
    covered = latest_report_id(instance)
    running = retraining_run(instance, covered, dg.DagsterRunStatus.STARTED)
    report_drift(instance, "during", drift=True, labelled=True)
    busy = tick(instance)
    assert not busy.run_requests
    assert f"retraining run {running.run_id} is running" in actions(busy)["during"]

    # It succeeds: the cooldown counts from its end; a report now waits for it.
    instance.handle_run_event(
        running.run_id,
        dg.DagsterEvent(
            event_type_value=dg.DagsterEventType.RUN_SUCCESS.value, job_name="retraining_job"
        ),
    )
    cooling = tick(instance, busy.cursor)
    assert not cooling.run_requests and "cooldown of 6.0 h" in str(cooling.skip_reason)
    # After the cooldown: one run for what the success did not cover ("during" only).
    later = tick(instance, cooling.cursor, now=time.time() + 7 * 3600)
    (request,) = later.run_requests or []
    assert request.tags[BATCHES_TAG] == "during"

    # That run fails: the report stays pending, the next attempt waits out the backoff.
    retraining_run(instance, int(request.tags[COVERS_TAG]), dg.DagsterRunStatus.FAILURE)
    policy = RetrainingPolicy(failure_backoff_minutes=10 * 60)
    backoff = tick(instance, later.cursor, now=time.time() + 7 * 3600, policy=policy)
    assert not backoff.run_requests and "last retraining attempt failed" in str(backoff.skip_reason)
    retry = tick(instance, backoff.cursor, now=time.time() + 11 * 3600, policy=policy)
    (second,) = retry.run_requests or []
    assert second.run_key is not None and second.run_key.endswith("-attempt-2")
    assert second.tags[BATCHES_TAG] == "during"


def test_a_report_that_waited_gets_the_retraining_that_covers_it_recorded(
    instance: dg.DagsterInstance,
) -> None:
    report_drift(instance, "first", drift=True, labelled=True)
    first = tick(instance)
    (first_request,) = first.run_requests or []
    running = retraining_run(
        instance, int(first_request.tags[COVERS_TAG]), dg.DagsterRunStatus.STARTED
    )
    report_drift(instance, "during", drift=True, labelled=False)
    during = latest_report_id(instance)
    report_drift(instance, "calm", drift=False, labelled=True)
    busy = tick(instance, first.cursor)
    assert actions(busy) == {
        "during": f"waiting: retraining run {running.run_id} is running; the next retraining "
        "covers this report",
        "calm": "no drift: no retraining needed",
    }
    instance.handle_run_event(
        running.run_id,
        dg.DagsterEvent(
            event_type_value=dg.DagsterEventType.RUN_SUCCESS.value, job_name="retraining_job"
        ),
    )
    cooling = tick(instance, busy.cursor)
    assert actions(cooling) == {}  # still waiting: nothing new to say

    # The cooldown is over: the request that covers "during" is recorded on it, on it alone.
    later = tick(instance, cooling.cursor, now=time.time() + 7 * 3600)
    (request,) = later.run_requests or []
    assert request.tags[BATCHES_TAG] == "during"
    assert actions(later) == {
        "during": f"retraining requested ({request.run_key}) for 1 drifted report(s) (during); "
        "training data adds labelled batches none"
    }
    (observation,) = later.asset_events
    assert observation.metadata["report_storage_id"].value == during
    # Asked again before the daemon launched it: recorded once.
    again = tick(instance, later.cursor, now=time.time() + 7 * 3600)
    assert [r.run_key for r in again.run_requests or []] == [request.run_key]
    assert actions(again) == {}


@dataclass
class Orphans:
    """MLflow runs left RUNNING: two whose Dagster run has ended (one in the training
    experiment, one in the monitoring experiment with a child run), and two that must stay
    RUNNING (their Dagster run still runs; a run of another instance)."""

    dead_run: str
    training: str
    monitoring: str
    child: str
    alive: str
    stranger: str

    def assert_swept(self) -> None:
        from cifar_assets.ml.tracking import client_for

        client = client_for(get_settings().mlflow_tracking_uri)
        for orphan in (self.training, self.monitoring, self.child):
            run = client.get_run(orphan)
            assert run.info.status == "FAILED", orphan
            assert run.data.tags["ended_reason"] == (
                f"Dagster run {self.dead_run} ended FAILURE while this MLflow run was still "
                "RUNNING (its step process was killed)"
            )
        assert client.get_run(self.alive).info.status == "RUNNING"
        assert client.get_run(self.stranger).info.status == "RUNNING"


def leave_orphans(instance: dg.DagsterInstance) -> Orphans:
    from cifar_assets.ml.tracking import (
        PARENT_RUN_TAG,
        client_for,
        ensure_experiment,
        monitoring_experiment,
    )

    settings = get_settings()
    uri = settings.mlflow_tracking_uri
    dead = retraining_run(instance, None, dg.DagsterRunStatus.FAILURE)
    alive = retraining_run(instance, None, dg.DagsterRunStatus.STARTED)
    client = client_for(uri)
    training = ensure_experiment(uri, settings.mlflow_experiment_name)
    monitoring = ensure_experiment(uri, monitoring_experiment(settings.registered_model_name))

    def running(experiment: str, tags: dict[str, str]) -> str:
        return str(client.create_run(experiment, tags=tags).info.run_id)

    monitoring_run = running(monitoring, {"dagster_run_id": dead.run_id})
    return Orphans(
        dead_run=dead.run_id,
        training=running(training, {"dagster_run_id": dead.run_id}),
        monitoring=monitoring_run,
        child=running(monitoring, {PARENT_RUN_TAG: monitoring_run}),
        alive=running(monitoring, {"dagster_run_id": alive.run_id}),
        stranger=running(monitoring, {"dagster_run_id": "another-instance"}),
    )


SENSORS = sorted(sensor.name for sensor in defs.get_repository_def().sensor_defs)


@pytest.mark.parametrize("sensor_name", SENSORS)
def test_every_sensor_tick_fails_mlflow_runs_of_ended_dagster_runs(
    instance: dg.DagsterInstance, sensor_name: str
) -> None:
    orphans = leave_orphans(instance)

    defs.get_repository_def().get_sensor_def(sensor_name).evaluate_tick(sensor_context(instance))

    orphans.assert_swept()


def test_every_run_that_writes_mlflow_runs_fails_orphans_at_its_start(
    instance: dg.DagsterInstance, project_env: dict[str, str]
) -> None:
    """Each job whose steps write MLflow runs, launched in the instance without a daemon: its
    first step marks the orphans FAILED before anything else (each run then stops at the
    missing champion, A/B report or server, which is what this instance has)."""
    from cifar_assets.artifacts import TritonDeployment

    save_npz(
        Path(project_env["CIFAR_VAR_DIR"]) / "incoming" / "monday.npz",
        {"images": generate_synthetic(20, seed=5).images},
    )
    instance.add_dynamic_partitions("incoming_batches", ["monday"])
    AssetStore(get_settings().asset_store).put(
        "triton_deployment", TritonDeployment("cifar10_resnet18", 1, [1], "", "")
    )
    (port,) = free_ports(1)
    no_server = TritonResource(start_if_down=False, http_port=port)
    launches = {
        "drift_check_job": {"partition_key": "monday"},
        "rollout_job": {},
        "promotion_job": {},
        "rollback_job": {
            "run_config": {"ops": {"rollback_champion": {"config": {"reason": "test"}}}}
        },
    }
    for job_name, arguments in launches.items():
        orphans = leave_orphans(instance)
        result = defs.resolve_job_def(job_name).execute_in_process(
            instance=instance,
            raise_on_error=False,
            resources={"triton": no_server},
            **arguments,
        )
        orphans.assert_swept()
        warnings = [
            entry.user_message
            for entry in instance.all_logs(result.run_id)
            if entry.user_message.startswith(f"MLflow run {orphans.training} marked FAILED")
        ]
        assert warnings, f"{job_name} did not say it ended {orphans.training}"


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

    result = evaluate_retraining(dg.build_sensor_context(instance=instance), MLflowResource())

    ops = (result.run_requests or [])[0].run_config["ops"]
    assert ops["trained_model"]["config"] == {"epochs": 1, "batch_size": 32, "stem": "imagenet"}
    extra = ops["cifar10_raw"]["config"]["extra_batches"]
    assert extra == ["/data/old.imageset.npz", stored_batch("batch-e")]
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
        evaluate_retraining(dg.build_sensor_context(instance=instance), MLflowResource())
    assert f"retraining base config {base} {problem}" in str(error.value)
    assert "Point CIFAR_RETRAINING_CONFIG at a YAML run config" in str(error.value)
    # The sensor itself raises it too, not a skip: the daemon then records a failed tick (red
    # in the UI) whose error is this message.
    with pytest.raises(RetrainingConfigError, match=problem):
        drift_retraining_sensor.evaluate_tick(sensor_context(instance))

    # fixed, the same drift report is still handled: the failed ticks did not move the cursor
    monkeypatch.setenv("CIFAR_RETRAINING_CONFIG", str(PROJECT_ROOT / "configs" / "retraining.yaml"))
    fixed = evaluate_retraining(dg.build_sensor_context(instance=instance), MLflowResource())
    assert len(fixed.run_requests or []) == 1


def test_incoming_sensor_registers_each_new_batch_once(
    instance: dg.DagsterInstance, project_env: dict[str, str]
) -> None:
    incoming = Path(project_env["CIFAR_VAR_DIR"]) / "incoming"
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    save_npz(incoming / "monday.npz", {"images": images})
    first = incoming_batch_sensor(sensor_context(instance))
    assert isinstance(first, dg.SensorResult)
    assert [r.partition_key for r in first.run_requests or []] == ["monday"]
    assert first.dynamic_partitions_requests[0].partition_keys == ["monday"]  # type: ignore[index,union-attr]
    instance.add_dynamic_partitions("incoming_batches", ["monday"])
    quiet = incoming_batch_sensor(sensor_context(instance))
    assert not quiet.run_requests and "No new batch" in str(quiet.skip_reason)


def test_bad_entries_are_reported_once_and_never_block_a_good_batch(
    instance: dg.DagsterInstance, project_env: dict[str, str], tmp_path: Path
) -> None:
    incoming = Path(project_env["CIFAR_VAR_DIR"]) / "incoming"
    incoming.mkdir(parents=True)
    outside = tmp_path / "secret.npz"
    images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    save_npz(outside, {"images": images})
    (incoming / "escape.npz").symlink_to(outside)
    (incoming / "garbage.npz").write_bytes(np.random.default_rng(1).bytes(4096))
    save_npz(incoming / "dup.npz", {"images": images})
    save_npz(incoming / "dup.NPZ", {"images": images})
    save_npz(incoming / "tuesday.npz", {"images": images, "labels": np.arange(12) % 10})

    first = incoming_batch_sensor(sensor_context(instance))
    assert [r.partition_key for r in first.run_requests or []] == ["tuesday"]
    problems = json.loads(first.cursor or "[]")
    assert any(p.startswith(f"{incoming / 'escape.npz'}:") for p in problems), problems
    assert any(p.startswith(f"{incoming / 'garbage.npz'}:") for p in problems), problems
    assert sum("dup" in p for p in problems) == 2, problems
    # The next tick knows them already: nothing new to say, nothing registered twice.
    instance.add_dynamic_partitions("incoming_batches", ["tuesday"])
    again = incoming_batch_sensor(sensor_context(instance, first.cursor))
    assert not again.run_requests and "4 entries refused" in str(again.skip_reason)


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
