"""The lifecycle owner on a real tritonserver and a real MLflow store: every transition moves
MLflow's aliases, Triton's live versions and the router's weights together, under traffic that
never fails, with a journal that a crash mid-transition leaves for reconcile() to complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cifar_assets.ml import registry
from cifar_assets.ml.model import Architecture, build_resnet18, save_model
from cifar_assets.ml.registry import Registry
from cifar_assets.ml.tracking import tracking_run
from cifar_assets.serving import repository
from cifar_assets.serving.client import infer_ab
from cifar_assets.serving.launcher import TritonConfig, read_pid_file
from cifar_assets.serving.rollout import CRASH_AFTER_ENV, Rollout, RolloutError
from tests.conftest import subprocess_env
from tests.serving_fixtures import ServingEnv, copy_repository, free_ports

MODEL = "cifar10-resnet18"
IMAGE = np.random.default_rng(1).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)


def registered(uri: str, tmp_path: Path, versions: int) -> None:
    """Versions 1..n in the registry without aliases, as the pipeline registers them."""
    arch = Architecture(stem="imagenet")
    for number in range(1, versions + 1):
        model_dir = save_model(build_resnet18(arch), arch, tmp_path / f"m{number}").parent
        with tracking_run(uri, "rollout-test", f"train-{number}", {}) as run_id:
            pass
        Registry(uri).register(run_id, model_dir, {"accuracy": 0.5}, "data", alias=None)


def evidence() -> dict[str, Any]:
    return {"max_abs_diff_vs_onnxruntime": 0.0}


class Traffic:
    """Routed requests from a background thread while transitions happen; counts failures."""

    def __init__(self, url: str) -> None:
        self.url, self.ok, self.failed = url, 0, []  # type: ignore[var-annotated]
        self.stop = threading.Event()
        self.images = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        user = 0
        while not self.stop.is_set():
            user += 1
            try:
                infer_ab(self.images, user_id=f"u{user}", url=self.url)
                self.ok += 1
            except Exception as error:
                self.failed.append(repr(error))

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def whole_state(rollout: Rollout) -> dict[str, Any]:
    state = rollout.state()
    return {
        "champion": state.champion,
        "challenger": state.challenger,
        "weights": state.weights,
        "live": state.live_versions,
        "ready": [v for v in (1, 2) if rollout.server_ready(v)],
        "problems": rollout.check(server_ready=rollout.server_ready),
    }


def test_transitions_move_registry_and_serving_together(
    triton_server: ServingEnv, tmp_path: Path
) -> None:
    env = triton_server
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registered(uri, tmp_path, 2)
    rollout = Rollout(
        models=Registry(uri, MODEL),
        triton=env.http_url,
        repo=env.repo,
        state_dir=env.state_dir,
    )
    with Traffic(env.http_url) as traffic:
        rollout.deploy(1, "champion", evidence, reason="first model", actor="test")
        assert whole_state(rollout) == {
            "champion": 1,
            "challenger": None,
            "weights": {1: 1.0},
            "live": [1],
            "ready": [1],
            "problems": [],
        }

        # A version that fails its check gets no alias, no traffic, and is unloaded again.
        def fails() -> dict[str, Any]:
            raise RuntimeError("differs from ONNX Runtime")

        with pytest.raises(RuntimeError, match="differs"):
            rollout.deploy(2, "challenger", fails, reason="retrained", actor="test")
        assert whole_state(rollout)["live"] == [1]
        assert rollout.state().challenger is None

        rollout.deploy(2, "challenger", evidence, reason="retrained", actor="test")
        assert whole_state(rollout) == {
            "champion": 1,
            "challenger": 2,
            "weights": {1: 0.9, 2: 0.1},
            "live": [1, 2],
            "ready": [1, 2],
            "problems": [],
        }

        rollout.promote(2, reason="A/B test won", actor="test", evidence={"p": 0.001})
        assert whole_state(rollout) == {
            "champion": 2,
            "challenger": None,
            "weights": {2: 1.0},
            "live": [2],
            "ready": [2],
            "problems": [],
        }

        rollout.rollback(reason="v2 misbehaves", actor="test")
        assert whole_state(rollout) == {
            "champion": 1,
            "challenger": None,
            "weights": {1: 1.0},
            "live": [1],
            "ready": [1],
            "problems": [],
        }
        with pytest.raises(RolloutError, match="is the champion"):
            rollout.retire(1, reason="no", actor="test")
    assert traffic.failed == [] and traffic.ok > 20

    done = [r for r in rollout.journal() if r["phase"] == "done"]
    assert [r["action"] for r in done] == ["deploy", "deploy", "promote", "rollback"]
    assert done[2]["evidence"] == {"p": 0.001}
    assert done[3]["before"]["champion"] == 2 and done[3]["after"]["champion"] == 1
    # A failed check happens before the transition starts: nothing moved, nothing to undo.
    assert [r["phase"] for r in rollout.journal()].count("failed") == 0
    moves = Registry(uri, MODEL).history(alias=registry.CHAMPION)
    assert [(m.from_version, m.to_version) for m in moves] == [(None, 1), (1, 2), (2, 1)]


CLI = [sys.executable, "-m", "cifar_assets.serving.cli"]


def cli(*args: str, crash_after: str | None = None) -> subprocess.CompletedProcess[str]:
    """``cifar-triton *args`` in a new process with this one's environment, as a user runs it."""
    extra = {CRASH_AFTER_ENV: crash_after} if crash_after else {}
    return subprocess.run(
        [*CLI, *args],
        env=subprocess_env(extra),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cifar_triton_status_shows_an_alias_moved_outside_the_rollout(
    triton_server: ServingEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_ab_promotion import point_settings_at

    env = triton_server
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registered(uri, tmp_path, 3)
    point_settings_at(env, uri, monkeypatch)
    monkeypatch.setenv("CIFAR_MODEL_NAME", MODEL)
    rollout = Rollout(
        models=Registry(uri, MODEL), triton=env.http_url, repo=env.repo, state_dir=env.state_dir
    )
    rollout.deploy(1, "champion", evidence, reason="first", actor="test")
    assert json.loads(cli("status").stdout)["lifecycle"]["disagreements"] == []

    # Someone gives v3 (never checked in Triton, so never served) the challenger alias in
    # MLflow's UI: the aliases alone break no rule, only the journal knows it was not done so.
    Registry(uri, MODEL).set_alias("challenger", 3, "by hand", "someone")
    status = cli("status")
    assert status.returncode == 0, status.stderr
    disagreements = json.loads(status.stdout)["lifecycle"]["disagreements"]
    assert len(disagreements) == 1, disagreements
    (disagreement,) = disagreements
    assert disagreement.startswith("challenger is 3 but the journal's last transition"), (
        disagreement
    )
    assert "(deploy at " in disagreement and "left it None" in disagreement, disagreement
    assert "cifar-triton reconcile" in disagreement

    reconciled = cli("reconcile")
    assert reconciled.returncode == 0, reconciled.stderr
    last = rollout.journal()[-1]
    assert (last["action"], last["reason"]) == (
        "reconcile",
        "moved outside the rollout: challenger None -> 3",
    )
    assert json.loads(cli("status").stdout)["lifecycle"]["disagreements"] == []
    rollout.retire(3, reason="test over", actor="test")
    assert rollout.check(server_ready=rollout.server_ready) == []


def _kill_hard(pid: int) -> None:
    """SIGKILL ``pid`` (not our child: ``cifar-triton start`` daemonised it) and wait it out."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text():
        assert time.monotonic() < deadline, f"tritonserver {pid} survived SIGKILL"
        time.sleep(0.1)


@pytest.mark.slow
def test_killed_mid_transition_with_the_server_then_cifar_triton_start_reconciles(
    onnx_models: dict[int, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real crash, twice: a ``cifar-triton`` transition SIGKILLs itself (the rollout's
    CIFAR_ROLLOUT_CRASH_AFTER test hook), tritonserver gets kill -9, and the next
    ``cifar-triton start`` finishes the transition before traffic arrives."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registered(uri, tmp_path, 2)
    repo = copy_repository(tmp_path / "triton_repo")
    for version, path in onnx_models.items():
        repository.write_version(repo, path, version, {"run_id": f"run-{version}"})
    http, grpc, metrics = free_ports(3)
    for key, value in {
        "CIFAR_VAR_DIR": str(tmp_path / "var"),
        "TRITON_MODEL_REPOSITORY": str(repo),
        "TRITON_HTTP_PORT": str(http),
        "TRITON_GRPC_PORT": str(grpc),
        "TRITON_METRICS_PORT": str(metrics),
        "MLFLOW_TRACKING_URI": uri,
        "CIFAR_MODEL_NAME": MODEL,
    }.items():
        monkeypatch.setenv(key, value)
    config = TritonConfig.from_settings()

    def crash_and_restart(args: tuple[str, ...], crash_after: str, action: str) -> list[str]:
        """Run ``cifar-triton *args`` until the hook kills it, kill -9 the server, start it
        again the way a user would; returns what check() said while half done."""
        crashed = cli(*args, crash_after=crash_after)
        assert crashed.returncode == -signal.SIGKILL, (crashed.stdout, crashed.stderr)
        last = rollout.journal()[-1]
        assert (last["action"], last["phase"]) == (action, "intent")
        halfway = rollout.check()
        assert any("has an intent but no completion" in p for p in halfway), halfway
        record = read_pid_file(config.state_dir)
        assert record is not None
        _kill_hard(int(record["pid"]))
        restarted = cli("start")
        assert restarted.returncode == 0, restarted.stderr
        assert f"reconciled: {action}" in restarted.stdout, restarted.stdout
        finished = rollout.journal()[-1]
        assert (finished["id"], finished["phase"], finished["completed_by"]) == (
            last["id"],
            "done",
            "reconcile",
        )
        assert finished["actor"] == "cifar-triton start"
        return halfway

    rollout = Rollout(
        models=Registry(uri, MODEL), triton=config.http_url, repo=repo, state_dir=config.state_dir
    )
    started = cli("start")
    assert started.returncode == 0, started.stderr
    try:
        rollout.deploy(1, "champion", evidence, reason="first", actor="test")
        rollout.deploy(2, "challenger", evidence, reason="second", actor="test")

        # 1. Killed right after the intent: nothing had moved yet.
        halfway = crash_and_restart(
            ("promote", "2", "--reason", "A/B test won"), "intent", "promote"
        )
        assert len(halfway) == 1, halfway
        assert whole_state(rollout) == {
            "champion": 2,
            "challenger": None,
            "weights": {2: 1.0},
            "live": [2],
            "ready": [2],
            "problems": [],
        }
        assert infer_ab(IMAGE, user_id="after-crash-1", url=config.http_url).served_version == 2

        # 2. Killed after MLflow moved, before serving followed: a half-moved state.
        halfway = crash_and_restart(
            ("rollback", "--reason", "v2 misbehaves"), "aliases", "rollback"
        )
        assert any("v2 has the most router traffic" in p for p in halfway), halfway
        assert whole_state(rollout) == {
            "champion": 1,
            "challenger": None,
            "weights": {1: 1.0},
            "live": [1],
            "ready": [1],
            "problems": [],
        }
        assert infer_ab(IMAGE, user_id="after-crash-2", url=config.http_url).served_version == 1
        status = json.loads(cli("status").stdout)
        assert status["lifecycle"]["disagreements"] == []
        assert rollout.reconcile() is None  # nothing left to do
    finally:
        stopped = cli("stop")
        assert stopped.returncode == 0, stopped.stderr
