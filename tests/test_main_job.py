"""The main job with the quickstart config, end to end through `dagster job execute`: data to a
model served by a real Triton, which then answers a request."""

from __future__ import annotations

import subprocess
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT, subprocess_env
from tests.serving_fixtures import free_ports


@pytest.fixture
def serving_env(project_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    http, grpc, metrics = free_ports(3)
    env = project_env | {
        "TRITON_HTTP_PORT": str(http),
        "TRITON_GRPC_PORT": str(grpc),
        "TRITON_METRICS_PORT": str(metrics),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # a copy of the committed repository, so generated versions stay out of the checkout
    from tests.serving_fixtures import copy_repository

    copy_repository(Path(env["TRITON_MODEL_REPOSITORY"]))
    return env


def test_main_job_trains_registers_exports_and_serves(serving_env: dict[str, str]) -> None:
    from cifar_assets.ml import registry
    from cifar_assets.serving.client import infer
    from cifar_assets.serving.launcher import TritonConfig, stop_server
    from cifar_assets.settings import get_settings

    result = subprocess.run(
        [
            str(PROJECT_ROOT / "scripts" / "dagster"),
            "job",
            "execute",
            "-m",
            "cifar_assets.definitions",
            "-j",
            "main_job",
            "-c",
            str(PROJECT_ROOT / "configs" / "quickstart.yaml"),
        ],
        cwd=PROJECT_ROOT,
        env=subprocess_env(serving_env),
        capture_output=True,
        text=True,
        timeout=1500,
    )
    config = TritonConfig.from_settings()
    try:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        with dg.DagsterInstance.from_config(serving_env["DAGSTER_HOME"]) as instance:
            (run,) = instance.get_runs()
            assert run.status == dg.DagsterRunStatus.SUCCESS
            # Long steps report progress in the run log (final lines: the work was short).
            messages = [entry.user_message for entry in instance.all_logs(run.run_id)]
            assert any(m.startswith("features of ") and " images in " in m for m in messages)
            assert any(m.startswith("predictions: ") for m in messages)  # evaluation
            assert any(m.startswith("epoch 1/") for m in messages)  # training
            deployed = instance.get_latest_materialization_event(dg.AssetKey("triton_deployment"))
            assert deployed is not None and deployed.asset_materialization is not None
            metadata = deployed.asset_materialization.metadata
            version = metadata["version"].value
            assert metadata["live_versions"].value == [version]
            assert metadata["max_abs_diff_vs_onnxruntime"].value < 1e-3
            evaluation = instance.get_latest_materialization_event(dg.AssetKey("model_evaluation"))
            accuracy = evaluation.asset_materialization.metadata["accuracy"].value  # type: ignore[union-attr]
            assert accuracy > 0.2  # ten classes: chance is 0.1

        settings = get_settings()
        champion = registry.get_champion(settings.mlflow_tracking_uri)
        assert champion is not None and champion.version == version == 1

        images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
        logits = infer(images, url=config.http_url, version=version)
        assert logits.shape == (4, 10) and np.isfinite(logits).all()

        check_a_drifted_batch(serving_env)
    finally:
        stop_server(config)


def check_a_drifted_batch(env: dict[str, str]) -> None:
    """A heavily corrupted batch dropped into the incoming folder: its drift check (the assets
    the drift sensor launches) says drift, against the baseline the main job fitted."""
    from cifar_assets.data.corruptions import corrupt
    from cifar_assets.data.imageset import save_npz
    from cifar_assets.data.synthetic import generate_synthetic
    from cifar_assets.settings import get_settings

    batch = generate_synthetic(300, seed=99)
    save_npz(
        get_settings().incoming_dir / "noisy.npz",
        {"images": corrupt(batch.images, "gaussian_noise", 5), "labels": batch.labels},
    )
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        instance.add_dynamic_partitions("incoming_batches", ["noisy"])
    result = subprocess.run(
        [
            str(PROJECT_ROOT / "scripts" / "dagster"),
            "asset",
            "materialize",
            "-m",
            "cifar_assets.definitions",
            "--select",
            "incoming_batch,drift_report",
            "--partition",
            "noisy",
        ],
        cwd=PROJECT_ROOT,
        env=subprocess_env(env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        report = instance.get_latest_materialization_event(dg.AssetKey("drift_report"))
        assert report is not None and report.asset_materialization is not None
        metadata = report.asset_materialization.metadata
        assert report.asset_materialization.partition == "noisy"
        assert metadata["drift"].value is True
        assert metadata["labelled"].value is True
        assert metadata["score"].value > 0.95
        assert "drift_overview" in metadata and "mlflow_run" in metadata
        (run,) = instance.get_runs(limit=1)
        messages = [entry.user_message for entry in instance.all_logs(run.run_id)]
        assert any(m.startswith("MMD permutation test (300 images): 100/100") for m in messages)

    from mlflow import MlflowClient

    # The check is also an MLflow run, with its figures and pictures, beside the training runs.
    settings = get_settings()
    client = MlflowClient(settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("monitoring/" + settings.registered_model_name)
    assert experiment is not None
    (check,) = client.search_runs([experiment.experiment_id], "tags.batch = 'noisy'")
    assert check.data.metrics["drift"] == 1.0 and check.data.metrics["score"] > 0.95
    assert check.data.tags["kind"] == "drift_report"
    logged = {artifact.path for artifact in client.list_artifacts(check.info.run_id)}
    assert {"report.json", "drift_overview.png", "moved_features.png"} <= logged
