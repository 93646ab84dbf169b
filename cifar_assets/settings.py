"""Every path, URI and port the project uses, read from the environment in one place.

Defaults keep all state under ``var/`` in the repository root, so a fresh clone runs with no
configuration; each value can be overridden by the environment variable named beside it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    var_dir: Path  # CIFAR_VAR_DIR: root of all local state
    data_dir: Path  # CIFAR_DATA_DIR: downloaded data sets (cifar-10-python.tar.gz goes here)
    storage_dir: Path  # CIFAR_STORAGE_DIR: asset files (weights, ONNX, reports, baselines)
    # CIFAR_ASSET_STORE: the versioned asset values (cifar_assets.storage): a folder or an
    # fsspec URL such as s3://bucket/prefix; by default <storage_dir>/assets
    asset_store: str
    incoming_dir: Path  # CIFAR_INCOMING_DIR: production batches dropped for drift checks
    capture_dir: Path  # CIFAR_CAPTURE_DIR: traffic captured by the A/B router
    retraining_config: Path  # CIFAR_RETRAINING_CONFIG: base run config of drift retraining
    dagster_home: Path  # DAGSTER_HOME
    mlflow_tracking_uri: str  # MLFLOW_TRACKING_URI
    mlflow_experiment_name: str  # MLFLOW_EXPERIMENT_NAME
    registered_model_name: str  # CIFAR_MODEL_NAME
    triton_repo: Path  # TRITON_MODEL_REPOSITORY
    triton_host: str  # TRITON_HOST
    triton_http_port: int  # TRITON_HTTP_PORT
    triton_grpc_port: int  # TRITON_GRPC_PORT
    triton_metrics_port: int  # TRITON_METRICS_PORT
    # CIFAR_TRITON_CONTROL_KEY: the key for Triton's model-control APIs; unset, the server's
    # state folder keeps one in control.key (mode 0600). Never shown in a repr.
    triton_control_key: str | None = field(repr=False)
    prometheus_port: int  # PROMETHEUS_PORT
    app_port: int  # CIFAR_APP_PORT: the prediction and feedback app (cifar-app)
    log_level: str  # LOG_LEVEL

    def asset_files(self, asset: str, *parts: str) -> Path:
        """The local folder of the files an asset writes beside its stored value: weights, ONNX
        models, detectors, pictures. Its value goes to the versioned store (``asset_store``, which
        may be remote); these stay local because Triton, ONNX Runtime and the Dagster UI read
        them as files. One folder per asset, then per run or partition."""
        return self.storage_dir.joinpath(asset, *parts)

    @property
    def mlflow_artifact_root(self) -> Path:
        return self.var_dir / "mlflow" / "artifacts"

    @property
    def triton_http_url(self) -> str:
        return f"{self.triton_host}:{self.triton_http_port}"

    @property
    def triton_grpc_url(self) -> str:
        return f"{self.triton_host}:{self.triton_grpc_port}"


def _path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


def _store(name: str, default: Path) -> str:
    """A folder (made absolute) or a URL with a scheme (kept as given)."""
    value = os.environ.get(name, "")
    if "://" in value:
        return value
    return str(_path(name, default))


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(
            f"Environment variable {name}={value!r} is not an integer; set it to a number such "
            f"as {default}, or unset it to use the default."
        ) from exc


def get_settings() -> Settings:
    """Read the environment now (tests change it between calls, so nothing is cached)."""
    var = _path("CIFAR_VAR_DIR", PROJECT_ROOT / "var")
    storage_dir = _path("CIFAR_STORAGE_DIR", var / "storage")
    return Settings(
        var_dir=var,
        data_dir=_path("CIFAR_DATA_DIR", var / "data"),
        storage_dir=storage_dir,
        asset_store=_store("CIFAR_ASSET_STORE", storage_dir / "assets"),
        incoming_dir=_path("CIFAR_INCOMING_DIR", var / "incoming"),
        capture_dir=_path("CIFAR_CAPTURE_DIR", var / "capture"),
        retraining_config=_path(
            "CIFAR_RETRAINING_CONFIG", PROJECT_ROOT / "configs" / "retraining.yaml"
        ),
        dagster_home=_path("DAGSTER_HOME", var / "dagster_home"),
        mlflow_tracking_uri=os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{var / 'mlflow' / 'mlflow.db'}",
        mlflow_experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "cifar10-resnet18"),
        registered_model_name=os.environ.get("CIFAR_MODEL_NAME", "cifar10-resnet18"),
        triton_repo=_path("TRITON_MODEL_REPOSITORY", PROJECT_ROOT / "triton_repo"),
        triton_host=os.environ.get("TRITON_HOST", "127.0.0.1"),
        triton_http_port=_int("TRITON_HTTP_PORT", 8000),
        triton_grpc_port=_int("TRITON_GRPC_PORT", 8001),
        triton_metrics_port=_int("TRITON_METRICS_PORT", 8002),
        triton_control_key=os.environ.get("CIFAR_TRITON_CONTROL_KEY") or None,
        prometheus_port=_int("PROMETHEUS_PORT", 8003),
        app_port=_int("CIFAR_APP_PORT", 8501),
        log_level=os.environ.get("LOG_LEVEL", "INFO").upper(),
    )
