"""Where the app finds the platform: the project's settings, plus the two UI links.

The links are read here because only the app shows them: ``CIFAR_DAGSTER_URL`` (default
``http://127.0.0.1:3000``, where ``dagster dev`` serves) and ``CIFAR_MLFLOW_UI_URL`` (default:
the tracking server itself for an http(s) tracking URI, else ``mlflow ui``'s local address).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cifar_assets.settings import Settings, get_settings

DEFAULT_DAGSTER_URL = "http://127.0.0.1:3000"


@dataclass(frozen=True)
class AppConfig:
    triton_url: str  # host:port of Triton's HTTP API
    capture_dir: Path  # the router's capture, where feedback goes
    storage_dir: Path  # asset files: ab_test_report/, drift_report/<batch>/
    state_dir: Path  # Triton's state: live versions, router weights, rollout journal
    triton_repo: Path
    tracking_uri: str
    model_name: str
    dagster_url: str
    mlflow_ui_url: str


def app_config(settings: Settings | None = None) -> AppConfig:
    from cifar_assets.ml.tracking import ui_base_url
    from cifar_assets.serving.launcher import TritonConfig

    settings = settings or get_settings()
    triton = TritonConfig.from_settings(settings)
    return AppConfig(
        triton_url=triton.http_url,
        capture_dir=triton.capture_dir,
        storage_dir=settings.storage_dir,
        state_dir=triton.state_dir,
        triton_repo=triton.repo,
        tracking_uri=settings.mlflow_tracking_uri,
        model_name=settings.registered_model_name,
        dagster_url=os.environ.get("CIFAR_DAGSTER_URL") or DEFAULT_DAGSTER_URL,
        mlflow_ui_url=os.environ.get("CIFAR_MLFLOW_UI_URL")
        or ui_base_url(settings.mlflow_tracking_uri),
    )
