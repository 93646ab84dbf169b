"""Serving survives crashes: tritonserver killed with SIGKILL under load, five times, loses no
record of a request it answered, and ``start`` (after kills 1-4) and ``stop`` (after kill 5) remove the orphaned python-backend stubs
and ``/dev/shm`` regions of their own repository, and nothing of anyone else's. Also measures what
durable capture costs (medians printed; run with ``-s`` to see them)."""

from __future__ import annotations

import importlib.util
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import types
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cifar_assets.serving import capture, launcher, repository
from cifar_assets.serving.client import infer_ab
from cifar_assets.serving.launcher import TritonServer, remove_orphans, shm_family, stop_and_clean
from cifar_assets.serving.loadtest import run_load
from tests.serving_fixtures import ServingEnv, copy_repository, start_serving

KILLS = 5
ROUTER_MODEL = Path(repository.ROUTER_TEMPLATE)


def _stubs_of(repo: Path) -> list[int]:
    """Live python-backend stubs whose region belongs to ``repo``'s servers."""
    family = shm_family(repo)
    return [
        pid
        for pid, command in launcher._processes()
        if Path(command[0]).name == launcher.STUB_NAME
        and len(command) > 2
        and command[2].startswith(family)
    ]


def _regions_of(repo: Path) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(shm_family(repo)))


class Traffic:
    """Router requests from three threads (gRPC and HTTP, 1-3 images, uint8 and float) until
    stopped; keeps the request id and served version of every request answered 200."""

    def __init__(self, env: ServingEnv) -> None:
        self.env = env
        self.acknowledged: dict[str, tuple[int, int]] = {}  # id -> (served version, images)
        self.refused = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(index,), daemon=True) for index in range(3)
        ]

    def _run(self, index: int) -> None:
        rng = np.random.default_rng(index)
        protocol: Any = "http" if index == 2 else "grpc"
        url = self.env.http_url if protocol == "http" else self.env.grpc_url
        while not self.stop.is_set():
            images = rng.integers(0, 256, size=(1 + index, 32, 32, 3), dtype=np.uint8)
            request_id = uuid.uuid4().hex
            try:
                result = infer_ab(
                    images,
                    f"user-{request_id[:6]}",
                    url=url,
                    protocol=protocol,
                    request_id=request_id,
                )
            except Exception:  # a dead server fails in many ways: refused, reset, 503
                with self.lock:
                    self.refused += 1
                time.sleep(0.005)
                continue
            with self.lock:
                self.acknowledged[request_id] = (result.served_version, len(images))

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


@pytest.mark.slow
def test_kill_9_under_load_loses_no_acknowledged_record_and_leaves_no_orphan(
    tmp_path: Path, onnx_models: dict[int, Path]
) -> None:
    env = start_serving(tmp_path, onnx_models, sample_rate=0.1)
    orphans_seen: list[tuple[list[int], list[str]]] = []
    traffic = Traffic(env)
    try:
        with traffic:
            for kill in range(1, KILLS + 1):
                before = len(traffic.acknowledged)
                deadline = time.monotonic() + 30
                while len(traffic.acknowledged) < before + 150 and time.monotonic() < deadline:
                    time.sleep(0.05)
                process = env.server.process
                assert process is not None
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                time.sleep(0.5)  # requests in flight fail now
                found = (_stubs_of(env.repo), _regions_of(env.repo))
                if kill < KILLS:
                    env.server = TritonServer(env.config).start()
                    removed = env.server.orphans_removed
                else:  # `cifar-triton stop` after the last kill: nothing runs, orphans go
                    env.server.process = None
                    running, removed = stop_and_clean(env.config)
                    assert not running and not env.config.pid_path.exists()
                assert sorted(removed.stubs) == sorted(found[0])
                assert set(found[1]) <= set(removed.regions)
                assert not set(found[0]) & set(_stubs_of(env.repo))
                orphans_seen.append((removed.stubs, removed.regions))
    finally:
        env.server.stop()
    frame = capture.read_capture(env.capture_dir)
    captured = frame.groupby("request_id")
    acknowledged = traffic.acknowledged
    missing = [rid for rid in acknowledged if rid not in captured.groups]
    wrong = [
        rid
        for rid, (version, images) in acknowledged.items()
        if rid in captured.groups
        and (
            set(captured.get_group(rid)["served_version"]) != {version}
            or len(captured.get_group(rid)) != images
        )
    ]
    unanswered = len(set(frame["request_id"]) - set(acknowledged))
    print(
        f"\n{KILLS} kill -9 under load: {len(acknowledged)} answered 200, {len(frame)} images "
        f"captured, {len(missing)} answered but missing, {unanswered} captured but never "
        f"answered (killed in between), {traffic.refused} failed while the server was down; "
        f"orphans removed at each restart: "
        f"{[(len(stubs), len(regions)) for stubs, regions in orphans_seen]} (stubs, regions)"
    )
    assert len(acknowledged) >= KILLS * 150
    assert missing == [] and wrong == []
    assert any(stubs for stubs, _ in orphans_seen), "no kill left an orphaned stub to remove"
    assert _stubs_of(env.repo) == [] and _regions_of(env.repo) == []


def _fake(argv0: Path, script: Path, *args: str) -> subprocess.Popen[bytes]:
    """A process whose command line reads ``argv0 script args...`` (Python runs ``script``)."""
    argv0.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([str(argv0), str(script), *args], executable=sys.executable)


def test_remove_orphans_touches_only_its_own_repository(tmp_path: Path) -> None:
    repo = copy_repository(tmp_path / "ours")
    other = copy_repository(tmp_path / "theirs")
    ours, theirs = shm_family(repo), shm_family(other)
    assert ours != theirs and ours.startswith("cifar-")
    sleeper = "import time\ntime.sleep(120)\n"
    for folder in (repo, other):
        (folder / "cifar10_ab" / "1").mkdir(exist_ok=True)
        (folder / "cifar10_ab" / "1" / "model.py").write_text(sleeper)
    stub = tmp_path / "bin" / launcher.STUB_NAME
    server = tmp_path / "bin" / "tritonserver"
    live = f"{ours}live0000-"
    regions = {
        "orphan": f"{ours}dead0000-{uuid.uuid4()}",
        "live": f"{live}{uuid.uuid4()}",
        "theirs": f"{theirs}dead0000-{uuid.uuid4()}",
        "unrelated": f"cifar-test-unrelated-{uuid.uuid4()}",
    }
    processes = {
        "orphan": _fake(stub, repo / "cifar10_ab/1/model.py", regions["orphan"], "1", "2", "1"),
        "live stub": _fake(stub, repo / "cifar10_ab/1/model.py", regions["live"], "1", "2", "1"),
        "live server": _fake(
            server, repo / "cifar10_ab/1/model.py", f"{launcher.SHM_PREFIX_OPTION}{live}"
        ),
        "their orphan": _fake(
            stub, other / "cifar10_ab/1/model.py", regions["theirs"], "1", "2", "1"
        ),
        # Our region name, but a model outside the repository: not ours to judge.
        "elsewhere": _fake(
            stub, other / "cifar10_ab/1/model.py", f"{ours}dead0001-x", "1", "2", "1"
        ),
        "not a stub": _fake(
            tmp_path / "bin" / "python3", repo / "cifar10_ab/1/model.py", regions["orphan"]
        ),
    }
    for name in regions.values():
        (Path("/dev/shm") / name).write_bytes(b"\0" * 64)
    try:
        deadline = time.monotonic() + 10
        while not all(Path(f"/proc/{p.pid}/cmdline").read_bytes() for p in processes.values()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        removed = remove_orphans(repo)
        assert removed.stubs == [processes["orphan"].pid]
        assert processes["orphan"].wait(10) == -signal.SIGKILL
        assert removed.regions == [regions["orphan"]]
        for name, process in processes.items():
            if name != "orphan":
                assert process.poll() is None, name
        for name in ("live", "theirs", "unrelated"):
            assert (Path("/dev/shm") / regions[name]).exists(), name
        assert remove_orphans(repo).stubs == []
    finally:
        for process in processes.values():
            process.kill()
            process.wait()
        for name in regions.values():
            (Path("/dev/shm") / name).unlink(missing_ok=True)


def _router_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The router's model.py outside Triton (its capture writer needs no pb_utils)."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("pb_utils"))
    spec = importlib.util.spec_from_file_location("ab_router_model_under_test", ROUTER_MODEL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_capture_writer_hands_records_to_the_kernel_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    router = _router_module(monkeypatch)
    labels = [f"class-{i}" for i in range(10)]
    timings: dict[str, float] = {}
    for fsync in router.FSYNC_MODES:
        writer = router.CaptureWriter(tmp_path / fsync, 0.0, labels, fsync)
        spent = []
        for number in range(300):
            entry = {
                "time": "2026-01-01T00:00:00.000+00:00",
                "request_id": f"r{number}",
                "user_id": "u",
                "version": 1,
                "logits": np.random.default_rng(number).normal(size=(1, 10)).astype(np.float32),
                "latency_ms": 1.0,
            }
            began = time.perf_counter()
            writer.write(writer.rows(entry))
            spent.append((time.perf_counter() - began) * 1e6)
            # Visible to any reader (the kernel has it) before write() returns.
            assert writer.records_path.read_bytes().count(b"\n") == number + 1
        writer.close()
        timings[fsync] = statistics.median(spent)
        assert len(capture.read_capture(tmp_path / fsync)) == 300
    print(
        "\ncapture cost per batch-1 request inside the router (format + write), median: "
        + ", ".join(f"capture_fsync={mode}: {us:.0f} us" for mode, us in timings.items())
    )
    # A full disk: records are kept for the next batch, not lost, and serving goes on.
    writer = router.CaptureWriter(tmp_path / "full", 0.0, labels, "interval")
    real_write = os.write

    def disk_full(descriptor: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(router.os, "write", disk_full)
    entry = {
        "time": "2026-01-01T00:00:00.000+00:00",
        "request_id": "kept",
        "user_id": None,
        "version": 1,
        "logits": np.zeros((2, 10), np.float32),
        "latency_ms": 1.0,
    }
    writer.write(writer.rows(entry))
    assert writer.pending and writer.records_path.read_bytes() == b""
    monkeypatch.setattr(router.os, "write", real_write)
    writer.write([])
    writer.close()
    assert list(capture.read_capture(tmp_path / "full")["request_id"]) == ["kept", "kept"]


@pytest.mark.slow
def test_latency_cost_of_durable_capture(tmp_path: Path, onnx_models: dict[int, Path]) -> None:
    """Batch-1 p50 of the classifier called directly (no capture) against the router with each
    fsync policy, in alternating rounds on one server."""
    env = start_serving(tmp_path, onnx_models, sample_rate=0.1)
    medians: dict[str, list[float]] = {"direct": [], "interval": [], "batch": []}
    try:
        repository.set_ab_weights({1: 1.0}, state_dir=env.state_dir)
        for _ in range(3):
            for path in medians:
                if path != "direct":
                    repository.load_router(
                        env.http_url,
                        repo=env.repo,
                        state_dir=env.state_dir,
                        capture_dir=env.capture_dir,
                        capture_input_sample_rate=0.1,
                        capture_fsync=path,
                    )
                model = repository.MODEL_NAME if path == "direct" else repository.ROUTER_NAME
                report = run_load(
                    env.grpc_url,
                    "grpc",
                    model,
                    version=1 if path == "direct" else None,
                    threads=1,
                    duration_s=2.0,
                )
                assert report.failed == 0, report.failures
                medians[path].append(report.median_ms)
    finally:
        env.server.stop()
    summary = {path: statistics.median(values) for path, values in medians.items()}
    print(
        "\nbatch-1 gRPC p50 ms (median of 3 rounds of 2 s): "
        + ", ".join(f"{path} {ms:.2f}" for path, ms in summary.items())
        + f"; router/direct: interval {summary['interval'] / summary['direct']:.2f}, "
        f"batch {summary['batch'] / summary['direct']:.2f}"
    )
    assert all(ms > 0 for ms in summary.values())
