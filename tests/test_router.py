"""The A/B router on a real tritonserver: weighted sticky split, weight changes and deployment
under load without failed requests, the two execution modes (inprocess and bls) answering alike,
unloaded versions refused and rewritten model files picked up, traffic capture and feedback, and a
stop that loses nothing.

The tests share one server and run in file order; each leaves versions 1 and 2 live with weights
{1: 0.9, 2: 0.1}, as the fixture started them.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cifar_assets.ml.model import normalise_uint8
from cifar_assets.ml.onnx_export import add_uint8_input
from cifar_assets.serving import capture, repository
from cifar_assets.serving.client import ServingError, infer_ab
from cifar_assets.serving.launcher import TritonServer
from cifar_assets.serving.loadtest import run_load
from tests.serving_fixtures import ServingEnv, ort_logits

pytestmark = pytest.mark.slow
IMAGE = np.random.default_rng(3).integers(0, 256, size=(1, 32, 32, 3), dtype=np.uint8)


def _route(env: ServingEnv, users: list[str], threads: int = 8) -> dict[str, list[int]]:
    """user -> versions that served each of its requests, in order."""

    def one(user: str) -> tuple[str, int]:
        return user, infer_ab(IMAGE, user, url=env.grpc_url, protocol="grpc").served_version

    served: dict[str, list[int]] = {}
    with ThreadPoolExecutor(threads) as pool:
        for user, version in pool.map(one, users):
            served.setdefault(user, []).append(version)
    return served


def test_split_follows_weights_and_is_sticky_per_user(triton_server: ServingEnv) -> None:
    users = [f"user-{i}" for i in range(2000)]
    first = _route(triton_server, users)
    counts = Counter(versions[0] for versions in first.values())
    assert set(counts) == {1, 2}
    # Binomial(2000, 0.1) for version 2: mean 200, sd 13.4.
    z = (counts[2] - 200) / math.sqrt(2000 * 0.1 * 0.9)
    assert abs(z) < 3.5, counts
    again = _route(triton_server, users[:150] * 2)
    for user, versions in again.items():
        assert versions == [first[user][0]] * 2, user


def _hash_fraction(key: str) -> float:
    """The router's documented rule: the first 8 bytes of sha256, as a fraction of 2**64."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def test_router_answers_with_the_served_versions_logits(triton_server: ServingEnv) -> None:
    images = np.random.default_rng(4).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    # Weights {1: 0.9, 2: 0.1}: users hashing below 0.9 belong to version 1, the rest to 2.
    users = [f"user-{i}" for i in range(100)]
    chosen = [u for u in users if _hash_fraction(u) < 0.9][:2]
    chosen += [u for u in users if _hash_fraction(u) >= 0.9][:2]
    for user in chosen:
        version = 1 if _hash_fraction(user) < 0.9 else 2
        for protocol, url in (("http", triton_server.http_url), ("grpc", triton_server.grpc_url)):
            result = infer_ab(images, user, url=url, protocol=protocol)  # type: ignore[arg-type]
            assert result.served_version == version
            expected = ort_logits(triton_server.onnx[version], normalise_uint8(images))
            np.testing.assert_allclose(result.logits, expected, rtol=1e-5, atol=1e-5)


def test_requests_without_user_are_spread_by_the_weights(triton_server: ServingEnv) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    tensor = grpcclient.InferInput("images_uint8", [1, 32, 32, 3], "UINT8")
    tensor.set_data_from_numpy(IMAGE)
    served = Counter(
        int(client.infer(repository.ROUTER_NAME, [tensor]).as_numpy("served_version")[0, 0])
        for _ in range(300)
    )
    # A golden-ratio counter spreads consecutive requests almost exactly by the weights.
    assert abs(served[2] - 30) <= 4, served


def test_weights_change_without_restart(triton_server: ServingEnv) -> None:
    users = [f"user-{i}" for i in range(40)]
    before = _route(triton_server, users)
    repository.set_ab_weights({2: 1.0}, state_dir=triton_server.state_dir)
    try:
        after = _route(triton_server, users)
        assert all(versions == [2] for versions in after.values())
    finally:
        repository.set_ab_weights({1: 0.9, 2: 0.1}, state_dir=triton_server.state_dir)
    assert _route(triton_server, users) == before


def test_router_rejects_bad_requests_and_missing_weights(triton_server: ServingEnv) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(triton_server.http_url)
    images = httpclient.InferInput("images_uint8", [1, 32, 32, 3], "UINT8")
    images.set_data_from_numpy(IMAGE)
    floats = httpclient.InferInput("input", [1, 3, 32, 32], "FP32")
    floats.set_data_from_numpy(normalise_uint8(IMAGE))
    with pytest.raises(InferenceServerException, match="exactly one of the inputs") as raised:
        client.infer(repository.ROUTER_NAME, [images, floats])
    assert raised.value.status() == "400"

    with pytest.raises(ServingError, match="NaN or infinite") as nan:
        infer_ab(np.full((1, 3, 32, 32), np.nan, np.float32), "user-1", url=triton_server.http_url)
    assert nan.value.status == "400"

    weights = triton_server.state_dir / repository.AB_WEIGHTS_FILE
    kept = weights.read_text()
    try:
        weights.unlink()
        with pytest.raises(ServingError, match="no A/B weights at"):
            infer_ab(IMAGE, "user-1", url=triton_server.http_url)
        # A file with nothing usable keeps the weights already in use.
        weights.write_text('{"weights": {"1": 0}}')
        expected = 1 if _hash_fraction("user-1") < 0.9 else 2
        assert infer_ab(IMAGE, "user-1", url=triton_server.http_url).served_version == expected
        # Written by hand, past set_ab_weights' check that versions are live.
        weights.write_text('{"weights": {"7": 1.0}}')
        with pytest.raises(ServingError, match="version 7: that version is not live") as down:
            infer_ab(IMAGE, "user-1", url=triton_server.http_url)
        assert down.value.status == "503"
    finally:
        weights.write_text(kept)
    assert infer_ab(IMAGE, "user-1", url=triton_server.http_url).served_version in (1, 2)


def test_deploying_a_version_under_load_fails_no_request(triton_server: ServingEnv) -> None:
    env, state, repo = triton_server, triton_server.state_dir, triton_server.repo
    stop = threading.Event()
    reports = []
    load = threading.Thread(
        target=lambda: reports.append(run_load(env.grpc_url, "grpc", threads=2, stop=stop))
    )
    load.start()
    try:
        time.sleep(1.0)
        repository.write_version(repo, env.onnx[1], 3, {"run_id": "run-3"})
        repository.set_live_versions(env.http_url, [1, 2, 3], repo=repo, state_dir=state)
        repository.set_ab_weights({1: 0.5, 3: 0.5}, state_dir=state)
        time.sleep(1.0)
        repository.set_ab_weights({3: 1.0}, state_dir=state)
        repository.set_live_versions(env.http_url, [3], repo=repo, state_dir=state)
        time.sleep(1.0)
    finally:
        stop.set()
        load.join()
    [report] = reports
    assert report.failed == 0, report.failures.most_common(3)
    assert report.served_versions[1] > 0 and report.served_versions[3] > 0
    assert report.succeeded > 20
    assert infer_ab(IMAGE, "anyone", url=env.http_url).served_version == 3

    repository.set_live_versions(env.http_url, [1, 2, 3], repo=repo, state_dir=state)
    repository.set_ab_weights({1: 0.9, 2: 0.1}, state_dir=state)
    repository.set_live_versions(env.http_url, [1, 2], repo=repo, state_dir=state)


def _users_of(version: int, count: int) -> list[str]:
    """Users that weights {1: 0.9, 2: 0.1} send to ``version``."""
    users = (f"user-{i}" for i in range(10_000))
    return [u for u in users if (_hash_fraction(u) < 0.9) == (version == 1)][:count]


def _load_router(env: ServingEnv, execution: str | None) -> None:
    repository.load_router(
        env.http_url,
        repo=env.repo,
        state_dir=env.state_dir,
        capture_dir=env.capture_dir,
        capture_input_sample_rate=env.config.capture_input_sample_rate,
        execution=execution,
    )


def _is_refused(user: str, url: str, errors: list[ServingError]) -> bool:
    """True (and the error kept) when the router refuses ``user``'s request."""
    try:
        infer_ab(IMAGE, user, url=url)
    except ServingError as exc:
        errors.append(exc)
        return True
    return False


def _wait_until(check: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """Poll ``check()`` until it is true; the router re-checks versions at least once a second."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.1)


def test_load_router_refuses_an_unknown_execution_mode(triton_server: ServingEnv) -> None:
    kept = repository.read_router_execution(triton_server.state_dir)
    with pytest.raises(repository.RepositoryError, match="use one of inprocess, bls"):
        _load_router(triton_server, "remote")
    assert repository.read_router_execution(triton_server.state_dir) == kept


def test_a_damaged_router_mode_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / repository.ROUTER_EXECUTION_FILE
    assert repository.read_router_execution(tmp_path) is None
    path.write_text("{not json")
    with pytest.raises(repository.RepositoryError, match=r"router_execution\.json is unreadable"):
        repository.read_router_execution(tmp_path)
    path.write_text('{"execution": "remote"}')
    with pytest.raises(repository.RepositoryError, match="names router execution 'remote'"):
        repository.read_router_execution(tmp_path)


def test_inprocess_and_bls_answer_with_identical_logits(triton_server: ServingEnv) -> None:
    env = triton_server
    images = np.random.default_rng(8).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    payloads = {"uint8": images, "float": normalise_uint8(images)}
    users = {version: _users_of(version, 2) for version in (1, 2)}

    def answers() -> dict[tuple[int, str, str, str], tuple[int, np.ndarray]]:
        out = {}
        for version, names in users.items():
            for user in names:
                for kind, payload in payloads.items():
                    for protocol, url in (("http", env.http_url), ("grpc", env.grpc_url)):
                        result = infer_ab(payload, user, url=url, protocol=protocol)  # type: ignore[arg-type]
                        out[version, user, kind, protocol] = (result.served_version, result.logits)
        return out

    import tritonclient.http as httpclient

    def loaded_mode() -> str:
        config = httpclient.InferenceServerClient(env.http_url).get_model_config(
            repository.ROUTER_NAME
        )
        return str(config["parameters"]["execution"]["string_value"])

    inprocess = answers()
    _load_router(env, "bls")
    try:
        assert repository.read_router_execution(env.state_dir) == "bls"
        # What `cifar-triton start` does after a restart: no mode given, the kept one loads.
        repository.restore_models(
            env.http_url, repo=env.repo, state_dir=env.state_dir, capture_dir=env.capture_dir
        )
        assert loaded_mode() == "bls"
        bls = answers()
    finally:
        _load_router(env, "inprocess")  # back to the default, for the other tests
    assert loaded_mode() == "inprocess"
    assert repository.read_router_execution(env.state_dir) == "inprocess"
    for key, (served, logits) in inprocess.items():
        version = key[0]
        assert served == bls[key][0] == version, key
        # Same file, same ONNX Runtime options, same normalisation: the same bits.
        np.testing.assert_array_equal(logits, bls[key][1], err_msg=str(key))
        expected = ort_logits(env.onnx[version], normalise_uint8(images))
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)

    # Concurrent requests of both versions and both inputs share dynamic batches: one ONNX
    # Runtime call per version, split back per request.
    jobs = [
        (user, kind, version)
        for version, names in users.items()
        for user in names
        for kind in payloads
    ] * 4
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda job: infer_ab(payloads[job[1]], job[0], url=env.grpc_url, protocol="grpc"),
                jobs,
            )
        )
    for (_, _, version), result in zip(jobs, results, strict=True):
        assert result.served_version == version
        expected = ort_logits(env.onnx[version], normalise_uint8(images))
        np.testing.assert_allclose(result.logits, expected, rtol=1e-5, atol=1e-5)


def _serve_versions_directly(env: ServingEnv, versions: list[int]) -> None:
    """Reload cifar10_resnet18 with only ``versions``, past set_live_versions' weight check
    (as an operator's unload during a rollback would)."""
    import tritonclient.http as httpclient
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    text = (env.repo / repository.MODEL_NAME / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    config.version_policy.specific.versions[:] = versions
    httpclient.InferenceServerClient(env.http_url).load_model(
        repository.MODEL_NAME,
        config=json_format.MessageToJson(config, preserving_proto_field_name=True),
        headers=repository.control_headers(env.state_dir),
    )


def test_a_version_unloaded_from_triton_is_no_longer_served(triton_server: ServingEnv) -> None:
    env = triton_server
    [on_one], [on_two] = _users_of(1, 1), _users_of(2, 1)
    assert infer_ab(IMAGE, on_two, url=env.http_url).served_version == 2
    refused: list[ServingError] = []

    def two_is_refused() -> bool:
        return _is_refused(on_two, env.http_url, refused)

    _serve_versions_directly(env, [1])  # the weights still send 10 % to version 2
    try:
        _wait_until(two_is_refused, "the router refuses version 2 once Triton unloaded it")
        assert refused[0].status == "503"
        message = str(refused[0])
        assert "cifar10_resnet18 version 2: that version is not live" in message
        assert "set weights for live versions with set_ab_weights" in message
        assert infer_ab(IMAGE, on_one, url=env.http_url).served_version == 1
    finally:
        repository.set_live_versions(env.http_url, [1, 2], repo=env.repo, state_dir=env.state_dir)
    _wait_until(
        lambda: infer_ab(IMAGE, on_two, url=env.http_url).served_version == 2,
        "version 2 is served again once it is live",
    )


def test_a_rewritten_model_file_is_picked_up(triton_server: ServingEnv) -> None:
    env = triton_server
    [user] = _users_of(2, 1)
    # The file the router runs: write_version derives it from model.onnx.
    served_file = env.repo / repository.MODEL_NAME / "2" / repository.SERVING_ONNX
    serving_files = {}
    for version in (1, 2):
        serving_files[version] = env.repo / f"serving-{version}.onnx"
        add_uint8_input(env.onnx[version], serving_files[version])
    expected = {v: ort_logits(env.onnx[v], normalise_uint8(IMAGE)) for v in (1, 2)}

    def replace_with(source: Path) -> None:
        tmp = served_file.with_name(".model.onnx.tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(served_file)

    def serves(version_file: int) -> bool:
        try:
            result = infer_ab(IMAGE, user, url=env.grpc_url, protocol="grpc")
        except ServingError:  # still refused: the router re-checks files once a second
            return False
        assert result.served_version == 2
        return bool(np.allclose(result.logits, expected[version_file], rtol=1e-5, atol=1e-5))

    def refused() -> bool:
        return _is_refused(user, env.http_url, broken)

    broken: list[ServingError] = []
    assert serves(2)
    replace_with(serving_files[1])
    try:
        _wait_until(lambda: serves(1), "the router runs the rewritten model.onnx of version 2")
        garbage = env.repo / "garbage.onnx"
        garbage.write_bytes(b"not an onnx model")
        replace_with(garbage)
        _wait_until(refused, "the router refuses version 2 with an unreadable model.onnx")
        assert broken[0].status == "500"
        assert f"cannot run {served_file} in process" in str(broken[0])
    finally:
        replace_with(serving_files[2])
    _wait_until(lambda: serves(2), "the router runs the restored model.onnx of version 2")


def test_capture_matches_requests_and_feedback_joins(triton_server: ServingEnv) -> None:
    rng = np.random.default_rng(5)
    sent: dict[str, tuple[str, np.ndarray, np.ndarray, int]] = {}
    for number in range(24):
        images = rng.integers(0, 256, size=(1 + number % 3, 32, 32, 3), dtype=np.uint8)
        user = f"capture-user-{number}"
        result = infer_ab(images, user, url=triton_server.http_url)
        sent[result.request_id] = (user, images, result.logits, result.served_version)

    # No waiting: the router writes a request's records before it answers.
    frame = capture.read_capture(triton_server.capture_dir)
    frame = frame[frame["request_id"].isin(sent)]
    assert len(frame) == sum(len(images) for _, images, _, _ in sent.values())
    for request_id, rows in frame.groupby("request_id"):
        user, images, logits, version = sent[str(request_id)]
        assert list(rows["item"]) == list(range(len(images)))
        assert set(rows["user_id"]) == {user}
        assert set(rows["served_version"]) == {version}
        assert list(rows["predicted_class"]) == list(logits.argmax(axis=1))
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        confidence = (exp / exp.sum(axis=1, keepdims=True)).max(axis=1)
        np.testing.assert_allclose(rows["confidence"], confidence, atol=1e-5)
        assert (rows["latency_ms"] > 0).all()

    ids = list(sent)
    capture.record_feedback(triton_server.capture_dir, ids[0], 3)
    capture.record_feedback(triton_server.capture_dir, ids[1], "ship", item=1)
    capture.record_feedback(triton_server.capture_dir, ids[0], 4)  # a correction: last one wins
    joined = capture.join_feedback(triton_server.capture_dir)
    assert len(joined) == 2
    first = joined[joined["request_id"] == ids[0]].iloc[0]
    assert first["label"] == 4 and first["correct"] == (first["predicted_class"] == 4)
    second = joined[joined["request_id"] == ids[1]].iloc[0]
    assert (second["item"], second["label"]) == (1, 8)
    with pytest.raises(capture.CaptureError, match="is not in the capture"):
        capture.record_feedback(triton_server.capture_dir, "no-such-request", 1)
    with pytest.raises(capture.CaptureError, match=r"not a class index 0\.\.9"):
        capture.record_feedback(triton_server.capture_dir, ids[0], 10)
    with pytest.raises(capture.CaptureError, match="has items"):
        capture.record_feedback(triton_server.capture_dir, ids[0], 1, item=5)


def test_stop_loses_no_records_and_restart_restores_state(triton_server: ServingEnv) -> None:
    rng = np.random.default_rng(6)
    sent: dict[str, tuple[str, np.ndarray, int]] = {}
    for number in range(30):
        images = rng.integers(0, 256, size=(1 + number % 2, 32, 32, 3), dtype=np.uint8)
        payload = normalise_uint8(images) if number % 3 == 0 else images
        user = f"restart-user-{number}"
        result = infer_ab(payload, user, url=triton_server.grpc_url, protocol="grpc")
        sent[result.request_id] = (user, images, result.served_version)
    triton_server.server.stop()  # at once: the router still gathers sampled pixels

    frame = capture.read_capture(triton_server.capture_dir)
    assert set(sent) <= set(frame["request_id"])
    pixels, pixel_ids = capture.read_captured_inputs(triton_server.capture_dir)
    assert set(pixel_ids) <= set(frame["request_id"])
    # The sampled share is picked by a hash of the request id (rate 0.5 in this fixture).
    rate = triton_server.config.capture_input_sample_rate
    sampled = {rid for rid in sent if _hash_fraction(f"sample:{rid}") < rate}
    assert 0 < len(sampled) < len(sent)
    assert sampled == set(pixel_ids) & set(sent)
    for request_id in sampled:
        # Float requests are kept as the uint8 pixels they were normalised from, exactly.
        np.testing.assert_array_equal(pixels[pixel_ids == request_id], sent[request_id][1])

    triton_server.server = TritonServer(triton_server.config).start()
    assert triton_server.server.is_ready()
    for user, _, version in sent.values():
        assert (
            infer_ab(IMAGE, user, url=triton_server.grpc_url, protocol="grpc").served_version
            == version
        )
    assert repository.read_live_versions(triton_server.state_dir) == [1, 2]
