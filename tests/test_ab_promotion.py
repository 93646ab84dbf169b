"""An A/B test end to end on a real tritonserver and a real MLflow store: traffic through the
router, feedback, the ab_test_report asset's decision, and the promotion that applies it to the
registry aliases, Triton's live versions and the router's weights together."""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from mlflow import MlflowClient

from cifar_assets.artifacts import TritonDeployment
from cifar_assets.assets.monitoring_assets import ABTestConfig, ab_test_report
from cifar_assets.ml import registry
from cifar_assets.ml.model import Architecture, build_resnet18, save_model
from cifar_assets.ml.tracking import tracking_run
from cifar_assets.resources import MLflowResource, TritonResource
from cifar_assets.serving import repository
from cifar_assets.serving.capture import record_feedback
from cifar_assets.serving.client import infer_ab
from cifar_assets.serving.promotion import apply_ab_decision, read_audit
from tests.serving_fixtures import (  # noqa: F401
    ServingEnv,
    onnx_models_fixture,
    triton_server_fixture,
)


def register_versions(uri: str, tmp_path: Path) -> None:
    """Versions 1 and 2 in the registry (1 champion), matching Triton's versions 1 and 2."""
    arch = Architecture(stem="imagenet")
    for version in (1, 2):
        model_dir = save_model(build_resnet18(arch), arch, tmp_path / f"m{version}").parent
        with tracking_run(uri, "ab-test", f"train-{version}", {}) as run_id:
            pass
        registry.register(uri, run_id, model_dir, {"accuracy": 0.5}, "data-v1")
    registry.promote(uri, 1, "first model")


def test_ab_report_decides_and_promotion_applies_everywhere(
    triton_server: ServingEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    var = triton_server.state_dir.parent
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for key, value in {
        "CIFAR_VAR_DIR": str(var),
        "CIFAR_CAPTURE_DIR": str(triton_server.capture_dir),
        "TRITON_MODEL_REPOSITORY": str(triton_server.repo),
        "TRITON_HTTP_PORT": str(triton_server.config.http_port),
        "TRITON_GRPC_PORT": str(triton_server.config.grpc_port),
        "TRITON_METRICS_PORT": str(triton_server.config.metrics_port),
        "MLFLOW_TRACKING_URI": uri,
    }.items():
        monkeypatch.setenv(key, value)
    register_versions(uri, tmp_path)
    state = triton_server.state_dir
    repository.set_live_versions(
        triton_server.http_url, [1, 2], repo=triton_server.repo, state_dir=state
    )
    repository.set_ab_weights({1: 0.5, 2: 0.5}, state_dir=state)
    try:
        # Feedback plants a real difference: version 2 is always right, version 1 never.
        images = np.random.default_rng(3).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
        served = [
            infer_ab(images, user_id=f"ab-user-{i}", url=triton_server.http_url) for i in range(240)
        ]
        time.sleep(2.5)  # the router flushes its capture at least once a second
        for result in served:
            predicted = int(np.argmax(result.logits[0]))
            label = predicted if result.served_version == 2 else (predicted + 1) % 10
            record_feedback(triton_server.capture_dir, result.request_id, label)

        deployment = TritonDeployment("cifar10_resnet18", 2, [1, 2], "", "")
        output = ab_test_report(
            context=dg.build_asset_context(),
            config=ABTestConfig(),
            triton=TritonResource(),
            mlflow=MLflowResource(tracking_uri=uri),
            triton_deployment=deployment,
        )
        summary = output.value
        assert (summary.control, summary.treatment) == (1, 2)  # 50/50: the older is control
        assert summary.decision == "promote", summary.reason
        assert output.metadata["srm_p_value"].value > 0.001
        # The report is an MLflow run too: per-version figures and the picture.
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("monitoring/cifar10-resnet18")
        assert experiment is not None
        (ab_run,) = client.search_runs([experiment.experiment_id], "tags.kind = 'ab_test'")
        assert ab_run.data.tags["decision"] == "promote"
        assert ab_run.data.metrics["v2_accuracy"] == 1.0 and ab_run.data.metrics["v1_accuracy"] == 0
        logged = {artifact.path for artifact in client.list_artifacts(ab_run.info.run_id)}
        assert logged == {"ab_report.json", "ab_results.png"}

        record = apply_ab_decision(
            summary.decision,  # type: ignore[arg-type]
            control=summary.control,
            treatment=summary.treatment,
            reason=summary.reason,
            tracking_uri=uri,
            model_name="cifar10-resnet18",
            triton_url=triton_server.http_url,
            repo=triton_server.repo,
            state_dir=state,
        )
        champion = registry.get_champion(uri)
        assert champion is not None
        assert champion.version == record.champion_after == 2
        assert record.champion_before == 1
        assert repository.read_live_versions(state) == [2] == record.live_versions
        assert repository.read_ab_weights(state) == {2: 1.0}
        assert read_audit(state)[-1]["action"] == summary.decision
        assert infer_ab(images, "after-promotion", url=triton_server.http_url).served_version == 2
    finally:
        repository.set_live_versions(
            triton_server.http_url, [1, 2], repo=triton_server.repo, state_dir=state
        )
        repository.set_ab_weights({1: 0.9, 2: 0.1}, state_dir=state)
