"""Dagster resources: where asset values are stored, and the MLflow and Triton connections.

Values are stored in open formats only: image sets as ``.npz``, tables as Parquet, and the small
records of :mod:`cifar_assets.artifacts` as JSON. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import dagster as dg

from cifar_assets import artifacts
from cifar_assets.settings import get_settings


def stored_value_stem(root: Path, asset_path: list[str], partition: str | None) -> Path:
    """Where an asset's value lives, less its suffix: ``root/<asset key>/[<partition>/]value``."""
    path = root.joinpath(*asset_path)
    return (path / partition if partition else path) / "value"


def stored_value_path(asset: str, partition: str | None = None) -> Path:
    """The stored file of an ImageSet asset (e.g. an ``incoming_batch`` partition), for run
    config that hands it to another job."""
    stem = stored_value_stem(get_settings().storage_dir, [asset], partition)
    return stem.with_suffix(".imageset.npz")


class LocalStorageIOManager(dg.ConfigurableIOManager):
    """Stores each asset (and partition) under ``base_dir/<asset key>/``."""

    base_dir: str = ""

    def _root(self) -> Path:
        return Path(self.base_dir) if self.base_dir else get_settings().storage_dir

    def _stem(self, context: dg.OutputContext | dg.InputContext) -> Path:
        partition = context.asset_partition_key if context.has_asset_partitions else None
        return stored_value_stem(self._root(), list(context.asset_key.path), partition)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        from cifar_assets.data import imageset

        stem = self._stem(context)
        stem.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(obj, imageset.Splits):
            imageset.save_splits(stem.with_suffix(".splits.npz"), obj)
        elif isinstance(obj, imageset.RawData):
            imageset.save_raw(stem.with_suffix(".raw.npz"), obj)
        elif isinstance(obj, imageset.ImageSet):
            imageset.save_imageset(stem.with_suffix(".imageset.npz"), obj)
        elif type(obj).__name__ == "DataFrame":
            tmp = stem.with_suffix(".tmp.parquet")
            obj.to_parquet(tmp, index=False)
            tmp.replace(stem.with_suffix(".parquet"))
        elif (
            dataclasses.is_dataclass(obj)
            and not isinstance(obj, type)
            and type(obj).__name__ in artifacts.ARTIFACT_TYPES
        ):
            payload = {"type": type(obj).__name__, "value": dataclasses.asdict(obj)}
            tmp = stem.with_suffix(".tmp.json")
            tmp.write_text(json.dumps(payload, indent=2, default=str))
            tmp.replace(stem.with_suffix(".json"))
        else:
            raise TypeError(
                f"Asset {context.asset_key.to_user_string()} returned a {type(obj).__name__}, "
                "which this IO manager cannot store; return an ImageSet, Splits, RawData, a "
                "pandas DataFrame or a record from cifar_assets.artifacts."
            )

    def load_input(self, context: dg.InputContext) -> Any:
        from cifar_assets.data import imageset

        stem = self._stem(context)
        candidates = sorted(stem.parent.glob(stem.name + ".*"))
        candidates = [c for c in candidates if ".tmp." not in c.name]
        if not candidates:
            raise FileNotFoundError(
                f"No stored value for asset {context.asset_key.to_user_string()} under "
                f"{stem.parent}. Materialize it first (e.g. from the Dagster UI or with "
                "`dagster job execute`)."
            )
        path = candidates[0]
        if path.name.endswith(".splits.npz"):
            return imageset.load_splits(path)
        if path.name.endswith(".raw.npz"):
            return imageset.load_raw(path)
        if path.name.endswith(".imageset.npz"):
            return imageset.load_imageset(path)
        if path.suffix == ".parquet":
            import pandas as pd

            return pd.read_parquet(path)
        payload = json.loads(path.read_text())
        return artifacts.ARTIFACT_TYPES[payload["type"]](**payload["value"])


class MLflowResource(dg.ConfigurableResource):
    """Where MLflow runs and the model registry live (defaults from the environment)."""

    tracking_uri: str = ""
    experiment_name: str = ""
    model_name: str = ""

    def uri(self) -> str:
        return self.tracking_uri or get_settings().mlflow_tracking_uri

    def experiment(self) -> str:
        return self.experiment_name or get_settings().mlflow_experiment_name

    def registered_model_name(self) -> str:
        return self.model_name or get_settings().registered_model_name

    def artifact_location(self) -> str | None:
        if self.uri().startswith("sqlite:"):
            return get_settings().mlflow_artifact_root.as_uri()
        return None


class TritonResource(dg.ConfigurableResource):
    """The Triton server the deployment asset talks to; a local one is started on demand and
    keeps running after the step (it lives in its own session)."""

    host: str = ""
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    model_repository: str = ""
    start_if_down: bool = True

    def server_config(self) -> Any:
        from cifar_assets.serving.launcher import TritonConfig

        overrides: dict[str, Any] = {
            key: value
            for key, value in {
                "host": self.host,
                "http_port": self.http_port,
                "grpc_port": self.grpc_port,
                "metrics_port": self.metrics_port,
            }.items()
            if value
        }
        if self.model_repository:
            overrides["repo"] = Path(self.model_repository)
        return TritonConfig.from_settings(**overrides)

    def ensure_running(self, log: Any) -> Any:
        """A running server for this config, started here when it is down and allowed to."""
        from cifar_assets.serving.launcher import TritonServer, server_status

        config = self.server_config()
        status = server_status(config)
        deadline = time.monotonic() + 60
        while status.running and not status.ready and time.monotonic() < deadline:
            # Running but slow to answer its health check (a busy machine): wait, never start
            # a second server on the same state folder.
            time.sleep(1)
            status = server_status(config)
        if status.running and not status.ready:
            raise dg.Failure(
                f"tritonserver pid {status.pid} runs for {config.state_dir} but has not answered "
                f"its health check on {status.http_url} for 60 s; see {config.log_path}, or "
                "restart it with `cifar-triton stop` and `cifar-triton start`."
            )
        if not status.ready:
            if not self.start_if_down:
                raise dg.Failure(
                    f"Triton is not ready at {config.http_url}; start it with `cifar-triton "
                    "start`, or set start_if_down on the triton resource."
                )
            log.info(f"Starting tritonserver on {config.http_url} (log: {config.log_path})")
            TritonServer(config).start()
        return _RunningServer(config)


class _RunningServer:
    def __init__(self, config: Any) -> None:
        self.config = config


def rollout_for(mlflow: MLflowResource, server_config: Any) -> Any:
    """The lifecycle owner (cifar_assets.serving.rollout.Rollout) for this registry and server."""
    from cifar_assets.serving.rollout import Rollout

    return Rollout(
        tracking_uri=mlflow.uri(),
        model_name=mlflow.registered_model_name(),
        triton=server_config.http_url,
        repo=server_config.repo,
        state_dir=server_config.state_dir,
    )
