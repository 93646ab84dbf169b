"""A training step killed with SIGKILL under `dagster job execute` (no daemon): its MLflow run
cannot end itself, and the next training marks it FAILED with the reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest
from mlflow import MlflowClient

from tests.conftest import PROJECT_ROOT, subprocess_env
from tests.loop import job_execute

RECIPE = {
    "cifar10_raw": {"config": {"source": "synthetic", "num_images": 600, "seed": 3}},
    "trained_model": {"config": {"stem": "imagenet", "epochs": 40, "batch_size": 32}},
}


def training_step_pid(home: str) -> int | None:
    """The pid of the running trained_model step, from its STEP_START event in the run log."""
    with dg.DagsterInstance.from_config(home) as instance:
        for run in instance.get_runs(limit=1):
            for entry in instance.all_logs(run.run_id):
                event = entry.dagster_event
                if (
                    event is not None
                    and event.event_type_value == "STEP_START"
                    and event.step_key == "trained_model"
                ):
                    return event.pid
    return None


def running_training_run(client: MlflowClient, experiment: str) -> str | None:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'")
    started = [r for r in runs if r.data.metrics.get("train_loss") is not None or r.data.params]
    return started[0].info.run_id if started else None


@pytest.mark.slow
def test_sigkilled_training_is_marked_failed_by_the_next_training(
    project_env: dict[str, str], tmp_path: Path
) -> None:
    from cifar_assets.settings import get_settings

    settings = get_settings()
    config = tmp_path / "long.json"
    config.write_text(json.dumps({"ops": RECIPE}))
    command = [str(PROJECT_ROOT / "scripts" / "dagster"), *job_execute("main_job", config)]
    env = subprocess_env(project_env | {"CIFAR_PROGRESS_BAR": "0"})
    log = (tmp_path / "execute.log").open("wb")
    job = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=log)
    client = MlflowClient(settings.mlflow_tracking_uri)
    try:
        deadline = time.monotonic() + 600
        orphan = None
        while orphan is None and time.monotonic() < deadline:
            assert job.poll() is None, (tmp_path / "execute.log").read_text()[-3000:]
            orphan = running_training_run(client, settings.mlflow_experiment_name)
            time.sleep(2)
        assert orphan is not None, "the training never started its MLflow run"
        step = training_step_pid(project_env["DAGSTER_HOME"])
        assert step is not None, "no STEP_START event for trained_model"
        os.kill(step, signal.SIGKILL)
        assert job.wait(300) != 0
    finally:
        if job.poll() is None:
            job.kill()
        log.close()

    with dg.DagsterInstance.from_config(project_env["DAGSTER_HOME"]) as instance:
        (killed,) = instance.get_runs()
        assert killed.status == dg.DagsterRunStatus.FAILURE
    # The killed step could not end its MLflow run.
    assert client.get_run(orphan).info.status == "RUNNING"

    # The next training, also without a daemon, ends it with the reason.
    short = tmp_path / "short.json"
    short.write_text(
        json.dumps(
            {
                "ops": {
                    "trained_model": {"config": {"stem": "imagenet", "epochs": 1, "batch_size": 32}}
                }
            }
        )
    )
    result = subprocess.run(
        [
            str(PROJECT_ROOT / "scripts" / "dagster"),
            "asset",
            "materialize",
            "-m",
            "cifar_assets.definitions",
            "--select",
            "trained_model",
            "-c",
            str(short),
        ],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ended = client.get_run(orphan)
    assert ended.info.status == "FAILED"
    assert ended.data.tags["ended_reason"].startswith(
        f"Dagster run {killed.run_id} ended FAILURE while this MLflow run was still RUNNING"
    )
    # No MLflow run of the experiment is left RUNNING.
    experiment = client.get_experiment_by_name(settings.mlflow_experiment_name)
    assert experiment is not None
    assert client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") == []
