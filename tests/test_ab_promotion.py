"""An A/B test end to end on a real tritonserver and a real MLflow store: traffic through the
router, feedback, the ab_test_report asset's decision, and the rollout's promotion that applies it
to the registry aliases, Triton's live versions and the router's weights together."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from mlflow import MlflowClient
from pydantic import ValidationError

from cifar_assets.artifacts import OnnxModel, RegisteredModel, TritonDeployment
from cifar_assets.assets.monitoring_assets import ABTestConfig, ab_test_report
from cifar_assets.assets.serving_assets import (
    DeploymentConfig,
    serving_follows_registry,
    triton_deployment,
)
from cifar_assets.data.splits import stratified_split
from cifar_assets.data.synthetic import generate_synthetic
from cifar_assets.ml.model import Architecture, build_resnet18, save_model
from cifar_assets.ml.registry import Registry
from cifar_assets.ml.tracking import tracking_run
from cifar_assets.resources import MLflowResource, TritonResource
from cifar_assets.serving import repository
from cifar_assets.serving.capture import record_feedback
from cifar_assets.serving.client import infer, infer_ab
from cifar_assets.serving.rollout import Rollout
from tests.conftest import wait_for_capture
from tests.serving_fixtures import ServingEnv


def register_versions(uri: str, tmp_path: Path) -> None:
    """Versions 1 and 2 in the registry without aliases, as the pipeline registers them (the
    rollout gives the alias once Triton serves the version)."""
    arch = Architecture(stem="imagenet")
    for version in (1, 2):
        model_dir = save_model(build_resnet18(arch), arch, tmp_path / f"m{version}").parent
        with tracking_run(uri, "ab-test", f"train-{version}", {}) as run_id:
            pass
        Registry(uri).register(run_id, model_dir, {"accuracy": 0.5}, "data-v1", alias=None)


def rollout_for_test(env: ServingEnv, uri: str) -> Rollout:
    return Rollout(
        models=Registry(uri, "cifar10-resnet18"),
        triton=env.http_url,
        repo=env.repo,
        state_dir=env.state_dir,
    )


def checked() -> dict[str, float]:
    return {"max_abs_diff_vs_onnxruntime": 0.0}


def point_settings_at(env: ServingEnv, uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """TritonResource() and MLflowResource() find this test server and store."""
    for key, value in {
        "CIFAR_VAR_DIR": str(env.state_dir.parent),
        "CIFAR_CAPTURE_DIR": str(env.capture_dir),
        "TRITON_MODEL_REPOSITORY": str(env.repo),
        "TRITON_HTTP_PORT": str(env.config.http_port),
        "TRITON_GRPC_PORT": str(env.config.grpc_port),
        "TRITON_METRICS_PORT": str(env.config.metrics_port),
        "MLFLOW_TRACKING_URI": uri,
    }.items():
        monkeypatch.setenv(key, value)


def test_ab_report_decides_and_promotion_applies_everywhere(
    triton_server: ServingEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    point_settings_at(triton_server, uri, monkeypatch)
    register_versions(uri, tmp_path)
    state = triton_server.state_dir
    rollout = rollout_for_test(triton_server, uri)
    rollout.deploy(1, "champion", checked, reason="first model", actor="test")
    rollout.deploy(2, "challenger", checked, reason="retrained", actor="test", challenger_share=0.4)
    try:
        # Feedback plants a real difference: version 2 is always right, version 1 never.
        images = np.random.default_rng(3).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
        served = [
            infer_ab(images, user_id=f"ab-user-{i}", url=triton_server.http_url) for i in range(300)
        ]
        wait_for_capture(triton_server.capture_dir, [result.request_id for result in served])
        for result in served:
            predicted = int(np.argmax(result.logits[0]))
            label = predicted if result.served_version == 2 else (predicted + 1) % 10
            record_feedback(triton_server.capture_dir, result.request_id, label)

        deployment = TritonDeployment("cifar10_resnet18", 2, [1, 2], "", "")  # the input only
        output = ab_test_report(
            context=dg.build_asset_context(),
            config=ABTestConfig(),
            triton=TritonResource(),
            mlflow=MLflowResource(tracking_uri=uri),
            triton_deployment=deployment,
        )
        summary = output.value
        assert (summary.control, summary.treatment) == (1, 2)  # champion against challenger
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

        transition = rollout.promote(
            summary.treatment,
            reason=summary.reason,
            actor="test",
            evidence={"decision": summary.decision},
        )
        assert transition.before["champion"] == 1 and transition.after["champion"] == 2
        # The whole state moved: aliases, weights, live versions, what the server answers.
        assert Registry(uri).aliases() == {"champion": 2}
        assert repository.read_live_versions(state) == [2]
        assert repository.read_ab_weights(state) == {2: 1.0}
        assert rollout.check(server_ready=rollout.server_ready) == []
        assert rollout.journal()[-1]["action"] == "promote"
        assert rollout.journal()[-1]["evidence"] == {"decision": "promote"}
        assert infer_ab(images, "after-promotion", url=triton_server.http_url).served_version == 2
    finally:
        repository.set_live_versions(
            triton_server.http_url, [1, 2], repo=triton_server.repo, state_dir=state
        )
        repository.set_ab_weights({1: 0.9, 2: 0.1}, state_dir=state)
        (state / "rollout.json").unlink(missing_ok=True)
        (state / "rollout_journal.jsonl").unlink(missing_ok=True)


def test_use_int8_without_a_kept_int8_model_serves_fp32_and_says_so(
    triton_server: ServingEnv,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = triton_server
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    point_settings_at(env, uri, monkeypatch)
    splits = stratified_split(
        generate_synthetic(200, seed=4), validation_fraction=0.0, test_fraction=0.5, seed=0
    )
    why = "its top-1 agreement with FP32 is 0.9400 on 2000 images"
    register_versions(uri, tmp_path)
    arch = Architecture(stem="imagenet")
    with tracking_run(uri, "ab-test", "train-3", {}) as run_id:
        pass
    model_dir = save_model(build_resnet18(arch), arch, tmp_path / "m3").parent
    Registry(uri).register(run_id, model_dir, {"accuracy": 0.5}, "data-v1", alias=None)
    rollout_for_test(env, uri).deploy(1, "champion", checked, reason="first", actor="test")
    onnx_model = OnnxModel(
        fp32_path=str(env.onnx[1]),
        int8_path=None,
        registered_version=3,
        report={"int8_rejected_because": why},
    )
    registered = RegisteredModel(
        "cifar10-resnet18", 3, run_id, is_champion=False, decision_reason="kept champion"
    )
    state = env.state_dir
    context = dg.build_asset_context()
    context.log.addHandler(caplog.handler)  # the run log's records, as the UI would show them
    try:
        output = triton_deployment(
            context=context,
            config=DeploymentConfig(use_int8=True, check_images=16),
            mlflow=MLflowResource(tracking_uri=uri),
            triton=TritonResource(),
            registered_model=registered,
            onnx_model=onnx_model,
            cifar10_splits=splits,
        )
        metadata = output.metadata
        assert metadata["served_precision"].value == "fp32"
        assert metadata["served_file"].value == str(env.onnx[1])
        # Same file in the same runtime: at most rounding, within the relative limit.
        allowed = metadata["allowed_abs_diff"].value
        assert metadata["max_abs_diff_vs_onnxruntime"].value <= allowed
        assert allowed >= 1e-3
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any(
            f"use_int8 is set, but version 3 has no INT8 model ({why}); serving FP32" in message
            for message in warnings
        ), warnings
        version_info = json.loads(
            (env.repo / repository.MODEL_NAME / "3" / "version.json").read_text()
        )
        assert version_info["precision"] == "fp32"
        # The gate kept the champion: v3 is the challenger beside v1, in MLflow and in Triton.
        assert metadata["role"].value == "challenger"
        assert Registry(uri).aliases() == {"champion": 1, "challenger": 3}
        assert repository.read_ab_weights(state) == {1: 0.9, 3: 0.1}
        assert repository.read_live_versions(state) == [1, 3]
        assert infer(splits.test.images[:2], url=env.http_url, version=3).shape == (2, 10)
        check = serving_follows_registry(
            mlflow=MLflowResource(tracking_uri=uri), triton=TritonResource()
        )
        assert check.passed, check.description
    finally:
        # Back to versions 1 and 2: make 2 live, move the weights, then drop 3.
        live = repository.read_live_versions(state)
        repository.set_live_versions(
            env.http_url, sorted({*live, 1, 2}), repo=env.repo, state_dir=state
        )
        repository.set_ab_weights({1: 0.9, 2: 0.1}, state_dir=state)
        repository.set_live_versions(env.http_url, [1, 2], repo=env.repo, state_dir=state)
        shutil.rmtree(env.repo / repository.MODEL_NAME / "3", ignore_errors=True)


def test_deployment_limits_are_checked_with_the_config() -> None:
    # As ExportConfig's: the run's config is refused before the asset body touches Triton.
    for bad, field in (
        ({"max_rel_diff": -1e-4}, "max_rel_diff"),
        ({"check_images": 0}, "check_images"),
    ):
        with pytest.raises(ValidationError, match=field):
            DeploymentConfig(**bad)
