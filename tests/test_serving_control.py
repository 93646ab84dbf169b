"""Model control is locked: on a real tritonserver, the repository API (load, unload, index) and
the other control APIs refuse requests without the key, over HTTP and gRPC, and answer the
project's own calls, which send it. The key lives in a 0600 file or the environment, never on
disk where others can read it."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cifar_assets.serving import repository
from cifar_assets.serving.client import infer, infer_ab, wait_until_ready
from cifar_assets.serving.launcher import read_pid_file
from tests.serving_fixtures import PROJECT_ROOT, ServingEnv

pytestmark = pytest.mark.slow
IMAGE = np.random.default_rng(11).integers(0, 256, size=(1, 32, 32, 3), dtype=np.uint8)
# The attack the issue found: a load whose override brings its own model.py runs that code.
EVIL_MODEL = b"import os\nos.system('touch /tmp/cifar-control-test-pwned')\n"


def _post(
    env: ServingEnv, path: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://{env.http_url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _ready(env: ServingEnv, model: str) -> bool:
    import tritonclient.http as httpclient

    return bool(httpclient.InferenceServerClient(env.http_url).is_model_ready(model))


def _router_config(env: ServingEnv) -> str:
    import tritonclient.http as httpclient

    return json.dumps(httpclient.InferenceServerClient(env.http_url).get_model_config("cifar10_ab"))


def test_http_control_without_the_key_is_refused(triton_server: ServingEnv) -> None:
    env = triton_server
    good_key = repository.control_key(env.state_dir)
    evil = {
        "parameters": {
            "config": _router_config(env),
            "file:1/model.py": base64.b64encode(EVIL_MODEL).decode(),
        }
    }
    attempts = {
        "index": ("/v2/repository/index", {}),
        "unload": ("/v2/repository/models/cifar10_resnet18/unload", {}),
        "load": ("/v2/repository/models/cifar10_ab/load", evil),
        "shared memory": (
            "/v2/systemsharedmemory/region/probe/register",
            {"key": "/probe", "offset": 0, "byte_size": 64},
        ),
        "logging": ("/v2/logging", {"log_verbose_level": 1}),
        "trace": ("/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]}),
    }
    for what, (path, body) in attempts.items():
        for headers in ({}, {repository.CONTROL_HEADER: "x" + good_key[1:]}):
            status, text = _post(env, path, body, headers)
            assert status == 403, (what, status, text)
            assert "This API is restricted, expecting header 'cifar-control-key'" in text, text
    assert not Path("/tmp/cifar-control-test-pwned").exists()
    assert _ready(env, "cifar10_resnet18") and _ready(env, "cifar10_ab")
    # Inference, health, metadata, statistics and model config stay open.
    assert infer_ab(IMAGE, "user-1", url=env.http_url).served_version in (1, 2)
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(env.http_url)
    assert client.get_model_metadata("cifar10_resnet18")["name"] == "cifar10_resnet18"
    assert client.get_inference_statistics("cifar10_resnet18")["model_stats"]


def test_grpc_control_without_the_key_is_refused(triton_server: ServingEnv) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    env = triton_server
    client = grpcclient.InferenceServerClient(env.grpc_url)
    wrong = {repository.GRPC_CONTROL_HEADER: "not-the-key-not-the-key"}
    calls = {
        "index": lambda headers: client.get_model_repository_index(headers=headers),
        "unload": lambda headers: client.unload_model("cifar10_resnet18", headers=headers),
        "load": lambda headers: client.load_model("cifar10_ab", headers=headers),
        "shared memory": lambda headers: client.register_system_shared_memory(
            "probe", "/probe", 64, headers=headers
        ),
    }
    for what, call in calls.items():
        for headers in (None, wrong):
            with pytest.raises(InferenceServerException) as refused:
                call(headers)
            assert refused.value.status() == "StatusCode.UNAVAILABLE", what
            assert "This protocol is restricted, expecting header " in refused.value.message()
            assert repository.GRPC_CONTROL_HEADER in refused.value.message()
    assert _ready(env, "cifar10_resnet18") and _ready(env, "cifar10_ab")
    assert infer(IMAGE, url=env.grpc_url, protocol="grpc", version=1).shape == (1, 10)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_load_and_unload_with_the_key_work(triton_server: ServingEnv, protocol: str) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    env = triton_server
    module: Any = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(env.http_url if protocol == "http" else env.grpc_url)
    headers = repository.control_headers(env.state_dir, protocol)
    index = client.get_model_repository_index(headers=headers)
    names = [m["name"] for m in index] if protocol == "http" else [m.name for m in index.models]
    assert sorted(set(names)) == ["cifar10_ab", "cifar10_resnet18"]
    client.unload_model("cifar10_ab", headers=headers)
    try:
        deadline = time.monotonic() + 5.0
        while _ready(env, "cifar10_ab") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _ready(env, "cifar10_ab")
    finally:
        # The project's own call: repository._load sends the header for the client it is given.
        repository.load_router(
            client,
            repo=env.repo,
            state_dir=env.state_dir,
            capture_dir=env.capture_dir,
            capture_input_sample_rate=env.config.capture_input_sample_rate,
        )
    wait_until_ready(env.http_url, models=["cifar10_ab"], timeout_s=30)
    repository.set_live_versions(client, [1, 2], repo=env.repo, state_dir=env.state_dir)
    assert infer_ab(IMAGE, "user-1", url=env.http_url).served_version in (1, 2)


def test_a_key_the_server_was_not_started_with_is_named(
    triton_server: ServingEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = triton_server
    monkeypatch.setenv(repository.CONTROL_KEY_ENV, "another-key-another-key")
    assert repository.control_key(env.state_dir) == "another-key-another-key"
    with pytest.raises(repository.RepositoryError, match="model-control key was not accepted"):
        repository.set_live_versions(env.http_url, [1, 2], repo=env.repo, state_dir=env.state_dir)
    monkeypatch.setenv(repository.CONTROL_KEY_ENV, "short")
    with pytest.raises(repository.RepositoryError, match="16-256 characters"):
        repository.control_key(env.state_dir)


def test_key_file_is_private_and_never_leaves_it(triton_server: ServingEnv) -> None:
    env = triton_server
    path = env.state_dir / repository.CONTROL_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text().strip()
    assert key == repository.control_key(env.state_dir) and len(key) >= 32
    # Not in the pid file, the status, the log or the settings' repr.
    assert key not in json.dumps(read_pid_file(env.state_dir))
    assert key not in env.config.log_path.read_text()
    from cifar_assets.settings import get_settings

    assert "control_key" not in repr(get_settings())
    # The default location is under var/, which git ignores.
    assert "var/" in (PROJECT_ROOT / ".gitignore").read_text().split()


def test_key_file_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(repository.CONTROL_KEY_ENV, raising=False)
    with pytest.raises(repository.RepositoryError, match="cifar-triton start"):
        repository.control_key(tmp_path)
    old_umask = os.umask(0)
    try:
        key = repository.ensure_control_key(tmp_path / "state")
    finally:
        os.umask(old_umask)
    path = tmp_path / "state" / repository.CONTROL_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert repository.ensure_control_key(tmp_path / "state") == key  # kept, not rewritten
    path.chmod(0o644)
    with pytest.raises(repository.RepositoryError, match=f"chmod 600 {path}"):
        repository.control_key(tmp_path / "state")
    path.unlink()
    elsewhere = tmp_path / "elsewhere.key"
    elsewhere.write_text(key)
    elsewhere.chmod(0o600)
    path.symlink_to(elsewhere)
    with pytest.raises(repository.RepositoryError, match="regular file owned by you"):
        repository.control_key(tmp_path / "state")
    monkeypatch.setenv(repository.CONTROL_KEY_ENV, "from-the-environment-1234")
    assert repository.ensure_control_key(tmp_path / "fresh") == "from-the-environment-1234"
    assert not (tmp_path / "fresh" / repository.CONTROL_KEY_FILE).exists()
    assert repository.control_headers(tmp_path, "grpc") == {
        "triton-grpc-protocol-cifar-control-key": "from-the-environment-1234"
    }
