"""The production stack (``scripts/stack.sh``) with real services: PostgreSQL for Dagster and
MLflow, ``mlflow server`` with proxied artifacts, the Dagster code server, webserver and daemon
as separate processes, Triton, cifar-metrics and Prometheus.

One stack for the module, on free ports under a fresh folder. In order:

1. it comes up, every listener on 127.0.0.1, the password only in 0600 files;
2. main_job is launched through GraphQL and run by the daemon's queue while the webserver, the
   daemon, the MLflow server and PostgreSQL are each restarted: the run succeeds, no run is
   lost, the registry keeps its champion and its proxied artifacts;
3. two drift checks, launched by the daemon's sensor for two dropped batches, run at once;
4. traffic with feedback goes through the router, and Prometheus itself answers the PromQL of
   every panel of the Grafana dashboard; each answer is checked;
5. the closed loop from main_job's v1 on, with the steps of tests/test_closed_loop.py
   (tests/loop.py): a labelled drifted batch dropped into the incoming folder is checked by the
   daemon, Prometheus fires the drift alert, the drift sensor's retraining serves v2 as
   challenger, traffic with feedback, ``ab_test_report``, promotion and rollback. After each
   change the whole state is read through the MLflow server and the stack's Triton, and
   Prometheus' router weights agree with it.

The times (up to ready, each restart, failed requests while restarting, the loop's steps) are
printed.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT, subprocess_env, whole_state
from tests.loop import (
    TRAINING,
    Loop,
    ab_test_promote_and_roll_back,
    assert_journal,
    drop_and_check,
    expected_state,
    finished,
    retraining_serves_challenger,
    write_noisy_batch,
)
from tests.serving_fixtures import copy_repository, free_ports

# The closed loop's recipe, halved: the module must fit CI's budget on two cores.
TRAINING = {
    **TRAINING,
    "cifar10_raw": {"config": {"source": "synthetic", "num_images": 600, "seed": 0}},
    "trained_model": {"config": {"stem": "imagenet", "epochs": 1, "batch_size": 64, "lr": 0.1}},
    "onnx_model": {"config": {"parity_images": 32, "calibration_images": 32}},
    "drift_baseline": {"config": {"reference_images": 90}},
}
STACK = str(PROJECT_ROOT / "scripts" / "stack.sh")
STACK_WORKSPACE = "configs/stack/workspace.yaml"
DASHBOARD = PROJECT_ROOT / "configs" / "monitoring" / "grafana_dashboard.json"
needs_services = pytest.mark.skipif(
    shutil.which("prometheus") is None
    or not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")),
    reason="needs Debian's postgresql and prometheus (scripts/install.sh installs them as root)",
)


@dataclass
class Stack(Loop):
    """The loop (tests/loop.py) on the stack's instance and webserver, with its own handles."""

    dir: Path = field(kw_only=True)
    ports: dict[str, int] = field(kw_only=True)

    def sh(self, *args: str, timeout_s: float = 600) -> str:
        result = subprocess.run(
            [STACK, *args],
            env=subprocess_env(self.env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        return result.stdout

    def prometheus(self, query: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.ports['prometheus']}/api/v1/query?" + urllib.parse.urlencode(
            {"query": query}
        )
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return list(body["data"]["result"])


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    import yaml

    # PostgreSQL runs as the postgres user when the tests run as root: the folder must be one
    # that user can enter, so not under pytest's 0700 basetemp.
    root = Path(tempfile.mkdtemp(prefix="cifar-stack-"))
    root.chmod(0o755)
    var = root / "var"
    names = [
        "pg",
        "mlflow",
        "code_server",
        "webserver",
        "prometheus",
        "http",
        "grpc",
        "tmetrics",
        "app",
    ]
    ports = dict(zip([*names, "metrics"], free_ports(len(names) + 1), strict=True))
    retraining = root / "retraining.yaml"
    # One process for all steps, as main_job below: each step process would import torch and
    # mlflow again; the queue, the daemon and the stores are the same.
    retraining.write_text(
        yaml.safe_dump({"ops": TRAINING, "execution": {"config": {"in_process": {}}}})
    )
    env = {
        "CIFAR_VAR_DIR": str(var),
        "TRITON_MODEL_REPOSITORY": str(var / "triton_repo"),
        "CIFAR_RETRAINING_CONFIG": str(retraining),
        "CIFAR_PROGRESS_BAR": "0",
        "CIFAR_STACK_PG_PORT": str(ports["pg"]),
        "CIFAR_STACK_MLFLOW_PORT": str(ports["mlflow"]),
        "CIFAR_STACK_CODE_SERVER_PORT": str(ports["code_server"]),
        "CIFAR_STACK_WEBSERVER_PORT": str(ports["webserver"]),
        "CIFAR_STACK_PROMETHEUS_PORT": str(ports["prometheus"]),
        "CIFAR_STACK_SCRAPE_INTERVAL": "2s",
        "TRITON_HTTP_PORT": str(ports["http"]),
        "TRITON_GRPC_PORT": str(ports["grpc"]),
        "TRITON_METRICS_PORT": str(ports["tmetrics"]),
        "PROMETHEUS_PORT": str(ports["metrics"]),
        "CIFAR_APP_PORT": str(ports["app"]),
    }
    copy_repository(var / "triton_repo")
    cleared = (
        "CIFAR_DATA_DIR",
        "CIFAR_STORAGE_DIR",
        "CIFAR_INCOMING_DIR",
        "CIFAR_CAPTURE_DIR",
        "CIFAR_STACK_DIR",
        "CIFAR_STACK_PG_PASSWORD",
        "DAGSTER_HOME",
        "MLFLOW_TRACKING_URI",
    )
    with pytest.MonkeyPatch.context() as patch:
        for key in cleared:
            patch.delenv(key, raising=False)
        for key, value in env.items():
            patch.setenv(key, value)
        handle = Stack(env, ports["webserver"], dir=var / "stack", ports=ports)
        started = time.monotonic()
        try:
            handle.figures["up_output"] = handle.sh("up")
            handle.figures["up_to_ready_s"] = round(time.monotonic() - started, 1)
            # the client side of the stack: the variables `stack.sh env` prints
            for line in handle.sh("env").splitlines():
                key, value = line.removeprefix("export ").split("=", 1)
                handle.env[key] = value.strip("'")
                patch.setenv(key, value.strip("'"))
            # Retraining waits for the closed loop's drifted batch (the last test turns the
            # sensor on again), with the documented command in the stack's workspace.
            handle.dagster("sensor", "stop", "drift_retraining_sensor", "-w", STACK_WORKSPACE)
            yield handle
        finally:
            subprocess.run(
                [STACK, "down"], env=subprocess_env(handle.env), capture_output=True, timeout=300
            )
            print(f"\nstack figures: {json.dumps(handle.figures, indent=1)}")
            shutil.rmtree(root, ignore_errors=True)


def listen_addresses(port: int) -> set[str]:
    """Local addresses listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


@needs_services
def test_the_stack_comes_up_on_loopback_with_private_secrets(stack: Stack) -> None:
    assert "all          ready" in stack.figures["up_output"]
    status = stack.sh("status")
    assert "DOWN" not in status, status
    for name, port in stack.ports.items():
        addresses = listen_addresses(port)
        assert addresses and addresses <= LOOPBACK, f"{name} on {port} listens on {addresses}"
    for secret in (stack.dir / "secrets" / "pg_password", stack.dir / "stack.env"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    password = stack.env["DAGSTER_PG_PASSWORD"]
    assert password not in (stack.dir / "dagster_home" / "dagster.yaml").read_text()
    for pid_file in (stack.dir / "run").glob("*.pid"):
        command = json.loads(pid_file.read_text())["command"]
        assert not any(password in part for part in command), pid_file
    with stack.instance() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"


def restart_counting_failures(stack: Stack, service: str, probe: Callable[[], object]) -> None:
    """Restart ``service`` while ``probe`` is called every 0.2 s; records the restart's time
    and how many probes failed."""
    process = subprocess.Popen(
        [STACK, "restart", service],
        env=subprocess_env(stack.env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started = time.monotonic()
    tried = failed = 0
    while process.poll() is None:
        tried += 1
        try:
            probe()
        except Exception:
            failed += 1
        time.sleep(0.2)
    output = process.stdout.read() if process.stdout else ""
    assert process.returncode == 0, output
    stack.figures.setdefault("restarts", []).append(
        {
            "service": service,
            # stop, start and ready again, as stack.sh measures it
            "restart_s": float(output.rsplit("ready again after", 1)[1].split()[0]),
            # until the last probe returned (a client's own retries can outlast the restart)
            "seconds": round(time.monotonic() - started, 1),
            "probes": tried,
            "failed_probes": failed,
            "runs_after": stack.summary(),
        }
    )


def graphql_runs(stack: Stack) -> object:
    """What the UI asks first: the runs list, through GraphQL."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{stack.ports['webserver']}/graphql",
        data=json.dumps({"query": "{ runsOrError(limit: 5) { __typename } }"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        body = json.load(answer)
    assert body["data"]["runsOrError"]["__typename"] == "Runs", body
    return body


def registry_champion(stack: Stack) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(stack.env["MLFLOW_TRACKING_URI"])
    return int(client.get_model_version_by_alias("cifar10-resnet18", "champion").version)


def postgres_answers(stack: Stack) -> object:
    import psycopg2

    connection = psycopg2.connect(
        host="127.0.0.1",
        port=stack.ports["pg"],
        user=stack.env["DAGSTER_PG_USERNAME"],
        password=stack.env["DAGSTER_PG_PASSWORD"],
        dbname="dagster",
        connect_timeout=2,
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM runs")
            return cursor.fetchone()
    finally:
        connection.close()


@needs_services
def test_main_job_through_the_daemon_survives_restarting_each_service(stack: Stack) -> None:
    # One process for all steps: each step process would import torch and mlflow again, and
    # the module has to fit CI's budget; the queue, the daemon and the stores are the same.
    run_id = stack.launch(
        "main_job", {"ops": TRAINING, "execution": {"config": {"in_process": {}}}}
    )
    launched = time.monotonic()
    stack.wait_for_runs(
        lambda runs: runs[0].status == dg.DagsterRunStatus.STARTED, "main_job to start", 300
    )
    # Mid-run: each service in turn, while a client keeps asking it.
    restart_counting_failures(stack, "webserver", lambda: graphql_runs(stack))
    restart_counting_failures(stack, "daemon", lambda: graphql_runs(stack))
    restart_counting_failures(stack, "mlflow", lambda: http_get(stack, "mlflow", "/health"))
    restart_counting_failures(stack, "postgres", lambda: postgres_answers(stack))
    runs = stack.wait_for_runs(
        lambda runs: runs[0].status == dg.DagsterRunStatus.SUCCESS, "main_job", 1200
    )
    with stack.instance() as instance:
        stats = instance.get_run_stats(run_id)
    assert stats.start_time is not None and stats.end_time is not None
    stack.figures["main_job_run_s"] = round(stats.end_time - stats.start_time, 1)
    stack.figures["main_job_launch_to_success_s"] = round(time.monotonic() - launched, 1)
    assert [(r.run_id, r.job_name) for r in runs] == [(run_id, "main_job")]  # none lost
    assert whole_state() == expected_state(1, None, {1: 1.0})

    # The registry lives in PostgreSQL behind the server, and its artifacts went through the
    # server into the stack's artifact folder (no client wrote there itself).
    restart_counting_failures(stack, "mlflow", lambda: registry_champion(stack))
    assert registry_champion(stack) == 1
    from mlflow import MlflowClient

    mlflow_client = MlflowClient(stack.env["MLFLOW_TRACKING_URI"])
    version = mlflow_client.get_model_version("cifar10-resnet18", "1")
    run = mlflow_client.get_run(version.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    assert any((stack.dir / "mlflow-artifacts").rglob("*")), "no proxied artifact stored"
    assert mlflow_client.list_artifacts(version.run_id), "artifacts not listed through the server"


def http_get(stack: Stack, service: str, path: str) -> bytes:
    url = f"http://127.0.0.1:{stack.ports[service]}{path}"
    with urllib.request.urlopen(url, timeout=5) as answer:
        return bytes(answer.read())


@needs_services
def test_two_drift_checks_run_at_once(stack: Stack) -> None:
    from cifar_assets.data.imageset import save_npz
    from cifar_assets.data.synthetic import generate_synthetic

    stack.incoming.mkdir(parents=True, exist_ok=True)
    for name, seed in (("morning", 31), ("evening", 32)):
        save_npz(
            stack.incoming / f"{name}.npz", {"images": generate_synthetic(150, seed=seed).images}
        )
    runs = stack.wait_for_runs(
        lambda runs: (
            sum(
                r.job_name == "drift_check_job" and r.status == dg.DagsterRunStatus.SUCCESS
                for r in runs
            )
            == 2
        ),
        "two drift checks",
        600,
    )
    checks = [r for r in runs if r.job_name == "drift_check_job"]
    assert {r.tags["dagster/partition"] for r in checks} == {"morning", "evening"}
    with stack.instance() as instance:
        spans = [instance.get_run_stats(r.run_id) for r in checks]
    first, second = sorted(spans, key=lambda s: s.start_time or 0)
    assert first.end_time and second.start_time and second.start_time < first.end_time, (
        "the two drift checks ran one after the other"
    )
    stack.figures["drift_checks_overlap_s"] = round(first.end_time - second.start_time, 1)


def wait_for(found: Callable[[], object], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not found():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def send_traffic(stack: Stack, first: int, users: int) -> float:
    """Router requests from users ``first``..``users - 1`` with feedback: every third answer
    is marked wrong. Returns the accuracy the feedback of all users so far implies.

    The feedback is given once the router has captured the requests, as a user answers after
    seeing the prediction: cifar-metrics drops feedback for a request it has not yet read in the
    capture (cifar_assets/metrics.py, ``_read_feedback``)."""
    from cifar_assets.data.synthetic import generate_synthetic
    from cifar_assets.serving.capture import read_capture, record_feedback
    from cifar_assets.serving.client import infer_ab

    capture = Path(stack.env["CIFAR_VAR_DIR"]) / "capture"
    images = generate_synthetic(users, seed=41).images
    correct = sum(user % 3 != 0 for user in range(first))
    answers = {}
    for user in range(first, users):
        result = infer_ab(
            images[user : user + 1], user_id=f"u{user}", url=f"127.0.0.1:{stack.ports['http']}"
        )
        answers[result.request_id] = (user, int(np.argmax(result.logits[0])))
    wait_for(lambda: set(answers) <= set(read_capture(capture)["request_id"]), "the capture", 30)
    for request_id, (user, predicted) in answers.items():
        right = user % 3 != 0
        correct += right
        record_feedback(capture, request_id, predicted if right else (predicted + 1) % 10)
    return correct / users


def dashboard_queries() -> dict[str, str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {p["title"]: t["expr"] for p in panels for t in p.get("targets", [])}


@needs_services
def test_prometheus_answers_every_dashboard_panel(stack: Stack) -> None:
    from cifar_assets.data.imageset import CLASSES

    # Two waves: a counter's rate needs a sample before the traffic and one after.
    send_traffic(stack, 0, 30)
    wait_for(lambda: stack.prometheus("cifar10_ab_requests_total"), "the first scrape", 60)
    accuracy = send_traffic(stack, 30, 60)
    drift = json.loads(
        (
            Path(stack.env["CIFAR_VAR_DIR"]) / "storage" / "drift_report" / "drift_status.json"
        ).read_text()
    )
    queries = dashboard_queries()
    assert len(queries) == 6, queries

    def answers() -> dict[str, list[dict[str, Any]]]:
        return {title: stack.prometheus(expr) for title, expr in queries.items()}

    # cifar-metrics polls each second and Prometheus scrapes every 2 s: rates need two samples
    # that both see the traffic.
    deadline = time.monotonic() + 90
    while True:
        result = answers()
        accuracy_now = result["Accuracy from feedback"]
        if (
            accuracy_now
            and abs(float(accuracy_now[0]["value"][1]) - accuracy) < 1e-9
            and any(
                float(s["value"][1]) > 0 for s in result["Requests per second by served version"]
            )
        ):
            break
        assert time.monotonic() < deadline, f"Prometheus never saw the traffic: {result}"
        time.sleep(2)

    def values(title: str) -> dict[str, float]:
        return {
            json.dumps(series["metric"], sort_keys=True): float(series["value"][1])
            for series in result[title]
        }

    rates = result["Requests per second by served version"]
    assert [s["metric"] for s in rates] == [{"version": "1"}] and float(rates[0]["value"][1]) > 0
    (p95,) = values("Latency p95 (router) by version").values()
    assert 0 < p95 <= 2.0
    assert [s["metric"]["version"] for s in accuracy_now] == ["1"]
    (score,) = result["Data drift score (latest batch)"]
    assert score["metric"]["batch"] == drift["batch"]
    assert abs(float(score["value"][1]) - drift["score"]) < 1e-9
    mix = result["Predicted class mix"]
    assert mix and {s["metric"]["predicted_class"] for s in mix} <= set(CLASSES)
    assert (
        all(float(s["value"][1]) >= 0 for s in mix)
        and sum(values("Predicted class mix").values()) > 0
    )
    failures = values("Triton failed inferences")
    assert failures and all(v == 0 for v in failures.values())
    assert {json.loads(k)["model"] for k in failures} >= {"cifar10_ab"}
    stack.figures["dashboard"] = {title: result[title] for title in queries}

    with urllib.request.urlopen(
        f"http://127.0.0.1:{stack.ports['prometheus']}/api/v1/rules", timeout=10
    ) as answer:
        groups = json.load(answer)["data"]["groups"]
    alerts = {rule["name"]: rule["state"] for g in groups for rule in g["rules"]}
    assert set(alerts) >= {
        "CifarDataDrift",
        "CifarRouterErrorRate",
        "CifarLatencyP95High",
        "CifarSampleRatioMismatch",
        "CifarNoCapturedTraffic",
    }
    assert alerts["CifarRouterErrorRate"] == "inactive"
    # the drift alert follows the latest report's verdict
    assert (alerts["CifarDataDrift"] != "inactive") == drift["drift"], (alerts, drift)


def prometheus_weights_agree(stack: Stack, state: dict[str, Any]) -> None:
    """Prometheus' view of the router (the ``cifar10_ab_weight`` gauge that the SRM alert
    reads) comes to equal the router's weights in ``state``."""
    deadline = time.monotonic() + 60
    while True:
        seen = {
            int(series["metric"]["version"]): float(series["value"][1])
            for series in stack.prometheus("cifar10_ab_weight")
        }
        if seen == state["weights"]:
            return
        assert time.monotonic() < deadline, f"Prometheus: {seen}, the router: {state['weights']}"
        time.sleep(1)


@needs_services
def test_the_closed_loop_on_the_stack(stack: Stack) -> None:
    assert finished(stack.runs(), "main_job"), "needs main_job's v1 (the test above)"
    started = time.monotonic()
    stack.watch = lambda state: prometheus_weights_agree(stack, state)
    verdicts = drop_and_check(stack, write_noisy_batch, {"noisy"})
    assert verdicts["noisy"]["drift"] is True and verdicts["noisy"]["labelled"] is True
    # the earlier batches' verdicts (clean synthetic data against the 1-epoch model's baseline)
    stack.figures["verdicts"] = {batch: v["drift"] for batch, v in verdicts.items()}

    # Prometheus sees the verdict: the batch's score over the threshold, and the alert fires.
    status = json.loads((stack.var / "storage" / "drift_report" / "drift_status.json").read_text())
    assert status["batch"] == "noisy" and status["drift"] is True
    firing: list[dict[str, Any]] = []

    def drift_alert_fires() -> bool:
        firing[:] = stack.prometheus('ALERTS{alertname="CifarDataDrift",alertstate="firing"}')
        return bool(firing)

    wait_for(drift_alert_fires, "the CifarDataDrift alert", 60)
    assert [s["metric"]["batch"] for s in firing] == ["noisy"]
    (score,) = stack.prometheus('cifar10_data_drift_score{batch="noisy"}')
    assert abs(float(score["value"][1]) - status["score"]) < 1e-9 and status["score"] > 0.95

    # Retraining switched on again: one run for every drifted report so far.
    stack.dagster("sensor", "start", "drift_retraining_sensor", "-w", STACK_WORKSPACE)
    with stack.instance() as instance:
        states = {s.instigator_name: s.status.value for s in instance.all_instigator_state()}
    assert states["drift_retraining_sensor"] == "RUNNING"
    retraining_serves_challenger(stack, verdicts)
    ab_test_promote_and_roll_back(stack)
    assert_journal(stack, [("deploy", 1), ("deploy", 2), ("promote", 2), ("rollback", 1)])
    stack.figures["closed_loop_after_main_job_s"] = round(time.monotonic() - started, 1)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (prometheus)")
def test_alert_rules_pass_promtool() -> None:
    monitoring = PROJECT_ROOT / "configs" / "monitoring"
    for command in (
        ["promtool", "check", "rules", str(monitoring / "alert_rules.yml")],
        ["promtool", "test", "rules", str(monitoring / "alert_rules_test.yml")],
        ["promtool", "check", "config", "--syntax-only", str(monitoring / "prometheus.yml")],
    ):
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    assert os.access(STACK, os.X_OK)
