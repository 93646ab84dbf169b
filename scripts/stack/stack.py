"""The one-machine production stack: ``scripts/stack.sh up|down|status|restart SERVICE|env``.

Starts each service as its own process, every listener on 127.0.0.1:

| service | what | port (variable, default) |
|---|---|---|
| postgres | Debian's PostgreSQL, a cluster of its own under the stack folder | CIFAR_STACK_PG_PORT 5433 |
| mlflow | ``mlflow server`` on PostgreSQL with proxied artifacts | CIFAR_STACK_MLFLOW_PORT 5000 |
| triton | ``cifar-triton start`` | TRITON_HTTP_PORT / _GRPC_PORT / _METRICS_PORT 8000-8002 |
| metrics | ``cifar-metrics`` | PROMETHEUS_PORT 8003 |
| code_server | ``dagster code-server start`` (gRPC) | CIFAR_STACK_CODE_SERVER_PORT 4000 |
| webserver | ``dagster-webserver`` | CIFAR_STACK_WEBSERVER_PORT 3000 |
| daemon | ``dagster-daemon run`` (QueuedRunCoordinator, sensors, schedules) | none |
| prometheus | Debian's Prometheus with the alert rules | CIFAR_STACK_PROMETHEUS_PORT 9090 |
| app | ``cifar-app``, the prediction and feedback page | CIFAR_APP_PORT 8501 |

State lives in ``CIFAR_STACK_DIR`` (default ``$CIFAR_VAR_DIR/stack``): the PostgreSQL cluster,
MLflow's artifacts, DAGSTER_HOME, Prometheus' data, logs and pid files. The database password
is ``CIFAR_STACK_PG_PASSWORD``, or one generated into ``secrets/pg_password`` (mode 0600) on the
first ``up``. ``env`` prints the variables a client needs (``eval "$(scripts/stack.sh env)"``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
HOST = "127.0.0.1"
PG_USER = "cifar"


def _pg_bin() -> Path:
    """CIFAR_STACK_PG_BIN, or the newest Debian/Ubuntu PostgreSQL (15 on Debian 12, 16 on
    Ubuntu 24.04)."""
    given = os.environ.get("CIFAR_STACK_PG_BIN")
    if given:
        return Path(given)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else Path("/usr/lib/postgresql/bin")


PG_BIN = _pg_bin()
SERVICES = (
    "postgres",
    "mlflow",
    "triton",
    "metrics",
    "code_server",
    "webserver",
    "daemon",
    "prometheus",
    "app",
)


class StackError(RuntimeError):
    pass


@dataclass(frozen=True)
class Stack:
    dir: Path
    var_dir: Path
    pg_port: int
    mlflow_port: int
    code_server_port: int
    webserver_port: int
    prometheus_port: int
    triton_http_port: int
    triton_metrics_port: int
    metrics_port: int
    app_port: int
    scrape_interval: str

    @classmethod
    def from_env(cls) -> Stack:
        var = Path(os.environ.get("CIFAR_VAR_DIR") or ROOT / "var").resolve()
        env = os.environ.get
        return cls(
            dir=Path(env("CIFAR_STACK_DIR") or var / "stack").resolve(),
            var_dir=var,
            pg_port=int(env("CIFAR_STACK_PG_PORT") or 5433),
            mlflow_port=int(env("CIFAR_STACK_MLFLOW_PORT") or 5000),
            code_server_port=int(env("CIFAR_STACK_CODE_SERVER_PORT") or 4000),
            webserver_port=int(env("CIFAR_STACK_WEBSERVER_PORT") or 3000),
            prometheus_port=int(env("CIFAR_STACK_PROMETHEUS_PORT") or 9090),
            triton_http_port=int(env("TRITON_HTTP_PORT") or 8000),
            triton_metrics_port=int(env("TRITON_METRICS_PORT") or 8002),
            metrics_port=int(env("PROMETHEUS_PORT") or 8003),
            app_port=int(env("CIFAR_APP_PORT") or 8501),
            scrape_interval=env("CIFAR_STACK_SCRAPE_INTERVAL") or "15s",
        )

    @property
    def pg_dir(self) -> Path:
        return self.dir / "postgres"

    @property
    def dagster_home(self) -> Path:
        return self.dir / "dagster_home"

    @property
    def password_file(self) -> Path:
        return self.dir / "secrets" / "pg_password"

    def log(self, service: str) -> Path:
        return self.dir / "logs" / f"{service}.log"

    def pid_file(self, service: str) -> Path:
        return self.dir / "run" / f"{service}.pid"

    def password(self) -> str:
        given = os.environ.get("CIFAR_STACK_PG_PASSWORD")
        if given:
            return given
        if not self.password_file.is_file():
            self.password_file.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(self.password_file.parent, 0o700)
            descriptor = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_urlsafe(24))
        mode = self.password_file.stat().st_mode & 0o777
        if mode & 0o077:
            raise StackError(
                f"{self.password_file} is readable by others (mode {mode:o}); "
                f"run chmod 600 {self.password_file}."
            )
        return self.password_file.read_text().strip()

    def client_env(self) -> dict[str, str]:
        """What a Dagster process or a client of the stack needs beyond the environment."""
        return {
            "CIFAR_VAR_DIR": str(self.var_dir),
            "DAGSTER_HOME": str(self.dagster_home),
            "DAGSTER_PG_HOST": HOST,
            "DAGSTER_PG_PORT": str(self.pg_port),
            "DAGSTER_PG_USERNAME": PG_USER,
            "DAGSTER_PG_PASSWORD": self.password(),
            "DAGSTER_PG_DB": "dagster",
            "DAGSTER_CODE_SERVER_HOST": HOST,
            "DAGSTER_CODE_SERVER_PORT": str(self.code_server_port),
            "MLFLOW_TRACKING_URI": f"http://{HOST}:{self.mlflow_port}",
            "TRITON_HTTP_PORT": str(self.triton_http_port),
            "TRITON_METRICS_PORT": str(self.triton_metrics_port),
            "PROMETHEUS_PORT": str(self.metrics_port),
            "CIFAR_APP_PORT": str(self.app_port),
            "CIFAR_DAGSTER_URL": f"http://{HOST}:{self.webserver_port}",
        }

    def process_env(self) -> dict[str, str]:
        env = dict(os.environ) | self.client_env()
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        return env


# --- processes ---------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a live ``pid``: tells it from a process that reused the pid.
    None for no process or a zombie (exited, not yet collected)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def spawn(
    stack: Stack, service: str, command: list[str], extra_env: dict[str, str] | None = None
) -> None:
    stack.log(service).parent.mkdir(parents=True, exist_ok=True)
    stack.pid_file(service).parent.mkdir(parents=True, exist_ok=True)
    with stack.log(service).open("ab") as log:
        process = subprocess.Popen(  # noqa: S603 - fixed argv of the stack's own services, no shell
            command,
            cwd=ROOT,
            env=stack.process_env() | (extra_env or {}),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    record = {"pid": process.pid, "start": _start_time(process.pid), "command": command}
    stack.pid_file(service).write_text(json.dumps(record))


def running_pid(stack: Stack, service: str) -> int | None:
    path = stack.pid_file(service)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if _start_time(record["pid"]) != record["start"]:
        return None
    return int(record["pid"])


def terminate(stack: Stack, service: str, timeout_s: float = 30) -> None:
    pid = running_pid(stack, service)
    if pid is not None:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while running_pid(stack, service) is not None and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.2)
        if running_pid(stack, service) is not None:
            os.killpg(pid, signal.SIGKILL)
    stack.pid_file(service).unlink(missing_ok=True)


def _reap(pid: int) -> None:
    """Collect a child that exited (when this process started it, as in ``restart``)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - http://127.0.0.1 only
            return bool(200 <= response.status < 300)
    except OSError:
        return False


def wait_until(
    what: str,
    ready: Callable[[], bool],
    timeout_s: float,
    log: Path,
    alive: Callable[[], bool] = lambda: True,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        if not alive():
            break
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log.is_file() else "(no log)"
    raise StackError(f"{what} did not become ready; log {log}:\n{tail}")


# --- PostgreSQL ----------------------------------------------------------------------------------


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its tools as the ``postgres`` user."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603 - fixed argv
    if result.returncode != 0:
        raise StackError(f"{what} failed ({' '.join(command)}):\n{result.stdout}{result.stderr}")


def postgres_up(stack: Stack) -> None:
    if not (PG_BIN / "initdb").is_file():
        raise StackError(
            f"PostgreSQL's initdb is not in {PG_BIN}: install Debian's package "
            "(apt-get install postgresql) or set CIFAR_STACK_PG_BIN to its bin folder."
        )
    data = stack.pg_dir / "data"
    password = stack.password()
    if not (data / "PG_VERSION").is_file():
        stack.pg_dir.mkdir(parents=True, exist_ok=True)
        password_copy = stack.pg_dir / "initdb_password"
        descriptor = os.open(password_copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(password)
        if os.geteuid() == 0:
            shutil.chown(stack.pg_dir, "postgres", "postgres")
            shutil.chown(password_copy, "postgres", "postgres")
        try:
            _run(
                _as_postgres(
                    [
                        str(PG_BIN / "initdb"),
                        "-D",
                        str(data),
                        "-U",
                        PG_USER,
                        f"--pwfile={password_copy}",
                        "--auth-host=scram-sha-256",
                        "--auth-local=scram-sha-256",
                        "--encoding=UTF8",
                    ]
                ),
                "initdb (if it cannot enter the folder, the stack folder's parents must be "
                "readable by the postgres user, or set CIFAR_STACK_DIR elsewhere)",
            )
        finally:
            password_copy.unlink(missing_ok=True)
    log = stack.pg_dir / "server.log"
    _run(
        _as_postgres(
            [
                str(PG_BIN / "pg_ctl"),
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                str(data),
                "-l",
                str(log),
                "-o",
                f"-c listen_addresses={HOST} -c port={stack.pg_port} "
                "-c unix_socket_directories='' -c max_connections=200",
            ]
        ),
        "pg_ctl start",
    )
    wait_until("PostgreSQL", lambda: _pg_query(stack, "postgres", "SELECT 1"), 60, log)
    for database in ("dagster", "mlflow"):
        exists = "SELECT 1 FROM pg_database WHERE datname = %s"
        if not _pg_query(stack, "postgres", exists, (database,)):
            _pg_execute(stack, f'CREATE DATABASE "{database}"')


def _connect(stack: Stack, database: str):  # type: ignore[no-untyped-def]
    import psycopg2

    return psycopg2.connect(
        host=HOST,
        port=stack.pg_port,
        user=PG_USER,
        password=stack.password(),
        dbname=database,
        connect_timeout=3,
    )


def _pg_query(stack: Stack, database: str, sql: str, params: tuple[str, ...] = ()) -> bool:
    """True when ``sql`` returns a row."""
    import psycopg2

    try:
        connection = _connect(stack, database)
    except psycopg2.OperationalError:
        return False
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone() is not None
    finally:
        connection.close()


def _pg_execute(stack: Stack, sql: str) -> None:
    connection = _connect(stack, "postgres")
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
    finally:
        connection.close()


def postgres_down(stack: Stack) -> None:
    data = stack.pg_dir / "data"
    if (data / "postmaster.pid").is_file():
        _run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(data)]),
            "pg_ctl stop",
        )


# --- the other services --------------------------------------------------------------------------


def mlflow_start(stack: Stack) -> None:
    password = stack.password()
    artifacts = stack.dir / "mlflow-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    backend = f"postgresql+psycopg2://{PG_USER}:{password}@{HOST}:{stack.pg_port}/mlflow"
    spawn(
        stack,
        "mlflow",
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            HOST,
            "--port",
            str(stack.mlflow_port),
            "--serve-artifacts",
            "--artifacts-destination",
            str(artifacts),
            "--workers",
            "1",
        ],
        # the backend URI holds the password: through the environment, since argv is
        # world-readable in /proc
        extra_env={"MLFLOW_BACKEND_STORE_URI": backend},
    )


def mlflow_ready(stack: Stack) -> bool:
    return http_ok(f"http://{HOST}:{stack.mlflow_port}/health")


def triton_start(stack: Stack) -> None:
    spawn(
        stack,
        "triton_start",
        [str(BIN / "cifar-triton"), "start", "--ready-timeout", "300"],
    )


def triton_ready(stack: Stack) -> bool:
    return http_ok(f"http://{HOST}:{stack.triton_http_port}/v2/health/ready")


def triton_stop(stack: Stack) -> None:
    terminate(stack, "triton_start")
    subprocess.run(  # noqa: S603 - fixed argv
        [str(BIN / "cifar-triton"), "stop"],
        env=stack.process_env(),
        cwd=ROOT,
        capture_output=True,
        check=False,
    )


def metrics_start(stack: Stack) -> None:
    spawn(stack, "metrics", [str(BIN / "cifar-metrics")])


def metrics_ready(stack: Stack) -> bool:
    return http_ok(f"http://{HOST}:{stack.metrics_port}/metrics")


def app_start(stack: Stack) -> None:
    spawn(stack, "app", [str(BIN / "cifar-app")])


def app_ready(stack: Stack) -> bool:
    return http_ok(f"http://{HOST}:{stack.app_port}/_stcore/health")


def code_server_start(stack: Stack) -> None:
    spawn(
        stack,
        "code_server",
        [
            str(BIN / "dagster"),
            "code-server",
            "start",
            "-m",
            "cifar_assets.definitions",
            "--location-name",
            "cifar_assets",
            "-h",
            HOST,
            "-p",
            str(stack.code_server_port),
        ],
    )


def code_server_ready(stack: Stack) -> bool:
    result = subprocess.run(  # noqa: S603 - fixed argv
        [
            str(BIN / "dagster"),
            "api",
            "grpc-health-check",
            "-h",
            HOST,
            "-p",
            str(stack.code_server_port),
        ],
        capture_output=True,
        env=stack.process_env(),
        check=False,
    )
    return result.returncode == 0


WORKSPACE = ROOT / "configs" / "stack" / "workspace.yaml"


def webserver_start(stack: Stack) -> None:
    spawn(
        stack,
        "webserver",
        [
            str(BIN / "dagster-webserver"),
            "-w",
            str(WORKSPACE),
            "-h",
            HOST,
            "-p",
            str(stack.webserver_port),
        ],
    )


def webserver_ready(stack: Stack) -> bool:
    return http_ok(f"http://{HOST}:{stack.webserver_port}/server_info")


def daemon_start(stack: Stack) -> None:
    spawn(stack, "daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(WORKSPACE)])


def daemon_ready(stack: Stack) -> bool:
    if running_pid(stack, "daemon") is None:
        return False
    result = subprocess.run(  # noqa: S603 - fixed argv
        [str(BIN / "dagster-daemon"), "liveness-check"],
        capture_output=True,
        env=stack.process_env(),
        check=False,
    )
    return result.returncode == 0


def prometheus_config(stack: Stack) -> Path:
    """configs/monitoring/prometheus.yml with the stack's ports and the alert rules."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "monitoring" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = stack.scrape_interval
    config["global"]["evaluation_interval"] = stack.scrape_interval
    config["rule_files"] = [str(ROOT / "configs" / "monitoring" / "alert_rules.yml")]
    ports = {"cifar10-model": stack.metrics_port, "triton": stack.triton_metrics_port}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"{HOST}:{ports[job['job_name']]}"]}]
    path = stack.dir / "prometheus" / "prometheus.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def prometheus_start(stack: Stack) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        raise StackError("prometheus is not installed: apt-get install prometheus")
    config = prometheus_config(stack)
    spawn(
        stack,
        "prometheus",
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={stack.dir / 'prometheus' / 'data'}",
            f"--web.listen-address={HOST}:{stack.prometheus_port}",
            "--web.enable-lifecycle",
        ],
    )


def prometheus_ready(stack: Stack) -> bool:
    return http_ok(f"http://{HOST}:{stack.prometheus_port}/-/ready")


@dataclass(frozen=True)
class Service:
    start: Callable[[Stack], None]
    ready: Callable[[Stack], bool]
    timeout_s: float
    stop: Callable[[Stack], None] | None = None


def _stopper(name: str) -> Callable[[Stack], None]:
    return lambda stack: terminate(stack, name)


REGISTRY: dict[str, Service] = {
    "postgres": Service(
        postgres_up, lambda s: _pg_query(s, "dagster", "SELECT 1"), 60, postgres_down
    ),
    "mlflow": Service(mlflow_start, mlflow_ready, 180),
    "triton": Service(triton_start, triton_ready, 300, triton_stop),
    "metrics": Service(metrics_start, metrics_ready, 60),
    "code_server": Service(code_server_start, code_server_ready, 240),
    "webserver": Service(webserver_start, webserver_ready, 240),
    "daemon": Service(daemon_start, daemon_ready, 240),
    "prometheus": Service(prometheus_start, prometheus_ready, 60),
    "app": Service(app_start, app_ready, 120),
}


def stop_service(stack: Stack, name: str) -> None:
    service = REGISTRY[name]
    (service.stop or _stopper(name))(stack)


def wait_ready(stack: Stack, name: str) -> None:
    service = REGISTRY[name]
    log = stack.pg_dir / "server.log" if name == "postgres" else stack.log(name)
    # services this script keeps a process for fail fast when that process exits
    watched = name not in ("postgres", "triton")
    wait_until(
        name,
        lambda: service.ready(stack),
        service.timeout_s,
        log,
        alive=lambda: not watched or running_pid(stack, name) is not None,
    )


def prepare(stack: Stack) -> None:
    for sub in ("logs", "run", "dagster_home"):
        (stack.dir / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "configs" / "stack" / "dagster.yaml", stack.dagster_home / "dagster.yaml")
    env_file = stack.dir / "stack.env"
    descriptor = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(render_env(stack))


def render_env(stack: Stack) -> str:
    return "".join(f"export {key}='{value}'\n" for key, value in stack.client_env().items())


def up(stack: Stack) -> dict[str, float]:
    """Start every service (PostgreSQL first, the webserver and daemon after the code server);
    returns the seconds from the start to each service's readiness."""
    started = time.monotonic()
    prepare(stack)
    ready_at: dict[str, float] = {}

    def mark(name: str) -> None:
        ready_at[name] = round(time.monotonic() - started, 1)
        print(f"{name:12s} ready after {ready_at[name]:6.1f} s", flush=True)

    if not REGISTRY["postgres"].ready(stack):
        postgres_up(stack)
    mark("postgres")
    # Independent of each other: start together, then wait for each.
    parallel = ("mlflow", "triton", "metrics", "code_server", "prometheus", "app")
    for name in parallel:
        if not REGISTRY[name].ready(stack):
            REGISTRY[name].start(stack)
    wait_ready(stack, "code_server")
    mark("code_server")
    for name in ("webserver", "daemon"):
        if not REGISTRY[name].ready(stack):
            REGISTRY[name].start(stack)
    for name in ("mlflow", "triton", "metrics", "prometheus", "webserver", "daemon", "app"):
        wait_ready(stack, name)
        mark(name)
    ready_at["total"] = round(time.monotonic() - started, 1)
    print(f"{'all':12s} ready after {ready_at['total']:6.1f} s", flush=True)
    return ready_at


def down(stack: Stack) -> None:
    """Signal every process the script started at once (each takes seconds to drain), wait for
    them, then stop Triton and, last, PostgreSQL."""
    own = [name for name in reversed(SERVICES) if name not in ("triton", "postgres")]
    for name in own:
        pid = running_pid(stack, name)
        if pid is not None:
            os.killpg(pid, signal.SIGTERM)
    for name in own:
        terminate(stack, name)
    stop_service(stack, "triton")
    stop_service(stack, "postgres")


def status(stack: Stack) -> dict[str, bool]:
    return {name: REGISTRY[name].ready(stack) for name in SERVICES}


def restart(stack: Stack, name: str) -> float:
    """Stop ``name``, start it again and wait until it is ready; returns the seconds it took."""
    started = time.monotonic()
    stop_service(stack, name)
    REGISTRY[name].start(stack)
    wait_ready(stack, name)
    return round(time.monotonic() - started, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack.sh", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start every service and wait until each is ready")
    sub.add_parser("down", help="stop every service (state stays in the stack folder)")
    sub.add_parser("status", help="which services answer; exit 1 if any does not")
    sub.add_parser("env", help="print the client variables as shell exports")
    again = sub.add_parser("restart", help="restart one service")
    again.add_argument("service", choices=SERVICES)
    args = parser.parse_args(argv)
    stack = Stack.from_env()
    try:
        if args.command == "up":
            try:
                up(stack)
            except BaseException:
                print(f"up failed; logs in {stack.dir / 'logs'}", file=sys.stderr)
                raise
            print(
                f"Dagster UI http://{HOST}:{stack.webserver_port}  MLflow http://{HOST}:"
                f"{stack.mlflow_port}  Prometheus http://{HOST}:{stack.prometheus_port}"
            )
            print(f"Client variables: source {stack.dir / 'stack.env'}")
        elif args.command == "down":
            down(stack)
        elif args.command == "status":
            states = status(stack)
            for name, ok in states.items():
                print(f"{name:12s} {'ready' if ok else 'DOWN'}")
            return 0 if all(states.values()) else 1
        elif args.command == "env":
            print(render_env(stack), end="")
        elif args.command == "restart":
            print(f"{args.service} ready again after {restart(stack, args.service)} s")
    except StackError as error:
        print(f"stack.sh {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
