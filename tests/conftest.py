"""Shared fixtures: every test runs against its own temporary state (var dir, DAGSTER_HOME,
MLflow store), never the developer's ``var/``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent


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
