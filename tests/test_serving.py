"""The classifier served by a real tritonserver: equality with ONNX Runtime over HTTP and gRPC,
the classification extension, rejected requests, and the repository writer."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cifar_assets.data.imageset import CLASSES
from cifar_assets.ml.model import normalise_uint8
from cifar_assets.serving import repository
from cifar_assets.serving.client import (
    ServingError,
    classify_top_k,
    get_client,
    infer,
)
from tests.serving_fixtures import ServingEnv, copy_repository, ort_logits

pytestmark = pytest.mark.slow
RNG = np.random.default_rng(7)
IMAGES = RNG.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_served_logits_equal_onnxruntime(
    triton_server: ServingEnv, protocol: Any, version: int, kind: str
) -> None:
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    sent = IMAGES if kind == "uint8" else normalise_uint8(IMAGES)
    served = infer(sent, url=url, protocol=protocol, version=version)
    expected = ort_logits(triton_server.onnx[version], normalise_uint8(IMAGES))
    assert served.shape == (6, 10)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-5)


def test_versions_serve_their_own_model(triton_server: ServingEnv) -> None:
    first = infer(IMAGES, url=triton_server.http_url, version=1)
    second = infer(IMAGES, url=triton_server.http_url, version=2)
    assert np.abs(first - second).max() > 1e-2
    latest = infer(IMAGES, url=triton_server.http_url)
    np.testing.assert_array_equal(latest, second)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_top_k_class_names_from_classification_extension(
    triton_server: ServingEnv, protocol: Any
) -> None:
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    ranked = classify_top_k(IMAGES, k=3, url=url, protocol=protocol, version=1)
    logits = ort_logits(triton_server.onnx[1], normalise_uint8(IMAGES))
    for row, image_logits in zip(ranked, logits, strict=True):
        order = np.argsort(-image_logits)[:3]
        assert [name for name, _ in row] == [CLASSES[i] for i in order]
        np.testing.assert_allclose([score for _, score in row], image_logits[order], atol=1e-5)


def test_probabilities_output_is_softmax_of_logits(triton_server: ServingEnv) -> None:
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput("images_uint8", list(IMAGES.shape), "UINT8")
    tensor.set_data_from_numpy(IMAGES)
    result = get_client(triton_server.http_url).infer(
        repository.MODEL_NAME,
        [tensor],
        model_version="1",
        outputs=[
            httpclient.InferRequestedOutput("logits"),
            httpclient.InferRequestedOutput("probabilities"),
        ],
    )
    logits = result.as_numpy("logits")
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), exp / exp.sum(axis=1, keepdims=True), atol=1e-6
    )


def _raw_infer(url: str, path: str, inputs: list[dict[str, Any]]) -> tuple[int, str]:
    """POST a KServe v2 JSON request; (HTTP status, body)."""
    request = urllib.request.Request(
        f"http://{url}{path}",
        data=json.dumps({"inputs": inputs}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _uint8_input(shape: list[int], datatype: str = "UINT8", value: float = 1) -> dict[str, Any]:
    return {
        "name": "images_uint8",
        "shape": shape,
        "datatype": datatype,
        "data": [value] * int(np.prod(shape)),
    }


def _float_input(shape: list[int], value: float = 0.0) -> dict[str, Any]:
    return {
        "name": "input",
        "shape": shape,
        "datatype": "FP32",
        "data": [value] * int(np.prod(shape)),
    }


V1 = "/v2/models/cifar10_resnet18/versions/1/infer"
BAD_REQUESTS = {
    "wrong shape": (V1, [_uint8_input([1, 32, 32, 4])], "unexpected shape"),
    "wrong dtype": (V1, [_uint8_input([1, 32, 32, 3], "FP32")], "expects 'UINT8'"),
    "batch over max": (V1, [_uint8_input([65, 32, 32, 3])], "batch-size must be <= 64"),
    "unknown version": (
        "/v2/models/cifar10_resnet18/versions/99/infer",
        [_uint8_input([1, 32, 32, 3])],
        "unknown model",
    ),
    "both inputs": (
        V1,
        [_uint8_input([1, 32, 32, 3]), _float_input([1, 3, 32, 32])],
        "exactly one of the inputs",
    ),
    # Triton itself rejects an empty request before the model sees it.
    "no input": (V1, [], "request has 0 inputs"),
    "NaN pixels": (V1, [_float_input([1, 3, 32, 32], float("nan"))], "NaN or infinite"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_4xx_with_reason_and_server_stays_healthy(
    triton_server: ServingEnv, case: str
) -> None:
    path, inputs, reason = BAD_REQUESTS[case]
    if case == "NaN pixels":
        # JSON has no NaN literal; Python's encoder writes NaN, which Triton's parser rejects
        # before the model sees it, so NaN goes over the binary protocol instead.
        with pytest.raises(ServingError) as raised:
            infer(
                np.full((1, 3, 32, 32), np.nan, np.float32), url=triton_server.http_url, version=1
            )
        assert raised.value.status == "400"
        assert reason in str(raised.value)
    else:
        status, body = _raw_infer(triton_server.http_url, path, inputs)
        assert 400 <= status < 500, (status, body)
        assert reason in json.loads(body)["error"], body
    assert triton_server.server.is_ready()
    logits = infer(IMAGES[:1], url=triton_server.http_url, version=1)
    expected = ort_logits(triton_server.onnx[1], normalise_uint8(IMAGES[:1]))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_bad_requests_in_a_dynamic_batch_fail_alone(triton_server: ServingEnv) -> None:
    """Concurrent good (uint8 and float) and bad requests share dynamic batches: the good ones
    of both kinds go through one ONNX Runtime call and get their own rows back; only the bad
    ones fail."""
    expected = ort_logits(triton_server.onnx[2], normalise_uint8(IMAGES))
    outcomes: dict[int, Any] = {}

    def send(index: int) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        results = []
        for _ in range(10):
            if index % 3 == 1:
                sent = np.full((1, 3, 32, 32), np.inf, np.float32)
                tensor = grpcclient.InferInput("input", [1, 3, 32, 32], "FP32")
            elif index % 3 == 2:
                sent = normalise_uint8(IMAGES)
                tensor = grpcclient.InferInput("input", list(sent.shape), "FP32")
            else:
                sent = IMAGES
                tensor = grpcclient.InferInput("images_uint8", list(IMAGES.shape), "UINT8")
            tensor.set_data_from_numpy(sent)
            try:
                results.append(client.infer(repository.MODEL_NAME, [tensor], model_version="2"))
            except Exception as exc:
                results.append(exc)
        outcomes[index] = results

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, results in outcomes.items():
        for result in results:
            if index % 3 == 1:
                assert "NaN or infinite" in str(result)
            else:
                np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-5)
    assert sum(len(r) for r in outcomes.values()) == 60


def test_client_rejects_images_of_the_wrong_form(triton_server: ServingEnv) -> None:
    with pytest.raises(ValueError, match=r"uint8 pixels \(N, 32, 32, 3\)"):
        infer(np.zeros((2, 28, 28), np.uint8), url=triton_server.http_url)


def test_write_version_is_atomic_idempotent_and_immutable(
    tmp_path: Path, onnx_models: dict[int, Path]
) -> None:
    repo = copy_repository(tmp_path / "repo")
    folder = repository.write_version(repo, onnx_models[1], 7, {"run_id": "abc", "alias": "x"})
    assert sorted(p.name for p in folder.iterdir()) == [
        "model.onnx",
        "model.py",
        "model_serving.onnx",
        "version.json",
    ]
    assert (folder / "model.onnx").read_bytes() == onnx_models[1].read_bytes()
    metadata = repository.read_version_metadata(repo, 7)
    assert metadata["run_id"] == "abc" and metadata["version"] == 7
    assert not [p for p in (repo / repository.MODEL_NAME).iterdir() if p.name.startswith(".")]
    assert repository.write_version(repo, onnx_models[1], 7, {"run_id": "abc"}) == folder
    with pytest.raises(repository.RepositoryError, match="already holds a different model"):
        repository.write_version(repo, onnx_models[2], 7, {})
    assert repository.list_versions(repo) == [7]


def test_a_version_written_without_the_serving_graph_is_completed(
    tmp_path: Path, onnx_models: dict[int, Path]
) -> None:
    """A folder written before write_version derived model_serving.onnx (or one whose file was
    lost) gets it at the next start (complete_versions), with the current model.py."""
    import onnxruntime as ort

    repo = copy_repository(tmp_path / "repo")
    folder = repository.write_version(repo, onnx_models[1], 3, {"run_id": "old"})
    (folder / repository.SERVING_ONNX).unlink()
    (folder / "model.py").write_text("# model.py of an earlier release\n")
    assert repository.complete_versions(repo) == [3]
    assert repository.complete_versions(repo) == []
    assert (folder / "model.py").read_bytes() == repository.CLASSIFIER_TEMPLATE.read_bytes()
    session = ort.InferenceSession(str(folder / repository.SERVING_ONNX))
    feed = {"images_uint8": IMAGES, "input": np.zeros((0, 3, 32, 32), np.float32)}
    served = session.run(["logits"], feed)[0]
    expected = ort_logits(onnx_models[1], normalise_uint8(IMAGES))
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-5)


def test_write_version_rejects_bad_inputs(tmp_path: Path, onnx_models: dict[int, Path]) -> None:
    import onnx
    from onnx import TensorProto, helper

    repo = copy_repository(tmp_path / "repo")
    with pytest.raises(repository.RepositoryError, match="not a positive integer"):
        repository.write_version(repo, onnx_models[1], 0, {})
    with pytest.raises(repository.RepositoryError, match="does not exist"):
        repository.write_version(repo, tmp_path / "missing.onnx", 1, {})
    with pytest.raises(repository.RepositoryError, match="not a cifar_assets model repository"):
        repository.write_version(tmp_path / "empty", onnx_models[1], 1, {})
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "wrong",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 32, 32])],
    )
    wrong = tmp_path / "wrong.onnx"
    onnx.save(helper.make_model(graph), str(wrong))
    with pytest.raises(repository.RepositoryError, match="one input 'input'"):
        repository.write_version(repo, wrong, 1, {})
    with pytest.raises(repository.RepositoryError, match="not JSON-serialisable"):
        repository.write_version(repo, onnx_models[1], 1, {"when": object()})
    assert repository.list_versions(repo) == []


def test_live_versions_and_weights_are_validated(triton_server: ServingEnv) -> None:
    state, repo, url = triton_server.state_dir, triton_server.repo, triton_server.http_url
    with pytest.raises(repository.RepositoryError, match=r"sum to 0\.9"):
        repository.set_ab_weights({1: 0.5, 2: 0.4}, state_dir=state)
    with pytest.raises(repository.RepositoryError, match="negative"):
        repository.set_ab_weights({1: 1.5, 2: -0.5}, state_dir=state)
    with pytest.raises(repository.RepositoryError, match=r"Versions \[5\] are not live"):
        repository.set_ab_weights({1: 0.5, 5: 0.5}, state_dir=state)
    with pytest.raises(repository.RepositoryError, match="still get A/B traffic"):
        repository.set_live_versions(url, [1], repo=repo, state_dir=state)
    with pytest.raises(repository.RepositoryError, match=r"have no folder with model\.onnx"):
        repository.set_live_versions(url, [1, 2, 9], repo=repo, state_dir=state)
    assert repository.read_live_versions(state) == [1, 2]
    assert repository.read_ab_weights(state) == {1: 0.9, 2: 0.1}


def test_native_config_renders_valid_pbtxt(tmp_path: Path, onnx_models: dict[int, Path]) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = repository.render_native_config(versions=[2, 1], max_batch_size=32, intra_op_threads=4)
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == "cifar10_resnet18"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 32
    assert list(config.version_policy.specific.versions) == [1, 2]
    [model_input] = config.input
    assert (model_input.name, list(model_input.dims)) == ("input", [3, 32, 32])
    assert model_input.data_type == model_config_pb2.TYPE_FP32
    [output] = config.output
    assert (output.name, list(output.dims), output.label_filename) == ("logits", [10], "labels.txt")
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.parameters["intra_op_thread_count"].string_value == "4"

    repo = copy_repository(tmp_path / "repo")
    for version, path in onnx_models.items():
        repository.write_version(repo, path, version, {})
    native = repository.write_native_repository(repo, tmp_path / "native", versions=[2])
    assert sorted(str(p.relative_to(native)) for p in native.rglob("*")) == [
        "2",
        "2/model.onnx",
        "config.pbtxt",
        "labels.txt",
    ]
    assert (native / "labels.txt").read_text().split() == list(CLASSES)
    assert (native / "2" / "model.onnx").read_bytes() == onnx_models[2].read_bytes()
    parsed = text_format.Parse(
        (native / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert list(parsed.version_policy.specific.versions) == [2]
    with pytest.raises(repository.RepositoryError, match="are not in"):
        repository.write_native_repository(repo, tmp_path / "native", versions=[3])


def test_cli_writes_native_repository(
    tmp_path: Path, onnx_models: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cifar_assets.serving import cli

    repo = copy_repository(tmp_path / "repo")
    for version, path in onnx_models.items():
        repository.write_version(repo, path, version, {})
    monkeypatch.setenv("TRITON_MODEL_REPOSITORY", str(repo))
    monkeypatch.setenv("CIFAR_VAR_DIR", str(tmp_path / "var"))
    assert cli.main(["native"]) == 0
    native = tmp_path / "var" / "triton_native_repo" / repository.MODEL_NAME
    assert sorted(p.name for p in native.iterdir()) == ["1", "2", "config.pbtxt", "labels.txt"]
    assert cli.main(["native", "--out", str(tmp_path / "other"), "5"]) == 1


def test_committed_labels_match_class_order() -> None:
    root = Path(__file__).resolve().parent.parent / "triton_repo"
    for model in (repository.MODEL_NAME, repository.ROUTER_NAME):
        assert (root / model / "labels.txt").read_text().split() == list(CLASSES)
