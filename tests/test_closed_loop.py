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

After every step every run has succeeded, and MLflow's aliases, Triton's live versions and the
router's weights agree (the rollout's check against the running server). The times from a
dropped batch to its verdict and from a drifted verdict to the challenger serving are printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from tests.conftest import PROJECT_ROOT, subprocess_env, whole_state
from tests.serving_fixtures import copy_repository, free_ports

DAGSTER = str(PROJECT_ROOT / "scripts" / "dagster")
# Small enough for two CPU cores, big enough that the model beats chance and drift shows.
TRAINING = {
    "cifar10_raw": {"config": {"source": "synthetic", "num_images": 1200, "seed": 0}},
    "cifar10_splits": {"config": {"validation_fraction": 0.15, "test_fraction": 0.15, "seed": 0}},
    "trained_model": {"config": {"stem": "imagenet", "epochs": 2, "batch_size": 64, "lr": 0.1}},
    "onnx_model": {"config": {"parity_images": 64, "calibration_images": 64}},
    "drift_baseline": {"config": {"reference_images": 180}},
}


@dataclass
class Loop:
    env: dict[str, str]
    home: Path
    incoming: Path
    port: int
    timings: dict[str, float]

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.home))

    def runs(self) -> list[dg.DagsterRun]:
        with self.instance() as instance:
            return list(reversed(instance.get_runs()))

    def wait_for_runs(
        self, done: Callable[[list[dg.DagsterRun]], bool], what: str, timeout_s: float
    ) -> list[dg.DagsterRun]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            runs = self.runs()
            failed = [r for r in runs if r.status in FAILED]
            assert not failed, failure_report(self, failed)
            if done(runs):
                return runs
            time.sleep(3)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}: {summary(self)}")

    def dagster(self, *args: str, timeout_s: float = 900) -> str:
        result = subprocess.run(
            [DAGSTER, *args],
            cwd=PROJECT_ROOT,
            env=subprocess_env(self.env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        return result.stdout + result.stderr


FAILED = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


def summary(loop: Loop) -> str:
    return ", ".join(f"{r.job_name}:{r.status.value}" for r in loop.runs())


def failure_report(loop: Loop, failed: list[dg.DagsterRun]) -> str:
    with loop.instance() as instance:
        lines = []
        for run in failed:
            for entry in instance.all_logs(run.run_id):
                if entry.dagster_event and entry.dagster_event.is_failure:
                    lines.append(f"{run.job_name}: {entry.message[:1500]}")
        return f"runs failed: {summary(loop)}\n" + "\n".join(lines[-6:])


def write_batches(incoming: Path, outside: Path) -> None:
    from cifar_assets.data.corruptions import corrupt
    from cifar_assets.data.imageset import CLASSES, save_npz
    from cifar_assets.data.synthetic import generate_synthetic

    clean = generate_synthetic(200, seed=11)
    save_npz(incoming / "clean.npz", {"images": clean.images})  # unlabelled, like traffic
    # Labelled, corrupted, with unequal classes (between 10 and 38 images per class).
    noisy = generate_synthetic(400, seed=12)
    keep = np.concatenate(
        [np.flatnonzero(noisy.labels == c)[: 10 + 3 * c] for c in range(len(CLASSES))]
    )
    save_npz(
        incoming / "noisy.npz",
        {
            "images": corrupt(noisy.images[keep], "gaussian_noise", 3),
            "labels": noisy.labels[keep],
        },
    )
    # A labelled image folder: four classes, 9/4/13/6 files, PNG and JPEG, some not 32x32.
    photos = generate_synthetic(200, seed=13)
    for name, count in (("airplane", 9), ("cat", 4), ("dog", 13), ("ship", 6)):
        folder = incoming / "field_photos" / name
        folder.mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(photos.labels == CLASSES.index(name))[:count]):
            picture = Image.fromarray(photos.images[index])
            if i % 3 == 0:
                picture.resize((48, 40)).save(folder / f"IMG_{i:04d}.JPG", quality=92)
            else:
                picture.save(folder / f"img_{i}.png")
    # A symlink to a file outside the folder: refused, and it blocks nothing.
    save_npz(outside, {"images": clean.images[:20]})
    (incoming / "elsewhere.npz").symlink_to(outside)


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


def launch_through_graphql(loop: Loop, job: str, run_config: dict[str, Any]) -> str:
    from dagster_graphql import DagsterGraphQLClient

    client = DagsterGraphQLClient("127.0.0.1", port_number=loop.port)
    return client.submit_job_execution(
        job, repository_location_name="cifar_assets", run_config=run_config
    )


def send_traffic_with_feedback(users: int) -> dict[int, int]:
    """Requests through the router from ``users`` users, then feedback that says the
    challenger (v2) was right and the champion (v1) wrong: the planted outcome the A/B test
    must find. Returns requests per served version."""
    from cifar_assets.data.synthetic import generate_synthetic
    from cifar_assets.serving.capture import record_feedback
    from cifar_assets.serving.client import infer_ab
    from cifar_assets.serving.launcher import TritonConfig

    config = TritonConfig.from_settings()
    images = generate_synthetic(users, seed=21).images
    served: dict[int, int] = {}
    results = []
    for user in range(users):
        result = infer_ab(images[user : user + 1], user_id=f"user-{user}", url=config.http_url)
        served[result.served_version] = served.get(result.served_version, 0) + 1
        results.append(result)
    for result in results:
        predicted = int(np.argmax(result.logits[0]))
        label = predicted if result.served_version == 2 else (predicted + 1) % 10
        record_feedback(config.capture_dir, result.request_id, label)
    return served


@pytest.fixture
def loop(project_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Loop:
    import yaml

    http, grpc, metrics, webserver = free_ports(4)
    var = Path(project_env["CIFAR_VAR_DIR"])
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
    return Loop(env, Path(env["DAGSTER_HOME"]), var / "incoming", webserver, {})


@pytest.mark.slow
def test_the_closed_loop_as_a_user_drives_it(loop: Loop, tmp_path: Path) -> None:
    from cifar_assets.serving.launcher import TritonConfig, stop_server

    try:
        run_the_loop(loop, tmp_path)
    finally:
        stop_server(TritonConfig.from_settings())
    print(f"\nclosed loop timings (s): {json.dumps(loop.timings)}")


def run_the_loop(loop: Loop, tmp_path: Path) -> None:
    # 1. The quickstart's command: v1 trained, the gate makes it champion, Triton serves it.
    main_config = tmp_path / "main.yaml"
    main_config.write_text(json.dumps({"ops": TRAINING}))
    loop.dagster(
        "job", "execute", "-m", "cifar_assets.definitions", "-j", "main_job", "-c", str(main_config)
    )
    assert [(r.job_name, r.status) for r in loop.runs()] == [
        ("main_job", dg.DagsterRunStatus.SUCCESS)
    ]
    assert whole_state() == {
        "champion": 1,
        "challenger": None,
        "weights": {1: 1.0},
        "live": [1],
        "ready": [1],
        "problems": [],
    }

    with dagster_dev(loop, tmp_path / "dagster-dev.log"):
        # 2. The sensors run by default; the documented commands turn one off and on again
        # in the location `dagster dev` serves.
        listed = loop.dagster("sensor", "list", "-w", "workspace.yaml")
        assert "drift_retraining_sensor" in listed and "incoming_batch_sensor" in listed
        loop.dagster("sensor", "stop", "drift_retraining_sensor", "-w", "workspace.yaml")
        with loop.instance() as instance:
            states = {s.instigator_name: s.status.value for s in instance.all_instigator_state()}
        assert states["drift_retraining_sensor"] == "STOPPED"
        loop.dagster("sensor", "start", "drift_retraining_sensor", "-w", "workspace.yaml")
        with loop.instance() as instance:
            states = {s.instigator_name: s.status.value for s in instance.all_instigator_state()}
        assert states["drift_retraining_sensor"] == "RUNNING"

        # 3. Batches dropped as files; the daemon checks each.
        dropped = time.time()
        write_batches(loop.incoming, tmp_path / "outside.npz")
        batches = {"clean", "noisy", "field_photos"}
        loop.wait_for_runs(
            lambda runs: (
                {
                    r.tags.get("dagster/partition")
                    for r in runs
                    if r.job_name == "drift_check_job" and r.status == dg.DagsterRunStatus.SUCCESS
                }
                == batches
            ),
            "the three drift checks",
            timeout_s=900,
        )
        verdicts = drift_verdicts(loop)
        for batch, verdict in verdicts.items():
            loop.timings[f"dropped_to_verdict_{batch}"] = round(verdict["time"] - dropped, 1)
        assert set(verdicts) == batches
        assert verdicts["noisy"]["drift"] is True and verdicts["noisy"]["labelled"] is True
        assert verdicts["clean"]["drift"] is False
        assert all(v["model_version"] == 1 for v in verdicts.values())  # the champion's
        assert whole_state()["problems"] == []

        # One retraining for all drifted reports, with every labelled drifted batch in its data.
        drifted_at = max(v["time"] for v in verdicts.values() if v["drift"])
        runs = loop.wait_for_runs(
            lambda runs: any(
                r.job_name == "retraining_job" and r.status == dg.DagsterRunStatus.SUCCESS
                for r in runs
            ),
            "the retraining run",
            timeout_s=1200,
        )
        (retraining,) = [r for r in runs if r.job_name == "retraining_job"]
        drifted = sorted(b for b, v in verdicts.items() if v["drift"])
        assert sorted(retraining.tags["cifar/drift_batches"].split(",")) == drifted
        extra = retraining.run_config["ops"]["cifar10_raw"]["config"]["extra_batches"]
        labelled_drifted = sorted(b for b in drifted if verdicts[b]["labelled"])
        assert sorted(Path(path).parent.name for path in extra) == labelled_drifted
        loop.timings["drifted_verdict_to_challenger_serving"] = round(time.time() - drifted_at, 1)
        assert whole_state() == {
            "champion": 1,
            "challenger": 2,
            "weights": {1: 0.9, 2: 0.1},
            "live": [1, 2],
            "ready": [1, 2],
            "problems": [],
        }
        assert retraining_actions(loop) == {
            batch: "requested" if verdicts[batch]["drift"] else "no drift" for batch in batches
        }

        # 4. Traffic with feedback, the A/B report from the CLI, promotion and rollback
        # through GraphQL, as the launchpad sends them.
        served = send_traffic_with_feedback(600)
        assert set(served) == {1, 2} and served[1] > served[2] > 20
        time.sleep(2)  # the router writes its capture within a second
        loop.dagster(
            "asset", "materialize", "-m", "cifar_assets.definitions", "--select", "ab_test_report"
        )
        with loop.instance() as instance:
            report = instance.get_latest_materialization_event(dg.AssetKey("ab_test_report"))
        assert report is not None and report.asset_materialization is not None
        assert report.asset_materialization.metadata["decision"].value == "promote"

        launch_through_graphql(loop, "promotion_job", {})
        loop.wait_for_runs(lambda runs: finished(runs, "promotion_job"), "promotion", 600)
        assert whole_state() == {
            "champion": 2,
            "challenger": None,
            "weights": {2: 1.0},
            "live": [2],
            "ready": [2],
            "problems": [],
        }

        launch_through_graphql(
            loop,
            "rollback_job",
            {"ops": {"rollback_champion": {"config": {"reason": "user-path test"}}}},
        )
        loop.wait_for_runs(lambda runs: finished(runs, "rollback_job"), "rollback", 600)
        assert whole_state() == {
            "champion": 1,
            "challenger": None,
            "weights": {1: 1.0},
            "live": [1],
            "ready": [1],
            "problems": [],
        }

    # Every run of the loop succeeded, and the journal kept every transition with its reason.
    runs = loop.runs()
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), summary(loop)
    journal = [
        json.loads(line)
        for line in (Path(loop.env["CIFAR_VAR_DIR"]) / "triton" / "rollout_journal.jsonl")
        .read_text()
        .splitlines()
    ]
    done = [(r["action"], r["version"]) for r in journal if r["phase"] == "done"]
    assert done == [("deploy", 1), ("deploy", 2), ("promote", 2), ("rollback", 1)]


def finished(runs: list[dg.DagsterRun], job: str) -> bool:
    return any(r.job_name == job and r.status == dg.DagsterRunStatus.SUCCESS for r in runs)


def drift_verdicts(loop: Loop) -> dict[str, dict[str, Any]]:
    with loop.instance() as instance:
        records = instance.fetch_materializations(dg.AssetKey("drift_report"), limit=50).records
    verdicts = {}
    for record in records:
        metadata = record.asset_materialization.metadata  # type: ignore[union-attr]
        verdicts[str(record.partition_key)] = {
            "drift": metadata["drift"].value,
            "labelled": metadata["labelled"].value,
            "model_version": metadata["model_version"].value,
            "time": record.timestamp,
        }
    return verdicts


def retraining_actions(loop: Loop) -> dict[str, str]:
    """batch -> what the retraining policy recorded on its drift report (first word kept)."""
    with loop.instance() as instance:
        records = instance.fetch_observations(dg.AssetKey("drift_report"), limit=50).records
    actions = {}
    for record in records:
        observation = record.asset_observation
        assert observation is not None
        action = str(observation.metadata["retraining_action"].value)
        actions[str(record.partition_key)] = (
            "requested" if action.startswith("retraining requested") else action.split(":")[0]
        )
    return actions
