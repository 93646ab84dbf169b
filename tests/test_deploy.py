"""The container and Kubernetes configs, validated by what runs on a machine without a container
runtime or a cluster: ``docker-compose config`` (Debian's docker-compose), YAML parsing, and
Dagster's own config schemas (instance, workspace, job run config, k8s executor)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from tests.conftest import PROJECT_ROOT

DEPLOY = PROJECT_ROOT / "deploy"
SECRETS = {
    "CIFAR_PG_PASSWORD": "compose-test-password",
    "CIFAR_TRITON_CONTROL_KEY": "compose-test-key",
    "GRAFANA_ADMIN_PASSWORD": "compose-test-admin",
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS} | env
    return subprocess.run(
        ["docker-compose", "-f", str(PROJECT_ROOT / "docker-compose.yaml"), "config"],
        cwd=PROJECT_ROOT,
        env=clean,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="needs docker-compose")
def test_compose_file_is_valid_and_keeps_secrets_out() -> None:
    result = compose_config(SECRETS)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == {
        "postgres",
        "mlflow",
        "code_location",
        "webserver",
        "daemon",
        "triton",
        "metrics",
        "prometheus",
        "grafana",
        "app",
    }
    # every published port on loopback only
    for name, service in services.items():
        for port in service.get("ports", []):
            published = port if isinstance(port, str) else f"{port.get('host_ip')}:{port}"
            assert str(published).startswith("127.0.0.1"), (name, port)
    triton = " ".join(services["triton"]["command"])
    assert "--model-control-mode=explicit" in triton
    assert "--http-restricted-api=model-repository" in triton
    assert "--serve-artifacts" in services["mlflow"]["command"]
    # the secrets come from the environment: none is written in the file
    text = (PROJECT_ROOT / "docker-compose.yaml").read_text()
    assert not any(value in text for value in SECRETS.values())
    # and compose refuses to start without them
    missing = compose_config({k: v for k, v in SECRETS.items() if k != "CIFAR_PG_PASSWORD"})
    assert missing.returncode != 0 and "CIFAR_PG_PASSWORD" in missing.stderr


def test_compose_mounts_exist() -> None:
    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yaml").read_text())
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and "var/" not in source:
                assert (PROJECT_ROOT / source).exists(), (name, source)
    dashboard = PROJECT_ROOT / "configs" / "monitoring" / "grafana" / "datasources.yml"
    assert documents(dashboard)[0]["datasources"][0]["type"] == "prometheus"


def test_dockerfile_runs_the_code_server_as_a_user() -> None:
    lines = (PROJECT_ROOT / "Dockerfile").read_text().splitlines()
    assert next(line for line in lines if line.startswith("FROM")).startswith("FROM python:3.11")
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    assert any("code-server" in line for line in lines)
    ignored = (PROJECT_ROOT / ".dockerignore").read_text().split()
    assert {".venv", "var", ".git"} <= set(ignored)


def test_kubernetes_manifests_parse_and_lock_model_control() -> None:
    kinds = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for document in documents(path):
            if "kind" in document:
                assert document["apiVersion"] and document["metadata"]["name"], path
                kinds[(document["kind"], document["metadata"]["name"])] = document
    assert set(kinds) >= {
        ("Deployment", "triton"),
        ("Service", "triton"),
        ("Deployment", "mlflow"),
        ("Service", "mlflow"),
    }
    (triton,) = kinds[("Deployment", "triton")]["spec"]["template"]["spec"]["containers"]
    args = " ".join(triton["args"])
    assert "--model-repository=s3://" in args and "--model-control-mode=explicit" in args
    assert "cifar-control-key=$(CIFAR_TRITON_CONTROL_KEY)" in args
    (mlflow,) = kinds[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"]
    assert "--serve-artifacts" in mlflow["command"]
    assert {"name": "MLFLOW_BACKEND_STORE_URI"}.items() <= mlflow["env"][0].items()


def test_helm_values_use_the_k8s_run_launcher_and_postgres() -> None:
    (values,) = documents(DEPLOY / "helm" / "dagster-values.yaml")
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["enabled"] is True
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["type"] == "QueuedRunCoordinator"
    # the same concurrency limits as the one-machine stack
    stack = yaml.safe_load((PROJECT_ROOT / "configs" / "stack" / "dagster.yaml").read_text())
    limits = stack["run_coordinator"]["config"]["tag_concurrency_limits"]
    helm_limits = coordinator["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"]
    assert [(x["key"], x.get("value")) for x in helm_limits] == [
        (x["key"], x.get("value")) for x in limits
    ]
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "cifar_assets.definitions"]


def test_stack_instance_and_workspace_pass_dagsters_schemas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster._core.workspace.config_schema import WORKSPACE_CONFIG_SCHEMA

    for key, value in {
        "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_PORT": "5432",
        "DAGSTER_PG_USERNAME": "cifar",
        "DAGSTER_PG_PASSWORD": "unused",
        "DAGSTER_PG_DB": "dagster",
        "DAGSTER_CODE_SERVER_HOST": "127.0.0.1",
        "DAGSTER_CODE_SERVER_PORT": "4000",
    }.items():
        monkeypatch.setenv(key, value)
    shutil.copy(PROJECT_ROOT / "configs" / "stack" / "dagster.yaml", tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    from dagster._core.run_coordinator import QueuedRunCoordinator

    coordinator = process_config(
        QueuedRunCoordinator.config_type(), config["run_coordinator"]["config"]
    )
    assert coordinator.success, coordinator.errors
    workspace = yaml.safe_load((PROJECT_ROOT / "configs" / "stack" / "workspace.yaml").read_text())
    checked = process_config(WORKSPACE_CONFIG_SCHEMA, workspace)
    assert checked.success, checked.errors


def test_gpu_training_run_config_fits_main_job_and_the_k8s_executor() -> None:
    from cifar_assets.definitions import defs

    run_config = yaml.safe_load((DEPLOY / "k8s" / "run-config-gpu-training.yaml").read_text())
    job = defs.resolve_job_def("main_job")
    dg.validate_run_config(job, {"ops": run_config["ops"]})
    per_step = run_config["execution"]["config"]["per_step_k8s_config"]
    assert per_step["trained_model"]["container_config"]["resources"]["limits"] == {
        "nvidia.com/gpu": 1
    }
    assert "trained_model" in {node.name for node in job.nodes_in_topological_order}
    k8s = pytest.importorskip("dagster_k8s", reason="dagster-k8s is in the image, not the venv")
    from dagster._config import process_config

    checked = process_config(
        k8s.k8s_job_executor.config_schema.config_type, run_config["execution"]["config"]
    )
    assert checked.success, checked.errors
