"""The bad-request corpus against a real tritonserver: every request the issue sent, over HTTP
JSON, HTTP binary and gRPC, to the classifier (``cifar10_resnet18``) and the A/B router
(``cifar10_ab``). For each case the project controls, the test asserts the status and the message;
for the cases Triton's core decides before a model sees the request, it pins the status and
Triton's own words (documented in the serving README). After every bad request the server still
answers a good one. Nothing non-finite is ever answered with 200.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cifar_assets.ml.model import normalise_uint8
from cifar_assets.serving import capture, repository
from cifar_assets.serving.client import ServingError, infer, infer_ab
from tests.serving_fixtures import ServingEnv, ort_logits

pytestmark = pytest.mark.slow
IMAGE = np.random.default_rng(21).integers(0, 256, size=(1, 32, 32, 3), dtype=np.uint8)
TRANSPORTS = ("http-json", "http-binary", "grpc")
MODELS = (repository.MODEL_NAME, repository.ROUTER_NAME)
# gRPC status for each HTTP status Triton maps.
GRPC_CODES = {400: "StatusCode.INVALID_ARGUMENT", 500: "StatusCode.INTERNAL"}


@dataclass(frozen=True)
class Case:
    """One bad request and what the server must answer."""

    tensors: list[tuple[str, np.ndarray, str]]  # (input name, array, datatype)
    status: int
    message: str  # a part of the error message, after "{model}" is filled in
    parameters: dict[str, str] = field(default_factory=dict)
    request_id: str = ""
    router_only: bool = False


def _floats(value: float) -> np.ndarray:
    return np.full((1, 3, 32, 32), value, dtype=np.float32)


# Decided by the project's models: status and message asserted.
OURS = {
    "both inputs": Case(
        [("images_uint8", IMAGE, "UINT8"), ("input", normalise_uint8(IMAGE), "FP32")],
        400,
        "send exactly one of the inputs 'images_uint8' (uint8 N,32,32,3) or 'input' "
        "(normalised float32 N,3,32,32); this request had both.",
    ),
    "NaN floats": Case([("input", _floats(np.nan), "FP32")], 400, "holds NaN or infinite values"),
    "infinite floats": Case(
        [("input", _floats(-np.inf), "FP32")], 400, "holds NaN or infinite values"
    ),
    # Finite, but the logits overflow: the 3e38 that was answered 200 with NaN.
    "huge floats": Case(
        [("input", _floats(3e38), "FP32")],
        400,
        "'input' holds values up to 3e+38 in magnitude, beyond the limit of 5",
    ),
    "raw pixels as floats": Case(
        [("input", _floats(200.0), "FP32")],
        400,
        "send raw pixels as 'images_uint8', or normalise them",
    ),
    "user_id of 1 MB": Case(
        [("images_uint8", IMAGE, "UINT8")],
        400,
        "the user_id parameter is 1048576 bytes, more than 256; it is stored with every "
        "captured image",
        parameters={"user_id": "u" * (1 << 20)},
        router_only=True,
    ),
    "request id of 1 KB": Case(
        [("images_uint8", IMAGE, "UINT8")],
        400,
        "the request id is 1024 bytes, more than 256",
        request_id="r" * 1024,
        router_only=True,
    ),
}

# Decided by Triton's core before the model runs: status and Triton's words pinned.
CORE = {
    "pixels as INT32 (300)": Case(
        [("images_uint8", np.full((1, 32, 32, 3), 300, np.int32), "INT32")],
        400,
        "inference input 'images_uint8' data-type is 'INT32', but model '{model}' expects 'UINT8'",
    ),
    "pixels as UINT16": Case(
        [("images_uint8", np.full((1, 32, 32, 3), 300, np.uint16), "UINT16")],
        400,
        "data-type is 'UINT16', but model '{model}' expects 'UINT8'",
    ),
    "wrong shape": Case(
        [("images_uint8", np.zeros((1, 32, 32, 4), np.uint8), "UINT8")], 400, "unexpected shape"
    ),
    "batch over 64": Case(
        [("images_uint8", np.zeros((65, 32, 32, 3), np.uint8), "UINT8")],
        400,
        "batch-size must be <= 64",
    ),
    "no images": Case(
        [("images_uint8", np.zeros((0, 32, 32, 3), np.uint8), "UINT8")],
        400,
        "input byte size mismatch for input 'images_uint8'",
    ),
    "no inputs": Case([], 400, "request has 0 inputs"),
}


def _url(env: ServingEnv, transport: str) -> str:
    return env.grpc_url if transport == "grpc" else env.http_url


def _path(model: str) -> str:
    version = "/versions/1" if model == repository.MODEL_NAME else ""
    return f"/v2/models/{model}{version}/infer"


def _post(env: ServingEnv, model: str, body: bytes, content_type: str) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://{env.http_url}{_path(model)}",
        data=body,
        headers={"Content-Type": content_type} if content_type else {},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _send(env: ServingEnv, transport: str, model: str, case: Case) -> tuple[str, str]:
    """(status, error message) of one request: "400", "500"... or a gRPC status code."""
    if transport == "http-json":
        body: dict[str, Any] = {
            "inputs": [
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": datatype,
                    "data": array.ravel().tolist(),
                }
                for name, array, datatype in case.tensors
            ]
        }
        if case.parameters:
            body["parameters"] = case.parameters
        if case.request_id:
            body["id"] = case.request_id
        # Python writes NaN and Infinity; Triton's parser takes them.
        status, text = _post(env, model, json.dumps(body).encode(), "application/json")
        return str(status), json.loads(text).get("error", "") if status != 200 else ""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    module: Any = grpcclient if transport == "grpc" else httpclient
    client = module.InferenceServerClient(_url(env, transport))
    inputs = []
    for name, array, datatype in case.tensors:
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    try:
        client.infer(
            model,
            inputs,
            model_version="1" if model == repository.MODEL_NAME else "",
            request_id=case.request_id,
            parameters=case.parameters or None,
        )
    except InferenceServerException as exc:
        return str(exc.status()), str(exc.message())
    return "200", ""


def _good_request_is_answered(env: ServingEnv, transport: str, model: str) -> None:
    protocol: Any = "grpc" if transport == "grpc" else "http"
    url = _url(env, transport)
    if model == repository.MODEL_NAME:
        logits, version = infer(IMAGE, url=url, protocol=protocol, version=1), 1
    else:
        result = infer_ab(IMAGE, "good-user", url=url, protocol=protocol)
        logits, version = result.logits, result.served_version
    expected = ort_logits(env.onnx[version], normalise_uint8(IMAGE))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def _cases() -> list[Any]:
    return [
        pytest.param(transport, model, name, id=f"{transport}-{model}-{name}")
        for name, case in {**OURS, **CORE}.items()
        for model in MODELS
        if not (case.router_only and model != repository.ROUTER_NAME)
        for transport in TRANSPORTS
    ]


@pytest.mark.parametrize(("transport", "model", "name"), _cases())
def test_bad_request_is_refused_with_its_reason(
    triton_server: ServingEnv, transport: str, model: str, name: str
) -> None:
    case = {**OURS, **CORE}[name]
    status, message = _send(triton_server, transport, model, case)
    expected = str(case.status) if transport != "grpc" else GRPC_CODES[case.status]
    assert status == expected, (status, message)
    assert case.message.format(model=model) in message, message
    if name in OURS:
        assert message.startswith(model), message  # the project's messages name the model
    _good_request_is_answered(triton_server, transport, model)


@pytest.mark.parametrize("model", MODELS)
def test_http_bodies_triton_rejects_before_any_model(triton_server: ServingEnv, model: str) -> None:
    """Triton's HTTP front end answers these itself, some with 500 (see the serving README)."""
    garbage = os.urandom(50 << 20)
    bodies = {
        "malformed JSON": (b'{"inputs": [', "application/json", 500, "failed to parse the request"),
        "50 MB of garbage": (garbage, "application/json", 500, "failed to parse the request"),
        "empty body": (b"", "", 400, "Raw request must only have 1 input"),
        "empty object": (b"{}", "application/json", 500, "Unable to parse 'inputs'"),
        "negative pixel": (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "images_uint8",
                            "shape": [1, 32, 32, 3],
                            "datatype": "UINT8",
                            "data": [-1] * 3072,
                        }
                    ]
                }
            ).encode(),
            "application/json",
            500,
            "attempt to access JSON non-unsigned-integer as unsigned-integer",
        ),
    }
    for what, (body, content_type, status, message) in bodies.items():
        answered, text = _post(triton_server, model, body, content_type)
        assert (answered, message in text) == (status, True), (what, answered, text[:300])
        _good_request_is_answered(triton_server, "http-json", model)


def test_json_pixels_above_255_are_taken_modulo_256_by_triton(triton_server: ServingEnv) -> None:
    """Triton's JSON parser stores 300 in a UINT8 input as 44 before the model sees it, so no
    model can refuse it (binary and gRPC carry bytes, which cannot exceed 255; wider integer
    types are refused). Pinned here because the serving README says so."""
    body = {
        "inputs": [
            {
                "name": "images_uint8",
                "shape": [1, 32, 32, 3],
                "datatype": "UINT8",
                "data": [300] * 3072,
            }
        ]
    }
    status, text = _post(
        triton_server, repository.MODEL_NAME, json.dumps(body).encode(), "application/json"
    )
    assert status == 200, text
    logits = np.asarray(json.loads(text)["outputs"][0]["data"], np.float32).reshape(1, 10)
    wrapped = infer(np.full((1, 32, 32, 3), 44, np.uint8), url=triton_server.http_url, version=1)
    np.testing.assert_allclose(logits, wrapped, rtol=1e-5, atol=1e-5)


def _overflowing_model(path: Path) -> Path:
    """A model with the served interface whose logits are infinite for every ordinary image."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.full((3072, 10), 3e38, np.float32), "weights")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Abs", ["flat"], ["positive"]),
            helper.make_node("MatMul", ["positive", "weights"], ["logits"]),
        ],
        "overflow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _not_strict_json(word: str) -> None:
    raise AssertionError(f"{word} in a capture file: not strict JSON")


def test_non_finite_logits_are_never_answered(triton_server: ServingEnv, tmp_path: Path) -> None:
    env = triton_server
    repository.write_version(env.repo, _overflowing_model(tmp_path / "overflow.onnx"), 3)
    repository.set_live_versions(env.http_url, [1, 2, 3], repo=env.repo, state_dir=env.state_dir)
    try:
        for protocol, url in (("http", env.http_url), ("grpc", env.grpc_url)):
            with pytest.raises(ServingError, match="produced non-finite logits") as direct:
                infer(IMAGE, url=url, protocol=protocol, version=3)  # type: ignore[arg-type]
            assert direct.value.status in ("500", "StatusCode.INTERNAL")
        repository.set_ab_weights({3: 1.0}, state_dir=env.state_dir)
        for execution in ("inprocess", "bls"):
            repository.load_router(
                env.http_url,
                repo=env.repo,
                state_dir=env.state_dir,
                capture_dir=env.capture_dir,
                execution=execution,
            )
            with pytest.raises(ServingError, match="non-finite logits") as routed:
                infer_ab(IMAGE, f"user-{execution}", url=env.http_url, request_id=execution)
            assert routed.value.status == "500", execution
    finally:
        repository.set_ab_weights({1: 0.9, 2: 0.1}, state_dir=env.state_dir)
        repository.load_router(
            env.http_url,
            repo=env.repo,
            state_dir=env.state_dir,
            capture_dir=env.capture_dir,
            execution="inprocess",
        )
        repository.set_live_versions(env.http_url, [1, 2], repo=env.repo, state_dir=env.state_dir)
    # Nothing refused was captured, and every capture line is strict JSON.
    frame = capture.read_capture(env.capture_dir)
    assert not {"inprocess", "bls"} & set(frame["request_id"])
    for path in (env.capture_dir / "records").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            json.loads(line, parse_constant=_not_strict_json)
    assert frame["confidence"].between(0, 1).all()
