"""Shared fixtures: every test runs against its own temporary state (var dir, DAGSTER_HOME,
MLflow store), never the developer's ``var/``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Triton fixtures (onnx_models, triton_server) for every test module that asks for them.
pytest_plugins = ["tests.serving_fixtures"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# the closed loop's shared steps assert like a test module does
pytest.register_assert_rewrite("tests.loop")


@pytest.fixture
def project_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Point every setting at a fresh temporary directory; returns the variables set."""
    var = tmp_path / "var"
    home = var / "dagster_home"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text((PROJECT_ROOT / "configs" / "dagster.yaml").read_text())
    env = {
        "CIFAR_VAR_DIR": str(var),
        "DAGSTER_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{var / 'mlflow.db'}",
        "TRITON_MODEL_REPOSITORY": str(var / "triton_repo"),
    }
    for key in (
        "CIFAR_DATA_DIR",
        "CIFAR_STORAGE_DIR",
        "CIFAR_ASSET_STORE",
        "CIFAR_INCOMING_DIR",
        "CIFAR_CAPTURE_DIR",
        "CIFAR_RETRAINING_CONFIG",
    ):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield env


def subprocess_env(extra: dict[str, str]) -> dict[str, str]:
    """The current environment plus ``extra``, with the venv's bin first on PATH."""
    env = dict(os.environ)
    env.update(extra)
    env["PATH"] = f"{PROJECT_ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def whole_state() -> dict[str, Any]:
    """The whole lifecycle state for the settings in the environment: MLflow's aliases, the
    router's weights, Triton's live versions and which answer, and every disagreement the
    rollout finds between them (against the running server)."""
    from cifar_assets.ml.registry import Registry
    from cifar_assets.serving.launcher import TritonConfig
    from cifar_assets.serving.rollout import Rollout
    from cifar_assets.settings import get_settings

    settings = get_settings()
    config = TritonConfig.from_settings()
    rollout = Rollout(
        models=Registry(settings.mlflow_tracking_uri, settings.registered_model_name),
        triton=config.http_url,
        repo=config.repo,
        state_dir=config.state_dir,
    )
    state = rollout.state()
    return {
        "champion": state.champion,
        "challenger": state.challenger,
        "weights": state.weights,
        "live": state.live_versions,
        "ready": [v for v in range(1, 6) if rollout.server_ready(v)],
        "problems": rollout.check(server_ready=rollout.server_ready),
    }


def wait_until(condition: Any, what: str, timeout_s: float = 30.0, interval_s: float = 0.1) -> Any:
    """Poll ``condition()`` until it returns something truthy (returned); fail after
    ``timeout_s`` with ``what`` in the message. Tests wait for states, never for fixed times."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def wait_for_capture(capture_dir: Path, request_ids: Any, timeout_s: float = 30.0) -> None:
    """Wait until the router's capture holds a record of every one of ``request_ids``."""
    from cifar_assets.serving.capture import read_capture

    wanted = set(request_ids)
    wait_until(
        lambda: wanted <= set(read_capture(capture_dir)["request_id"]),
        f"{len(wanted)} requests in the capture under {capture_dir}",
        timeout_s,
        interval_s=0.25,
    )
