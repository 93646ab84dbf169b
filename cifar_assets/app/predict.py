"""One prediction through the A/B router, and what to tell a person when the prediction
service cannot answer.

Each image is its own request, so each gets its own request id (item 0), the id its feedback is
recorded under (``capture.record_feedback``); the router captures the request before it
answers, so feedback can follow at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from cifar_assets.data.imageset import CLASSES
from cifar_assets.ml.evaluation import softmax
from cifar_assets.serving.client import ServingError, get_client, infer_ab
from cifar_assets.serving.repository import ROUTER_NAME

TOP_K = 3
ProblemKind = Literal["down", "no_model", "refused"]
# What the router and Triton say when there is nothing to route to (see ab_router_model.py).
_NO_MODEL_SIGNS = (
    "no a/b weights",
    "no usable a/b weights",
    "is not live",
    "unknown model",
    "is not found",
    "not ready",
)


@dataclass(frozen=True)
class Prediction:
    request_id: str  # give it to record_feedback
    served_version: int
    top: list[tuple[str, float]]  # (class, probability), most probable first
    latency_ms: float  # round trip seen by the app


@dataclass(frozen=True)
class ServiceProblem:
    kind: ProblemKind
    message: str  # for the person at the page: what happened and what to do
    details: str  # for the platform team: what the server or the connection said


def predict(pixels: np.ndarray, user_id: str, url: str, k: int = TOP_K) -> Prediction:
    """The router's answer for one (32, 32, 3) uint8 image; raises what infer_ab raises."""
    started = time.perf_counter()
    result = infer_ab(np.asarray(pixels, dtype=np.uint8)[None], user_id=user_id, url=url)
    latency_ms = (time.perf_counter() - started) * 1000.0
    probabilities = softmax(result.logits)[0]
    best = np.argsort(-probabilities, kind="stable")[:k]
    return Prediction(
        request_id=result.request_id,
        served_version=result.served_version,
        top=[(CLASSES[i], float(probabilities[i])) for i in best],
        latency_ms=latency_ms,
    )


def explain(error: Exception, url: str) -> ServiceProblem:
    """What a failed prediction means for the person who asked for it."""
    if isinstance(error, ServingError):
        said = str(error)
        if any(sign in said.lower() for sign in _NO_MODEL_SIGNS):
            return ServiceProblem(
                "no_model",
                "No model is deployed for predictions yet: the prediction service is running "
                "but has no model version to answer with. Ask the platform team to deploy one "
                "(in Dagster, run main_job: it trains, registers and deploys a model), then try "
                "again.",
                said,
            )
        return ServiceProblem(
            "refused",
            "The prediction service refused this image. Try another image; if every image "
            "fails, tell the platform team what is shown under 'Details'.",
            said,
        )
    return ServiceProblem(
        "down",
        f"The prediction service is not answering (Triton at {url}), so nothing was predicted. "
        "Ask the platform team to start it (`cifar-triton start`), then try again.",
        f"{type(error).__name__}: {error}",
    )


def service_problem(url: str) -> ServiceProblem | None:
    """None when Triton answers and the router is ready, else why not (a quick health check)."""
    from tritonclient.utils import InferenceServerException

    try:
        client = get_client(url)
        if not client.is_server_live():
            return explain(ServingError(f"Triton at {url} is not live"), url)
        if not client.is_model_ready(ROUTER_NAME):
            return explain(ServingError(f"{ROUTER_NAME} at {url} is not ready"), url)
    except InferenceServerException as error:
        return explain(ServingError(f"{url}: {error.message()}"), url)
    except OSError as error:  # no answer at all: refused, reset, unresolvable, timed out
        return explain(error, url)
    return None
