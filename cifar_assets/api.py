"""Plain Python API for notebooks: the registry, ONNX export, quantization and benchmarks.

The same library code the Dagster assets call, with the tracking URI and model name taken from
cifar_assets.settings (environment variables), so no Dagster is needed::

    from cifar_assets import api

    with api.start_run("notebook-experiment", tags={"author": "me"}) as run_id:
        model = ...  # train, then cifar_assets.ml.model.save_model(model, arch, model_dir)
        version = api.register(run_id, model_dir, {"accuracy": 0.91}, data_version="abc123")
    print(api.gate(version.version, metric="accuracy", margin=0.005))
    print(api.list_versions())
    champion = api.load("champion")  # torch.nn.Module in eval mode
    api.export_onnx(champion, Path("champion.onnx"))
    api.rollback("accuracy dropped in production")
    splits = api.training_data(champion_version)  # the exact data a version was trained on
    api.diff_data("cifar10_splits", old_data_version, new_data_version)

Every function takes ``tracking_uri`` and ``name`` keyword arguments to override the settings.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cifar_assets.ml import tracking
from cifar_assets.ml.registry import (
    CHAMPION,
    AliasMove,
    ModelVersionInfo,
    PromotionDecision,
    Registry,
)
from cifar_assets.ml.registry import list_models as registry_list_models
from cifar_assets.settings import get_settings

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch

    from cifar_assets.data.imageset import Splits
    from cifar_assets.storage import AssetStore, PartDiff, StoredVersion


def _uri(tracking_uri: str | None) -> str:
    return tracking_uri or get_settings().mlflow_tracking_uri


def _registry(name: str | None, tracking_uri: str | None) -> Registry:
    return Registry.from_settings(tracking_uri, name)


@contextmanager
def start_run(
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    experiment_name: str | None = None,
    tracking_uri: str | None = None,
) -> Iterator[str]:
    """An MLflow run (yields its id) in the project's experiment; always ended, never RUNNING."""
    settings = get_settings()
    uri = _uri(tracking_uri)
    experiment = experiment_name or settings.mlflow_experiment_name
    location = tracking.default_artifact_location(uri, experiment, settings.mlflow_artifact_root)
    with tracking.tracking_run(uri, experiment, run_name, tags or {}, location) as run_id:
        yield run_id


def register(
    run_id: str,
    model_dir: Path,
    metrics: Mapping[str, float],
    data_version: str,
    description: str = "",
    tags: Mapping[str, str] | None = None,
    *,
    name: str | None = None,
    tracking_uri: str | None = None,
) -> ModelVersionInfo:
    """Register the model saved in ``model_dir`` as a new version (alias ``challenger``)."""
    models = _registry(name, tracking_uri)
    return models.register(run_id, model_dir, metrics, data_version, description, tags)


def gate(
    version: int,
    metric: str = "accuracy",
    margin: float = 0.0,
    *,
    name: str | None = None,
    tracking_uri: str | None = None,
) -> PromotionDecision:
    """Promote ``version`` if it beats the champion on ``metric`` by more than ``margin``."""
    return _registry(name, tracking_uri).gate(version, metric, margin)


def promote(
    version: int, reason: str, *, name: str | None = None, tracking_uri: str | None = None
) -> ModelVersionInfo:
    """Make ``version`` the champion by hand; ``reason`` goes to the alias history."""
    return _registry(name, tracking_uri).promote(version, reason)


def rollback(
    reason: str, *, name: str | None = None, tracking_uri: str | None = None
) -> ModelVersionInfo:
    """Move ``champion`` back to the previous champion."""
    return _registry(name, tracking_uri).rollback(reason)


def load(
    alias: str = CHAMPION,
    version: int | None = None,
    *,
    name: str | None = None,
    tracking_uri: str | None = None,
) -> torch.nn.Module:
    """The network behind ``alias``, or behind ``version`` when given (eval mode)."""
    models = _registry(name, tracking_uri)
    return models.load(version) if version is not None else models.load_alias(alias)


def load_pyfunc(
    alias: str = CHAMPION, *, name: str | None = None, tracking_uri: str | None = None
) -> Any:
    """The MLflow pyfunc model behind ``alias``: ``predict(uint8 (N,32,32,3)) -> logits``."""
    return _registry(name, tracking_uri).load_pyfunc(alias)


def champion(
    *, name: str | None = None, tracking_uri: str | None = None
) -> ModelVersionInfo | None:
    return _registry(name, tracking_uri).champion()


def compare(
    version_a: int, version_b: int, *, name: str | None = None, tracking_uri: str | None = None
) -> pd.DataFrame:
    """Metrics of two versions side by side, with ``difference`` = b - a."""
    return _registry(name, tracking_uri).compare(version_a, version_b)


def list_models(*, tracking_uri: str | None = None) -> pd.DataFrame:
    return registry_list_models(_uri(tracking_uri))


def list_versions(*, name: str | None = None, tracking_uri: str | None = None) -> pd.DataFrame:
    return _registry(name, tracking_uri).versions()


def history(*, name: str | None = None, tracking_uri: str | None = None) -> list[AliasMove]:
    """Every alias move, oldest first (``Registry.history_frame`` gives it as a table)."""
    return _registry(name, tracking_uri).history()


def champion_at(
    when: datetime, *, name: str | None = None, tracking_uri: str | None = None
) -> int | None:
    """The version that was champion at ``when`` (timezone-aware)."""
    return _registry(name, tracking_uri).champion_at(when)


def export_onnx(model: torch.nn.Module, path: Path, opset: int = 18) -> Path:
    """Export the network to ONNX (normalised float NCHW input, logits output)."""
    from cifar_assets.ml.onnx_export import export_onnx as export

    return export(model, path, opset=opset)


def quantize(fp32_path: Path, int8_path: Path, calibration_images: np.ndarray) -> Path:
    """Static INT8 quantization of an FP32 ONNX file, calibrated on uint8 images."""
    from cifar_assets.ml.quantization import quantize_int8

    return quantize_int8(fp32_path, int8_path, calibration_images)


def benchmark(
    path: Path,
    batch_size: int = 64,
    n_batches: int = 20,
    warmup: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """Throughput and latency of an ONNX file under ONNX Runtime."""
    from cifar_assets.ml.inference_bench import benchmark_onnx

    return benchmark_onnx(path, batch_size, n_batches, warmup, threads=threads)


def _store(store: str | None) -> AssetStore:
    from cifar_assets.storage import AssetStore

    return AssetStore(store or get_settings().asset_store)


def asset_versions(
    asset: str, *, partition: str | None = None, store: str | None = None
) -> list[StoredVersion]:
    """Every stored materialization of ``asset`` (partition), oldest first: data version, file,
    Dagster run and code version of each."""
    return _store(store).history(asset, partition)


def load_asset(
    asset: str,
    version: str | None = None,
    *,
    partition: str | None = None,
    store: str | None = None,
) -> Any:
    """The stored value of ``asset``: its ``version`` (a data version, or a unique prefix of
    one, as the Dagster UI shows it), else its latest materialization."""
    return _store(store).load(asset, version, partition)


def training_data(
    model_version: int,
    *,
    name: str | None = None,
    tracking_uri: str | None = None,
    store: str | None = None,
) -> Splits:
    """The exact train / validation / test splits registered ``model_version`` was trained on,
    read back from the asset store by the data version its training run recorded."""
    from cifar_assets.ml.lineage import SPLITS_ASSET, training_splits_version

    version = training_splits_version(_registry(name, tracking_uri), model_version)
    splits: Splits = _store(store).load(SPLITS_ASSET, version)
    return splits


def diff_data(
    asset: str,
    version_a: str,
    version_b: str,
    *,
    partition: str | None = None,
    store: str | None = None,
) -> list[PartDiff]:
    """How two stored versions of an image asset differ, per split (or pool, or batch): image and
    class counts before and after, and the image ids added and removed."""
    from cifar_assets.storage import diff

    assets = _store(store)
    return diff(assets.load(asset, version_a, partition), assets.load(asset, version_b, partition))
