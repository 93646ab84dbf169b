"""Dagster resources: where asset values are stored, and the MLflow and Triton connections.

Values are stored in open formats only: image sets as ``.npz``, tables as Parquet, and the small
records of :mod:`cifar_assets.artifacts` as JSON. Nothing is pickled.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg

from cifar_assets.settings import get_settings

if TYPE_CHECKING:
    from cifar_assets.ml.registry import Registry
    from cifar_assets.serving.launcher import TritonConfig
    from cifar_assets.serving.rollout import Rollout
    from cifar_assets.storage import AssetStore


def stored_value_path(asset: str, partition: str | None = None) -> str:
    """Where the latest stored value of an asset (partition) lives: a path, or a URL when the
    store is remote. Its name is its content hash, so run config that hands it to another job
    (the retraining sensor's ``extra_batches``) pins that exact version."""
    from cifar_assets.storage import AssetStore

    store = AssetStore(get_settings().asset_store)
    return store.location(store.require_latest(asset, partition).object)


def _asset_name(context: dg.OutputContext | dg.InputContext) -> str:
    return "__".join(context.asset_key.path)


class LocalStorageIOManager(dg.ConfigurableIOManager):
    """Stores every materialization under its content hash (cifar_assets.storage), so none
    overwrites another; inputs load the latest materialization of their upstream.

    ``base_dir`` overrides the store root (a folder or an fsspec URL); by default it is the
    ``CIFAR_ASSET_STORE`` setting."""

    base_dir: str = ""

    def _store(self) -> AssetStore:
        from cifar_assets.storage import AssetStore

        return AssetStore(self.base_dir or get_settings().asset_store)

    @staticmethod
    def _partition(context: dg.OutputContext | dg.InputContext) -> str | None:
        return context.asset_partition_key if context.has_asset_partitions else None

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        code_version = context.asset_spec.code_version or ""
        try:
            record, is_new = self._store().put(
                _asset_name(context),
                obj,
                self._partition(context),
                run_id=context.run_id,
                code_version=code_version,
            )
        except TypeError as error:
            raise TypeError(f"Asset {context.asset_key.to_user_string()}: {error}") from error
        context.add_output_metadata(
            {
                "data_version": record.version,
                "stored_at": dg.MetadataValue.path(self._store().location(record.object)),
                "stored_bytes": record.bytes,
                "stored_new_object": is_new,
            }
        )

    def load_input(self, context: dg.InputContext) -> Any:
        store = self._store()
        record = store.require_latest(_asset_name(context), self._partition(context))
        context.log.info(
            f"{context.asset_key.to_user_string()}: loading data version {record.version} "
            f"({store.location(record.object)})"
        )
        return store.read(record)


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

    def registry(self) -> Registry:
        """The registered model, as one object (cifar_assets.ml.registry imports no mlflow)."""
        from cifar_assets.ml.registry import Registry

        return Registry(self.uri(), self.registered_model_name())

    def end_orphaned_runs(self, instance: dg.DagsterInstance, log: Any) -> dict[str, str]:
        """Mark FAILED, with the reason, every RUNNING MLflow run of the model's training or
        monitoring experiment whose Dagster run has ended (a step killed with SIGKILL cannot end
        its own run). Every sensor calls it at each tick and every run that writes MLflow runs
        at its start, so no MLflow run is left RUNNING, with or without the daemon."""
        from cifar_assets.ml import tracking

        def ended_status(run_id: str) -> str | None:
            run = instance.get_run_by_id(run_id)
            return run.status.value if run is not None and run.is_finished else None

        ended = tracking.end_runs_of_ended_dagster_runs(
            self.uri(),
            [self.experiment(), tracking.monitoring_experiment(self.registered_model_name())],
            ended_status,
        )
        for mlflow_run, reason in ended.items():
            log.warning(f"MLflow run {mlflow_run} marked FAILED: {reason}")
        return ended

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

    def server_config(self) -> TritonConfig:
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

    def ensure_running(self, log: Any) -> _RunningServer:
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
    def __init__(self, config: TritonConfig) -> None:
        self.config = config


def rollout_for(mlflow: MLflowResource, server_config: TritonConfig) -> Rollout:
    """The lifecycle owner (cifar_assets.serving.rollout.Rollout) for this registry and server."""
    from cifar_assets.serving.rollout import Rollout

    return Rollout(
        models=mlflow.registry(),
        triton=server_config.http_url,
        repo=server_config.repo,
        state_dir=server_config.state_dir,
    )
