"""Small clients for the served classifier over Triton's HTTP and gRPC (KServe v2) APIs.

Images go as raw uint8 pixels (N, 32, 32, 3) on input ``images_uint8``, or as normalised float32
(N, 3, 32, 32) on input ``input``; the helpers pick the input from the array. Clients are kept per
thread and per URL (tritonclient's HTTP client is not thread-safe), so repeated calls reuse their
connection. ``url`` defaults to the settings' HTTP or gRPC address for the protocol.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

import numpy as np

from cifar_assets.data.imageset import CLASSES
from cifar_assets.serving.repository import MODEL_NAME, ROUTER_NAME

Protocol = Literal["http", "grpc"]
_clients = threading.local()


class ServingError(RuntimeError):
    """The server refused or failed a request; ``status`` is the HTTP code or gRPC status."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


class ABResult(NamedTuple):
    logits: np.ndarray  # (N, 10) float32
    served_version: int
    request_id: str  # the id to give record_feedback


def _module(protocol: Protocol) -> Any:
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol {protocol!r} is not 'http' or 'grpc'.")
    return module


def default_url(protocol: Protocol) -> str:
    from cifar_assets.settings import get_settings

    settings = get_settings()
    return settings.triton_http_url if protocol == "http" else settings.triton_grpc_url


def get_client(url: str | None = None, protocol: Protocol = "http") -> Any:
    """This thread's tritonclient client for ``url`` (created once, then reused)."""
    url = (url or default_url(protocol)).removeprefix("http://")
    cache: dict[tuple[str, str], Any] = _clients.__dict__.setdefault("cache", {})
    key = (url, protocol)
    if key not in cache:
        cache[key] = _module(protocol).InferenceServerClient(url)
    return cache[key]


def _input(images: np.ndarray, protocol: Protocol) -> Any:
    array = np.asarray(images)
    if array.dtype == np.uint8 and array.ndim == 3:
        array = array[None]
    if array.dtype == np.uint8 and array.shape[1:] == (32, 32, 3):
        name, datatype = "images_uint8", "UINT8"
    elif array.dtype == np.float32 and array.ndim == 4 and array.shape[1:] == (3, 32, 32):
        name, datatype = "input", "FP32"
    else:
        raise ValueError(
            f"images have dtype {array.dtype} and shape {array.shape}; send uint8 pixels "
            "(N, 32, 32, 3) or normalised float32 (N, 3, 32, 32) "
            "(cifar_assets.ml.model.normalise_uint8)."
        )
    tensor = _module(protocol).InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(np.ascontiguousarray(array))
    return tensor


def _infer(
    images: np.ndarray,
    url: str | None,
    protocol: Protocol,
    model: str,
    version: int | None,
    outputs: Iterable[tuple[str, int]],
    **options: Any,
) -> Any:
    from tritonclient.utils import InferenceServerException

    module = _module(protocol)
    requested = [module.InferRequestedOutput(name, class_count=count) for name, count in outputs]
    try:
        return get_client(url, protocol).infer(
            model,
            [_input(images, protocol)],
            model_version="" if version is None else str(version),
            outputs=requested,
            **options,
        )
    except InferenceServerException as exc:
        where = f"{model}" + ("" if version is None else f" version {version}")
        raise ServingError(
            f"{where} at {url or default_url(protocol)} ({protocol}): {exc.message()}",
            None if exc.status() is None else str(exc.status()),
        ) from exc


def infer(
    images: np.ndarray,
    url: str | None = None,
    protocol: Protocol = "http",
    version: int | None = None,
    model: str = MODEL_NAME,
) -> np.ndarray:
    """Logits (N, 10) float32 from ``model`` (a given version, or the latest live one)."""
    result = _infer(images, url, protocol, model, version, [("logits", 0)])
    return np.asarray(result.as_numpy("logits"), dtype=np.float32)


def classify_top_k(
    images: np.ndarray,
    k: int = 3,
    url: str | None = None,
    protocol: Protocol = "http",
    version: int | None = None,
    model: str = MODEL_NAME,
) -> list[list[tuple[str, float]]]:
    """The k best (class name, logit) pairs per image, from Triton's classification extension
    (the server ranks the logits and names them from the model's labels.txt)."""
    if not 1 <= k <= len(CLASSES):
        raise ValueError(f"k={k} is outside 1..{len(CLASSES)}.")
    result = _infer(images, url, protocol, model, version, [("logits", k)])
    ranked = []
    for row in np.asarray(result.as_numpy("logits")).reshape(-1, k):
        entries = []
        for entry in row:
            text = entry.decode() if isinstance(entry, bytes) else str(entry)
            score, _index, label = text.split(":", 2)
            entries.append((label, float(score)))
        ranked.append(entries)
    return ranked


def infer_ab(
    images: np.ndarray,
    user_id: str,
    url: str | None = None,
    protocol: Protocol = "http",
    request_id: str | None = None,
    router: str = ROUTER_NAME,
) -> ABResult:
    """Logits from the A/B router, the version that served them, and the request id under which
    the router captured the request (a new one unless given)."""
    request_id = request_id or uuid.uuid4().hex
    result = _infer(
        images,
        url,
        protocol,
        router,
        None,
        [("logits", 0), ("served_version", 0)],
        request_id=request_id,
        parameters={"user_id": str(user_id)},
    )
    served = np.asarray(result.as_numpy("served_version")).reshape(-1)
    return ABResult(
        logits=np.asarray(result.as_numpy("logits"), dtype=np.float32),
        served_version=int(served[0]),
        request_id=request_id,
    )


def wait_until_ready(
    url: str | None = None,
    protocol: Protocol = "http",
    models: Iterable[str] = (MODEL_NAME,),
    timeout_s: float = 60.0,
) -> None:
    """Block until the server and ``models`` are ready; raise TimeoutError naming what is not."""
    from tritonclient.utils import InferenceServerException

    client = get_client(url, protocol)
    waiting = list(models)
    deadline = time.monotonic() + timeout_s
    problem = "no answer"
    while time.monotonic() < deadline:
        try:
            if client.is_server_ready():
                waiting = [m for m in waiting if not client.is_model_ready(m)]
                if not waiting:
                    return
                problem = f"models {waiting} not ready"
            else:
                problem = "server not ready"
        except (InferenceServerException, OSError) as exc:
            problem = f"no answer ({exc})"
        time.sleep(0.2)
    raise TimeoutError(
        f"Triton at {url or default_url(protocol)} ({protocol}) not ready after {timeout_s:.0f} "
        f"s: {problem}. Start it with `cifar-triton start` and check var/triton/tritonserver.log."
    )
