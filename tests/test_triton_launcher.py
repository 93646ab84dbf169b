"""The launcher and the ``cifar-triton`` CLI against the real tritonserver binary: clear errors
for a busy port, a missing binary or a server that dies, and start/status/stop across processes.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cifar_assets.serving import repository
from cifar_assets.serving.launcher import (
    PortInUseError,
    TritonConfig,
    TritonLaunchError,
    TritonNotInstalledError,
    TritonServer,
    find_distribution,
    server_status,
    stop_server,
)
from tests.conftest import subprocess_env
from tests.serving_fixtures import copy_repository, free_ports

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "cifar_assets.serving.cli"]


def _config(tmp_path: Path, **overrides: object) -> TritonConfig:
    http, grpc, metrics = free_ports(3)
    config = TritonConfig(
        repo=copy_repository(tmp_path / "triton_repo"),
        state_dir=tmp_path / "var" / "triton",
        capture_dir=tmp_path / "var" / "capture",
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
        stop_timeout_s=15.0,
    )
    return replace(config, **overrides)  # type: ignore[arg-type]


def test_busy_port_is_named_before_anything_starts(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", config.grpc_port))
        taken.listen()
        with pytest.raises(PortInUseError) as raised:
            TritonServer(config).start()
    message = str(raised.value)
    assert f"gRPC port 127.0.0.1:{config.grpc_port} is already in use" in message
    assert "TRITON_GRPC_PORT" in message and "--grpc-port" in message
    assert not config.pid_path.exists()


def test_same_port_twice_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config = replace(config, metrics_port=config.http_port)
    with pytest.raises(PortInUseError, match=f"both {config.http_port}"):
        TritonServer(config).start()


def test_missing_binary_says_to_install_nvidia_pytriton(tmp_path: Path) -> None:
    with pytest.raises(TritonNotInstalledError, match="pip install nvidia-pytriton"):
        find_distribution(tmp_path)
    with pytest.raises(TritonNotInstalledError, match="pip install nvidia-pytriton"):
        TritonServer(_config(tmp_path, site_root=tmp_path / "nowhere")).start()


def test_missing_stub_for_this_python_lists_the_ones_there(tmp_path: Path) -> None:
    binary = tmp_path / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "pytriton" / "tritonserver" / "python_backend_stubs" / "3.8").mkdir(parents=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    with pytest.raises(TritonNotInstalledError, match=rf"Python {version}.*\['3\.8'\]"):
        find_distribution(tmp_path)


def test_installed_distribution_is_complete() -> None:
    distribution = find_distribution()
    assert os.access(distribution.binary, os.X_OK)
    assert distribution.stub.parent.name == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert (distribution.python_backend / "libtriton_python.so").is_file()


def test_server_that_dies_while_starting_reports_its_log(tmp_path: Path) -> None:
    config = _config(tmp_path, extra_args=("--model-control-mode=bogus",))
    with pytest.raises(TritonLaunchError, match="exited with code") as raised:
        TritonServer(config).start()
    assert "invalid argument for --model-control-mode" in str(raised.value)
    assert not config.pid_path.exists()


def test_context_manager_starts_serves_and_stops(tmp_path: Path) -> None:
    import io
    import json

    from cifar_assets.logs import configure_logging

    config = _config(tmp_path)
    stream = io.StringIO()
    configure_logging("INFO", stream)
    with TritonServer(config) as server:
        assert server.is_ready()
        pid = server.pid
        status = server_status(config)
        assert status.running and status.ready and status.pid == pid
        with pytest.raises(TritonLaunchError, match="already running"):
            TritonServer(config).start()
    assert not server.is_ready()
    assert not Path(f"/proc/{pid}").exists()
    assert not server_status(config).running
    # No live versions were ever set: only the router was loaded.
    assert "successfully loaded 'cifar10_ab'" in config.log_path.read_text()
    assert repository.read_live_versions(config.state_dir) == []
    # The launcher's JSON lines: started, ready, stopped, each with the server's pid.
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    launcher = [line for line in lines if line["component"] == "launcher"]
    assert [line["message"] for line in launcher] == [
        "tritonserver started",
        "tritonserver ready, models restored",
        "tritonserver stopped",
    ]
    assert all(line["pid"] == pid for line in launcher)
    assert launcher[0]["http_url"] == config.http_url and launcher[1]["seconds"] > 0
    configure_logging()


def test_cli_start_status_stop_across_processes(tmp_path: Path) -> None:
    config = _config(tmp_path)
    env = subprocess_env(
        {
            "CIFAR_VAR_DIR": str(tmp_path / "var"),
            "TRITON_MODEL_REPOSITORY": str(config.repo),
            "TRITON_HTTP_PORT": str(config.http_port),
            "TRITON_GRPC_PORT": str(config.grpc_port),
            "TRITON_METRICS_PORT": str(config.metrics_port),
        }
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args], env=env, capture_output=True, text=True, timeout=180, check=False
        )

    started = cli("start")
    try:
        assert started.returncode == 0, started.stderr
        assert f"HTTP     127.0.0.1:{config.http_port}" in started.stdout
        status = json.loads(cli("status").stdout)
        assert status["running"] and status["ready"]
        assert status["http_url"] == f"127.0.0.1:{config.http_port}"
        again = cli("start")
        assert again.returncode == 1 and "already running" in again.stderr
        # Traffic moves only through the rollout: a version that never passed its check is
        # refused, and nothing changes.
        refused = cli("promote", "2", "--reason", "try")
        assert refused.returncode == 1 and "has not passed its Triton check" in refused.stderr
        lifecycle = json.loads(cli("status").stdout)["lifecycle"]
        assert lifecycle["champion"] is None and lifecycle["disagreements"] == []
        assert status["router_execution"] == "inprocess"
        switched = cli("router", "bls")
        assert switched.returncode == 0, switched.stderr
        assert json.loads(cli("status").stdout)["router_execution"] == "bls"
        # Loaded at start, then again in bls mode.
        assert config.log_path.read_text().count("successfully loaded 'cifar10_ab'") == 2
        assert cli("router", "remote").returncode == 2  # argparse names the choices
        pid = status["pid"]
    finally:
        stopped = cli("stop")
    assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped"
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert json.loads(cli("status").stdout)["running"] is False
    assert cli("stop").stdout.strip() == "no tritonserver was running"


def test_stale_pid_file_never_signals_another_program(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config.state_dir.mkdir(parents=True)
    # Our own pid: a live process that is not a tritonserver.
    config.pid_path.write_text(
        json.dumps({"pid": os.getpid(), "host": "127.0.0.1", "http_port": 1})
    )
    assert stop_server(config) is False
    assert not config.pid_path.exists()
    assert not server_status(config).running
