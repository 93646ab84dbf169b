"""The closed loop exactly as a user drives it, with every run launched the way people launch it.

1. ``./scripts/dagster job execute -j main_job`` (the quickstart's command) trains v1, which the
   gate makes champion and Triton serves.
2. ``dagster dev -w workspace.yaml`` runs the webserver and the daemon; the sensors are switched
   with the documented ``./scripts/dagster sensor stop|start ... -w workspace.yaml``.
3. Batches are dropped as files: a clean one, a labelled gaussian-noise one with unequal class
   counts, a labelled image folder of PNG and JPEG files with unequal classes, and a refused
   symlink. The daemon launches the drift checks, then one retraining for the drifted reports,
   which serves v2 as challenger beside the champion.
4. Traffic with feedback goes through the router; ``ab_test_report`` is materialized from the
   CLI; ``promotion_job`` and ``rollback_job`` are launched through GraphQL, as the UI does.
   A small batch dropped after each is judged by the detectors of the champion of the moment.

After every step every run has succeeded, and MLflow's aliases, Triton's live versions and the
router's weights are exactly what the step should leave, and agree (the rollout's check against
the running server). The times from a dropped batch to its verdict and from a drifted verdict to
the challenger serving are printed, with the final state.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from tests.conftest import subprocess_env, whole_state
from tests.loop import (
    CHAMPION_ONLY,
    DAGSTER,
    TRAINING,
    Loop,
    ab_test_and_promote,
    assert_journal,
    drop_and_check,
    expected_state,
    job_execute,
    retraining_serves_challenger,
    roll_back,
    small_clean_batch,
    write_batches,
)
from tests.serving_fixtures import copy_repository, free_ports


@contextlib.contextmanager
def dagster_dev(loop: Loop, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    from tests.test_ui import start

    process = start(
        [DAGSTER, "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(loop.port)],
        subprocess_env(loop.env),
        f"http://127.0.0.1:{loop.port}/server_info",
        log,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def loop(project_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Loop:
    import yaml

    http, grpc, metrics, webserver = free_ports(4)
    retraining = tmp_path / "retraining.yaml"
    retraining.write_text(yaml.safe_dump({"ops": TRAINING}))
    env = project_env | {
        "TRITON_HTTP_PORT": str(http),
        "TRITON_GRPC_PORT": str(grpc),
        "TRITON_METRICS_PORT": str(metrics),
        "CIFAR_RETRAINING_CONFIG": str(retraining),
        "CIFAR_PROGRESS_BAR": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    copy_repository(Path(env["TRITON_MODEL_REPOSITORY"]))
    return Loop(env, webserver)


@pytest.mark.slow
def test_the_closed_loop_as_a_user_drives_it(loop: Loop, tmp_path: Path) -> None:
    from cifar_assets.serving.launcher import TritonConfig, stop_server

    started = time.monotonic()
    try:
        run_the_loop(loop, tmp_path)
    finally:
        stop_server(TritonConfig.from_settings())
    loop.figures["whole_loop_s"] = round(time.monotonic() - started, 1)
    print(f"\nclosed loop figures (sqlite, dagster dev): {json.dumps(loop.figures)}")


def run_the_loop(loop: Loop, tmp_path: Path) -> None:
    # 1. The quickstart's command: v1 trained, the gate makes it champion, Triton serves it.
    main_config = tmp_path / "main.yaml"
    main_config.write_text(json.dumps({"ops": TRAINING}))
    started = time.monotonic()
    loop.dagster(*job_execute("main_job", main_config))
    loop.figures["main_job_s"] = round(time.monotonic() - started, 1)
    assert [(r.job_name, r.status) for r in loop.runs()] == [
        ("main_job", dg.DagsterRunStatus.SUCCESS)
    ]
    assert whole_state() == expected_state(1, None, {1: 1.0})

    with dagster_dev(loop, tmp_path / "dagster-dev.log"):
        # 2. The sensors run by default; the documented commands turn one off and on again
        # in the location `dagster dev` serves.
        listed = loop.dagster("sensor", "list", "-w", "workspace.yaml")
        assert "drift_retraining_sensor" in listed and "incoming_batch_sensor" in listed
        loop.dagster("sensor", "stop", "drift_retraining_sensor", "-w", "workspace.yaml")
        with loop.instance() as instance:
            states = {s.instigator_name: s.status.value for s in instance.all_instigator_state()}
        assert states["drift_retraining_sensor"] == "STOPPED"
        loop.assert_state(*CHAMPION_ONLY)
        loop.dagster("sensor", "start", "drift_retraining_sensor", "-w", "workspace.yaml")
        with loop.instance() as instance:
            states = {s.instigator_name: s.status.value for s in instance.all_instigator_state()}
        assert states["drift_retraining_sensor"] == "RUNNING"
        loop.assert_state(*CHAMPION_ONLY)

        # 3. Batches dropped as files; the daemon checks each, then launches one retraining
        # for the drifted reports, with every labelled drifted batch in its data.
        batches = {"clean", "noisy", "field_photos"}
        verdicts = drop_and_check(
            loop, lambda incoming: write_batches(incoming, tmp_path / "outside.npz"), batches
        )
        assert set(verdicts) == batches
        assert verdicts["noisy"]["drift"] is True and verdicts["noisy"]["labelled"] is True
        assert verdicts["clean"]["drift"] is False
        retraining_serves_challenger(loop, verdicts)

        # 4. Traffic with feedback, the A/B report from the CLI, promotion and rollback
        # through GraphQL, as the launchpad sends them. The detectors follow the champion: a
        # batch dropped after each is judged by v2's, then by v1's again.
        ab_test_and_promote(loop)
        drop_and_check(
            loop, small_clean_batch("after_promotion", 31), {"after_promotion"}, (2, None, {2: 1.0})
        )
        roll_back(loop)
        drop_and_check(loop, small_clean_batch("after_rollback", 32), {"after_rollback"})

    assert_journal(loop, [("deploy", 1), ("deploy", 2), ("promote", 2), ("rollback", 1)])
    loop.figures["final_state"] = whole_state()
    loop.figures["runs_per_job"] = dict(Counter(r.job_name for r in loop.runs()))
