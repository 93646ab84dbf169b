"""Start, watch and stop the real ``tritonserver`` that the nvidia-pytriton wheel ships.

The one place that starts Triton. Like pytriton itself, it assembles a python-backend folder with
the stub built for the running Python (the wheel carries one per minor version), puts the wheel's
``nvidia_pytriton.libs`` on ``LD_LIBRARY_PATH`` and the venv's ``bin/`` first on ``PATH`` (so
model.py imports the venv's numpy and onnxruntime), and binds HTTP, gRPC and metrics to one host.

The server runs in ``--model-control-mode=explicit`` with its control APIs behind the key of
``repository.control_key`` (created on the first start); once it answers, the launcher loads the
persisted live versions and the A/B router (``repository.restore_models``), so a restart serves
what was served before. Its output goes to ``<state_dir>/tritonserver.log`` and its pid, ports and
repository to ``<state_dir>/tritonserver.pid`` (JSON), so ``stop`` and ``status`` work from any
process.

A tritonserver killed with SIGKILL leaves its python-backend stubs running (orphaned, often
deadlocked) and their ``/dev/shm`` regions behind. Each server's regions are named
``cifar-<hash of the repository path>-<random>-...``, and each stub carries its region's name and
its model.py path on its command line, so ``start`` and ``stop`` can find and remove the orphans of
their own repository (``remove_orphans``) and touch nothing else. Only the standard library is
imported here: Dagster code may import this module freely.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from cifar_assets.serving import repository
from cifar_assets.settings import Settings, get_settings

LOG_FILE = "tritonserver.log"
PID_FILE = "tritonserver.pid"
BACKENDS_DIR = "backends"
LOG_TAIL_LINES = 40
STUB_NAME = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")
SHM_PREFIX_OPTION = "--backend-config=python,shm-region-prefix-name="


class TritonLaunchError(RuntimeError):
    """The server cannot be started, found or stopped as asked."""


class TritonNotInstalledError(TritonLaunchError):
    """The tritonserver binary (from the nvidia-pytriton wheel) is not where it should be."""


class PortInUseError(TritonLaunchError):
    """A port the server needs is already bound by another process."""


@dataclass(frozen=True)
class TritonDistribution:
    """The pieces of the nvidia-pytriton wheel that a server needs."""

    binary: Path
    python_backend: Path  # libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub built for this Python
    libs: Path  # shared libraries the binary and the stub link against


def _site_root() -> Path:
    """The folder holding the installed ``pytriton`` package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotInstalledError(
            "The nvidia-pytriton package is not installed in this Python "
            f"({sys.executable}); it ships the tritonserver binary. Run "
            "`pip install nvidia-pytriton` (it is a project dependency: `pip install -e .`)."
        )
    return Path(next(iter(spec.submodule_search_locations))).parent


def find_distribution(site_root: Path | None = None) -> TritonDistribution:
    """Locate tritonserver, the python backend and this Python's stub under ``site_root``
    (default: where pip installed nvidia-pytriton), and check that each one is there."""
    root = site_root if site_root is not None else _site_root()
    server_dir = root / "pytriton" / "tritonserver"
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stubs = server_dir / "python_backend_stubs"
    distribution = TritonDistribution(
        binary=server_dir / "bin" / "tritonserver",
        python_backend=server_dir / "backends" / "python",
        stub=stubs / python_version / "triton_python_backend_stub",
        libs=root / "nvidia_pytriton.libs",
    )
    if not distribution.binary.is_file() or not os.access(distribution.binary, os.X_OK):
        raise TritonNotInstalledError(
            f"No executable tritonserver at {distribution.binary}. It comes with the "
            "nvidia-pytriton wheel: run `pip install nvidia-pytriton` (Linux x86_64/aarch64, "
            "glibc 2.35 or newer)."
        )
    if not distribution.stub.is_file():
        found = sorted(p.name for p in stubs.iterdir()) if stubs.is_dir() else []
        raise TritonNotInstalledError(
            f"No python-backend stub for Python {python_version} at {distribution.stub} "
            f"(the wheel has {found}). Use one of those Python versions, or upgrade with "
            "`pip install -U nvidia-pytriton`."
        )
    for required in (distribution.python_backend / "libtriton_python.so", distribution.libs):
        if not required.exists():
            raise TritonNotInstalledError(
                f"{required} is missing from the nvidia-pytriton installation; reinstall it "
                "with `pip install --force-reinstall nvidia-pytriton`."
            )
    return distribution


@dataclass(frozen=True)
class TritonConfig:
    """Where the server reads models and keeps state, and where it listens."""

    repo: Path
    state_dir: Path
    capture_dir: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    capture_input_sample_rate: float = 0.1
    ready_timeout_s: float = 120.0
    stop_timeout_s: float = 30.0
    site_root: Path | None = None  # where nvidia-pytriton is installed; None finds it
    extra_args: tuple[str, ...] = field(default=())

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides: Any) -> TritonConfig:
        settings = settings or get_settings()
        config = cls(
            repo=settings.triton_repo,
            state_dir=settings.var_dir / "triton",
            capture_dir=settings.capture_dir,
            host=settings.triton_host,
            http_port=settings.triton_http_port,
            grpc_port=settings.triton_grpc_port,
            metrics_port=settings.triton_metrics_port,
        )
        return replace(config, **overrides)

    @property
    def log_path(self) -> Path:
        return self.state_dir / LOG_FILE

    @property
    def pid_path(self) -> Path:
        return self.state_dir / PID_FILE

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def ports(self) -> dict[str, tuple[int, str, str]]:
        """name -> (port, environment variable, CLI flag) for the error messages."""
        return {
            "HTTP": (self.http_port, "TRITON_HTTP_PORT", "--http-port"),
            "gRPC": (self.grpc_port, "TRITON_GRPC_PORT", "--grpc-port"),
            "metrics": (self.metrics_port, "TRITON_METRICS_PORT", "--metrics-port"),
        }


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def check_ports_free(config: TritonConfig) -> None:
    """Raise PortInUseError naming the first port that cannot be bound on ``config.host``."""
    seen: dict[int, str] = {}
    for name, (port, env_var, flag) in config.ports().items():
        if port in seen:
            raise PortInUseError(
                f"The {name} and {seen[port]} ports are both {port}; give each its own port "
                f"({env_var} or {flag})."
            )
        seen[port] = name
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR as tritonserver uses it, so a port in TIME_WAIT does not count as busy.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((config.host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                raise PortInUseError(
                    f"The {name} port {config.host}:{port} is already in use by another process. "
                    f"Stop that process, or choose a free port with {env_var}=<port> or "
                    f"`cifar-triton start {flag} <port>`."
                ) from exc


def _process_state(pid: int) -> str | None:
    """'R', 'S', 'Z'... for a live process, None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _is_tritonserver(pid: int) -> bool:
    """True if ``pid`` is a live (not zombie) tritonserver: a pid file can outlive its server,
    and the pid can since belong to another program, which must never be signalled."""
    state = _process_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return Path(command.decode(errors="replace")).name == "tritonserver"


def read_pid_file(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / PID_FILE
    if not path.is_file():
        return None
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except ValueError:
        return None
    return record


def http_ready(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(
            f"http://{host}:{port}/v2/health/ready", timeout=timeout_s
        ) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass(frozen=True)
class ServerStatus:
    running: bool
    ready: bool
    pid: int | None
    http_url: str | None
    grpc_url: str | None
    metrics_url: str | None
    repo: str | None
    log: str
    live_versions: list[int]
    ab_weights: dict[int, float]
    router_execution: str  # the mode the router loads with (kept by `cifar-triton router`)


def server_status(config: TritonConfig) -> ServerStatus:
    """What the pid file in ``config.state_dir`` says, checked against the live process."""
    record = read_pid_file(config.state_dir)
    running = record is not None and _is_tritonserver(int(record["pid"]))
    host = record["host"] if record else config.host
    return ServerStatus(
        running=running,
        ready=bool(running and record and http_ready(host, int(record["http_port"]))),
        pid=int(record["pid"]) if running and record else None,
        http_url=f"{host}:{record['http_port']}" if running and record else None,
        grpc_url=f"{host}:{record['grpc_port']}" if running and record else None,
        metrics_url=f"http://{host}:{record['metrics_port']}/metrics"
        if running and record
        else None,
        repo=record["repo"] if running and record else None,
        log=str(config.log_path),
        live_versions=repository.read_live_versions(config.state_dir),
        ab_weights=repository.read_ab_weights(config.state_dir),
        router_execution=repository.read_router_execution(config.state_dir)
        or repository.ROUTER_EXECUTION_MODES[0],
    )


def _post_json(
    host: str, port: int, path: str, body: Any, timeout_s: float, headers: dict[str, str]
) -> Any:
    request = urllib.request.Request(
        f"http://{host}:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as answer:
        payload = answer.read()
    return json.loads(payload) if payload else None


def unload_all(host: str, port: int, timeout_s: float, headers: dict[str, str]) -> bool:
    """Unload every model through the repository API and wait until none is left.

    Python-backend models run ``finalize`` only when they are unloaded gracefully; on SIGTERM
    tritonserver first waits for open HTTP keep-alive connections until its exit timeout, and a
    timed-out exit kills the stubs, so the router's last sampled pixels would be lost (its
    records are already written: see ab_router_model.py). ``headers`` carry the control key.
    Returns False if the server did not answer or models were still loaded at the deadline.
    """
    deadline = time.monotonic() + timeout_s

    def post(path: str) -> Any:
        return _post_json(host, port, path, {}, timeout_s, headers)

    try:
        index = post("/v2/repository/index")
        for model in {entry["name"] for entry in index if entry.get("state") == "READY"}:
            post(f"/v2/repository/models/{model}/unload")
        while time.monotonic() < deadline:
            index = post("/v2/repository/index")
            if not any(entry.get("state") in ("READY", "UNLOADING") for entry in index):
                return True
            time.sleep(0.05)
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return False


def _wait_gone(pid: int, process: subprocess.Popen[bytes] | None, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                return True
        elif not _is_tritonserver(pid):
            return True
        time.sleep(0.05)
    return False


def _terminate(pid: int, process: subprocess.Popen[bytes] | None, grace_s: float) -> None:
    """SIGTERM (Triton then finishes in-flight requests and unloads models, which flushes the
    router's capture), then SIGKILL if it is still there after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, process, grace_s):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, process, 10.0)


def stop_server(config: TritonConfig) -> bool:
    """Stop the server recorded in ``config.state_dir``'s pid file, from any process.
    Returns False if none was running (a stale pid file is removed)."""
    return stop_and_clean(config)[0]


def stop_and_clean(config: TritonConfig) -> tuple[bool, Orphans]:
    """``stop_server``, then ``remove_orphans`` for the repository the server ran on (also when
    no server was running: a SIGKILLed server leaves its stubs behind). Returns whether a server
    was running, and the orphans removed."""
    record = read_pid_file(config.state_dir)
    running = False
    if record is not None:
        pid = int(record["pid"])
        running = _is_tritonserver(pid)
        if running:
            _unload_before_stop(config, record["host"], int(record["http_port"]))
            _terminate(pid, None, config.stop_timeout_s)
        config.pid_path.unlink(missing_ok=True)
    repo = Path(record["repo"]) if record and record.get("repo") else config.repo
    return running, remove_orphans(repo)


def _log() -> logging.Logger:
    """The launcher's JSON-lines logger (cifar_assets.logs): start, ready, stop, problems."""
    from cifar_assets.logs import get_logger

    return get_logger("launcher")


def _unload_before_stop(config: TritonConfig, host: str, port: int) -> None:
    try:
        headers = repository.control_headers(config.state_dir)
    except repository.RepositoryError as exc:
        # SIGTERM still stops the server; only a graceful finalize of the models is skipped.
        _log().warning(f"models not unloaded before the stop: {exc}")
        return
    unload_all(host, port, config.stop_timeout_s, headers)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _processes() -> list[tuple[int, list[str]]]:
    """(pid, command line) of every live, non-zombie process this user can see."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            state = _process_state(pid)
            command = _cmdline(pid) if state not in (None, "Z", "X") else []
            if command:
                found.append((pid, command))
    return found


def shm_family(repo: Path) -> str:
    """The start of every shm region name of servers on ``repo``: ``cifar-<hash>-``."""
    digest = hashlib.sha256(str(repo.resolve()).encode()).hexdigest()[:10]
    return f"cifar-{digest}-"


@dataclass(frozen=True)
class Orphans:
    """What ``remove_orphans`` found and removed."""

    stubs: list[int]  # pids of python-backend stubs whose tritonserver is gone
    regions: list[str]  # /dev/shm names no live server of the repository owns


def remove_orphans(repo: Path, grace_s: float = 5.0) -> Orphans:
    """Kill the python-backend stubs of ``repo`` whose tritonserver is gone and delete the
    ``/dev/shm`` regions of ``repo`` that no live server owns.

    A stub is ours when its command line runs ``triton_python_backend_stub`` on a model.py inside
    ``repo`` with a region named ``shm_family(repo)...``; it is an orphan when no live
    tritonserver has that region's prefix on its command line. Servers of other repositories,
    and their stubs and regions, are never touched (their names differ)."""
    repo = repo.resolve()
    family = shm_family(repo)
    processes = _processes()
    live_prefixes = [
        argument.removeprefix(SHM_PREFIX_OPTION)
        for _, command in processes
        if Path(command[0]).name == "tritonserver"
        for argument in command
        if argument.startswith(SHM_PREFIX_OPTION + family)
    ]

    def owned(region: str) -> bool:
        return any(region.startswith(prefix) for prefix in live_prefixes)

    stubs = []
    for pid, command in processes:
        if Path(command[0]).name != STUB_NAME or len(command) < 3:
            continue
        model_file, region = Path(command[1]).resolve(), command[2]
        if region.startswith(family) and model_file.is_relative_to(repo) and not owned(region):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                # Deadlocked orphans ignore SIGTERM; every record they answered is already
                # written (only a sampled-pixel chunk in gathering is lost).
                os.kill(pid, signal.SIGKILL)
                stubs.append(pid)
    deadline = time.monotonic() + grace_s
    while any(_process_state(p) not in (None, "Z", "X") for p in stubs):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    regions = []
    if SHM_DIR.is_dir():
        for path in sorted(SHM_DIR.iterdir()):
            if path.name.startswith(family) and not owned(path.name):
                # Another user's region of the same path is theirs (/dev/shm is sticky).
                with contextlib.suppress(FileNotFoundError, PermissionError):
                    path.unlink()
                    regions.append(path.name)
    return Orphans(stubs=stubs, regions=regions)


class TritonServer:
    """One tritonserver process: ``with TritonServer(config) as server: ...`` or
    ``start()`` / ``stop()``."""

    def __init__(self, config: TritonConfig) -> None:
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        # Left behind by an earlier server of the repository, removed by the last start/stop.
        self.orphans_removed = Orphans(stubs=[], regions=[])

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def http_url(self) -> str:
        return self.config.http_url

    @property
    def grpc_url(self) -> str:
        return self.config.grpc_url

    @property
    def metrics_url(self) -> str:
        return self.config.metrics_url

    def _backend_dir(self, distribution: TritonDistribution) -> Path:
        """A backends/ folder whose python/ holds the wheel's backend and this Python's stub,
        the layout tritonserver expects (symlinks: nothing is copied)."""
        python_dir = self.config.state_dir / BACKENDS_DIR / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        links = {
            "libtriton_python.so": distribution.python_backend / "libtriton_python.so",
            "triton_python_backend_utils.py": distribution.python_backend
            / "triton_python_backend_utils.py",
            "triton_python_backend_stub": distribution.stub,
        }
        for name, target in links.items():
            link = python_dir / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
        return python_dir.parent

    def _command(self, distribution: TritonDistribution, control_key: str) -> list[str]:
        config = self.config
        return [
            str(distribution.binary),
            f"--model-repository={config.repo}",
            "--model-control-mode=explicit",
            f"--http-address={config.host}",
            f"--http-port={config.http_port}",
            f"--grpc-address={config.host}",
            f"--grpc-port={config.grpc_port}",
            f"--metrics-address={config.host}",
            f"--metrics-port={config.metrics_port}",
            "--allow-gpu-metrics=false",
            f"--backend-directory={self._backend_dir(distribution)}",
            # A prefix of our own: two servers on one machine must not share /dev/shm regions,
            # and remove_orphans must recognise the regions (and stubs) of this repository.
            f"{SHM_PREFIX_OPTION}{shm_family(config.repo)}{uuid.uuid4().hex[:8]}-",
            *repository.restricted_api_args(control_key),
            # Models are unloaded before SIGTERM (unload_all); what is left to wait for is open
            # keep-alive connections, which would hold the exit for the whole timeout.
            "--exit-timeout-secs=3",
            *config.extra_args,
        ]

    def _environment(self, distribution: TritonDistribution) -> dict[str, str]:
        env = dict(os.environ)
        libraries = [str(distribution.libs), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libraries if p)
        env["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), env.get("PATH", "")])
        return env

    def start(self) -> TritonServer:
        """Start the server, wait until it answers, and load the persisted models."""
        config = self.config
        distribution = find_distribution(config.site_root)
        if not config.repo.is_dir():
            raise TritonLaunchError(
                f"Model repository {config.repo} does not exist; set TRITON_MODEL_REPOSITORY "
                "or --repo to the project's triton_repo/ (or a copy of it)."
            )
        record = read_pid_file(config.state_dir)
        if record is not None and _is_tritonserver(int(record["pid"])):
            raise TritonLaunchError(
                f"A tritonserver (pid {record['pid']}, HTTP {record['host']}:"
                f"{record['http_port']}) is already running for {config.state_dir}; stop it "
                "with `cifar-triton stop`, or use another CIFAR_VAR_DIR."
            )
        # First: an orphaned stub of a killed server may still hold the old server's sockets.
        self.orphans_removed = remove_orphans(config.repo)
        check_ports_free(config)
        repository.install_router(config.repo)
        repository.complete_versions(config.repo)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        control_key = repository.ensure_control_key(config.state_dir)
        if config.log_path.exists():
            config.log_path.replace(config.log_path.with_suffix(".log.previous"))
        with config.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self._command(distribution, control_key),
                env=self._environment(distribution),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: Ctrl-C in the starting shell must not kill a daemonised server.
                start_new_session=True,
            )
        repository.write_json_atomic(
            config.pid_path,
            {
                "pid": self.process.pid,
                "host": config.host,
                "http_port": config.http_port,
                "grpc_port": config.grpc_port,
                "metrics_port": config.metrics_port,
                "repo": str(config.repo),
                "log": str(config.log_path),
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        _log().info(
            "tritonserver started",
            extra={
                "pid": self.process.pid,
                "http_url": config.http_url,
                "grpc_url": config.grpc_url,
                "repo": str(config.repo),
                "server_log": str(config.log_path),
                "orphan_stubs_killed": len(self.orphans_removed.stubs),
            },
        )
        started = time.monotonic()
        try:
            self._wait_ready()
            repository.restore_models(
                config.http_url,
                repo=config.repo,
                state_dir=config.state_dir,
                capture_dir=config.capture_dir,
                capture_input_sample_rate=config.capture_input_sample_rate,
            )
        except BaseException:
            _log().error("tritonserver failed to start", extra={"pid": self.process.pid})
            self.stop()
            raise
        _log().info(
            "tritonserver ready, models restored",
            extra={"pid": self.process.pid, "seconds": round(time.monotonic() - started, 2)},
        )
        return self

    def _wait_ready(self) -> None:
        if self.process is None:
            raise TritonLaunchError("The server was not started; call start() first.")
        deadline = time.monotonic() + self.config.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonLaunchError(
                    f"tritonserver exited with code {self.process.returncode} while starting. "
                    f"Last lines of {self.config.log_path}:\n{log_tail(self.config.log_path)}"
                )
            if self.is_ready():
                return
            time.sleep(0.1)
        raise TritonLaunchError(
            f"tritonserver was not ready after {self.config.ready_timeout_s:.0f} s; raise "
            f"ready_timeout_s if the machine is busy. Last lines of {self.config.log_path}:\n"
            f"{log_tail(self.config.log_path)}"
        )

    def is_ready(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            return False
        return http_ready(self.config.host, self.config.http_port)

    def stop(self) -> None:
        """Unload the models, SIGTERM, wait up to ``stop_timeout_s``, then SIGKILL; removes the
        pid file and the repository's orphaned stubs and shm regions (``remove_orphans``)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            _unload_before_stop(self.config, self.config.host, self.config.http_port)
            _terminate(self.process.pid, self.process, self.config.stop_timeout_s)
        record = read_pid_file(self.config.state_dir)
        if record is not None and int(record["pid"]) == self.process.pid:
            self.config.pid_path.unlink(missing_ok=True)
        pid = self.process.pid
        self.process = None
        self.orphans_removed = remove_orphans(self.config.repo)
        _log().info(
            "tritonserver stopped",
            extra={"pid": pid, "orphan_stubs_killed": len(self.orphans_removed.stubs)},
        )

    def wait(self) -> int:
        """Block until the server exits (``cifar-triton start --foreground``); its exit code."""
        if self.process is None:
            raise TritonLaunchError("The server was not started; call start() first.")
        return self.process.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (the OS picks them; all held until all are chosen)."""
    sockets = []
    for _ in range(count):
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.bind(("127.0.0.1", 0))
        sockets.append(probe)
    ports = [probe.getsockname()[1] for probe in sockets]
    for probe in sockets:
        probe.close()
    return ports


def copy_repository(target: Path, source: Path | None = None) -> Path:
    """A copy of the model repository ``source`` (default: the configured one, the project's
    committed ``triton_repo/``) without its generated version folders: configs and labels."""
    shutil.copytree(
        source or get_settings().triton_repo,
        target,
        ignore=lambda folder, names: [n for n in names if n.isdigit() or n.startswith(".")],
    )
    return target


def start_scratch_server(
    base: Path,
    onnx: Mapping[int, Path],
    *,
    sample_rate: float = 0.1,
    weights: Mapping[int, float] | None = None,
    source_repo: Path | None = None,
) -> TritonServer:
    """A started server of its own under ``base``, on free ports: a copy of the committed
    repository's configs (``copy_repository``), ``onnx`` (version -> file) written and live,
    A/B ``weights`` (default: all on the lowest version), the router loaded. For tests and
    benchmarks; the caller stops it."""
    from cifar_assets.serving.client import wait_until_ready

    repo = copy_repository(base / "triton_repo", source_repo)
    for version, path in onnx.items():
        repository.write_version(repo, path, version, {"run_id": f"run-{version}"})
    http, grpc, metrics = free_ports(3)
    config = TritonConfig(
        repo=repo,
        state_dir=base / "var" / "triton",
        capture_dir=base / "var" / "capture",
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
        capture_input_sample_rate=sample_rate,
    )
    server = TritonServer(config).start()
    try:
        versions = sorted(onnx)
        repository.set_live_versions(
            config.http_url, versions, repo=repo, state_dir=config.state_dir
        )
        repository.set_ab_weights(weights or {versions[0]: 1.0}, state_dir=config.state_dir)
        wait_until_ready(
            config.http_url, models=[repository.MODEL_NAME, repository.ROUTER_NAME], timeout_s=60
        )
    except BaseException:
        server.stop()
        raise
    return server
