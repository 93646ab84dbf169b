"""Triton python-backend model: one ResNet18 version run with ONNX Runtime.

The repository writer copies this file to ``cifar10_resnet18/<N>/model.py`` beside that version's
``model.onnx`` and ``model_serving.onnx``. It runs inside Triton's python-backend stub, so it is
self-contained: numpy and onnxruntime only, never the ``cifar_assets`` package.

A request carries exactly one of two inputs: ``images_uint8`` (N, 32, 32, 3) raw pixels, or
``input`` (N, 3, 32, 32) float32 already normalised, each value within +-FLOAT_LIMIT. The session
runs ``model_serving.onnx`` (``cifar_assets.ml.onnx_export.add_uint8_input``): the network with
the normalisation of ``cifar_assets.ml.model.normalise_uint8`` in the graph, so ONNX Runtime
normalises the pixels, and both kinds of request of a dynamic batch go into one ONNX Runtime call.
A bad request gets an INVALID_ARG error of its own that names the problem; the other requests of
the same dynamic batch are still answered. Logits that are not finite are never answered: that
request gets an INTERNAL error instead.

Copies: ``as_numpy()`` of an input is the python backend's own copy of the request out of shared
memory (made when the stub builds the tensor, DLPack or not); a request that is alone in its
batch goes to ONNX Runtime as that array, with no further copy, and each output is copied once
into shared memory when the response leaves (``pb_utils.Tensor.from_dlpack`` would copy it the
same way on a CPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

UINT8_INPUT = "images_uint8"
FLOAT_INPUT = "input"
SERVING_ONNX = "model_serving.onnx"  # keep in step with repository.SERVING_ONNX
NO_IMAGES = np.zeros((0, 32, 32, 3), dtype=np.uint8)
NO_FLOATS = np.zeros((0, 3, 32, 32), dtype=np.float32)
# Normalised pixels lie within [-1.99, 2.13]; the limit leaves room for other normalisations
# (ImageNet's reaches 2.64) and refuses raw 0-255 floats and values that overflow the network.
FLOAT_LIMIT = 5.0


def joined(arrays: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
    """One array of all ``arrays`` (no copy for one), or ``empty`` for none."""
    if not arrays:
        return empty
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


def invalid(message: str) -> Any:
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.model_name = config["name"]
        self.version = int(args["model_version"])
        self.max_batch_size = int(config.get("max_batch_size", 0))
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        onnx_path = Path(args["model_repository"]) / str(self.version) / SERVING_ONNX
        if not onnx_path.is_file():
            raise pb_utils.TritonModelException(
                f"{onnx_path} is missing: write the version with "
                "cifar_assets.serving.repository.write_version before loading it (it derives "
                f"{SERVING_ONNX} from model.onnx)."
            )
        options = ort.SessionOptions()
        # The cores are shared with the HTTP/gRPC threads and the router's stub: thread count
        # and spinning come from the config (see its comment for the measurements).
        options.intra_op_num_threads = int(parameters.get("intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", parameters.get("allow_spinning", "0")
        )
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session: ort.InferenceSession | None = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def _read_request(self, request: Any) -> np.ndarray | str:
        """The request's images (uint8 NHWC or normalised float32 NCHW, as sent), or the reason
        it is rejected."""
        images = pb_utils.get_input_tensor_by_name(request, UINT8_INPUT)
        floats = pb_utils.get_input_tensor_by_name(request, FLOAT_INPUT)
        where = f"{self.model_name} version {self.version}"
        if (images is None) == (floats is None):
            given = "both" if images is not None else "neither"
            return (
                f"{where}: send exactly one of the inputs '{UINT8_INPUT}' (uint8 N,32,32,3) or "
                f"'{FLOAT_INPUT}' (normalised float32 N,3,32,32); this request had {given}."
            )
        if images is not None:
            array = images.as_numpy()
            if array.dtype != np.uint8 or array.shape[1:] != (32, 32, 3):
                return (
                    f"{where}: '{UINT8_INPUT}' must be uint8 (N, 32, 32, 3), got "
                    f"{array.dtype} {array.shape}."
                )
            batch = array
        else:
            batch = floats.as_numpy()
            if batch.dtype != np.float32 or batch.shape[1:] != (3, 32, 32):
                return (
                    f"{where}: '{FLOAT_INPUT}' must be float32 (N, 3, 32, 32), got "
                    f"{batch.dtype} {batch.shape}."
                )
            if not np.isfinite(batch).all():
                return (
                    f"{where}: '{FLOAT_INPUT}' holds NaN or infinite values; send normalised "
                    f"finite pixels, or raw pixels as '{UINT8_INPUT}'."
                )
            if batch.size and float(np.abs(batch).max()) > FLOAT_LIMIT:
                return (
                    f"{where}: '{FLOAT_INPUT}' holds values up to {float(np.abs(batch).max()):.6g}"
                    f" in magnitude, beyond the limit of {FLOAT_LIMIT:g} (normalised pixels lie "
                    f"within [-1.99, 2.13]); send raw pixels as '{UINT8_INPUT}', or normalise "
                    "them as cifar_assets.ml.model.normalise_uint8 does."
                )
        if batch.shape[0] == 0:
            return f"{where}: the request holds no images; send at least one."
        if self.max_batch_size and batch.shape[0] > self.max_batch_size:
            return (
                f"{where}: {batch.shape[0]} images in one request, at most "
                f"{self.max_batch_size}; split the request."
            )
        return batch

    def execute(self, requests: list[Any]) -> list[Any]:
        session = self.session
        if session is None:
            raise pb_utils.TritonModelException(f"{self.model_name} was finalized; load it again.")
        responses: list[Any] = [None] * len(requests)
        # One ONNX Runtime call for the whole batch: its logits hold the uint8 requests' rows
        # first, then the float requests', each kind in request order.
        kinds: dict[bool, list[tuple[int, np.ndarray]]] = {True: [], False: []}
        for index, request in enumerate(requests):
            batch = self._read_request(request)
            if isinstance(batch, str):
                responses[index] = invalid(batch)
            else:
                kinds[batch.dtype == np.uint8].append((index, batch))
        valid = kinds[True] + kinds[False]
        if valid:
            feed = {
                UINT8_INPUT: joined([batch for _, batch in kinds[True]], NO_IMAGES),
                FLOAT_INPUT: joined([batch for _, batch in kinds[False]], NO_FLOATS),
            }
            logits = session.run(["logits"], feed)[0]
            start = 0
            for index, batch in valid:
                part = logits[start : start + batch.shape[0]]
                start += batch.shape[0]
                if not np.isfinite(part).all():
                    responses[index] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(
                            f"{self.model_name} version {self.version}: the model produced "
                            "non-finite logits for this request, so it is not answered; "
                            "rewrite the version with a model that passes the ONNX parity check.",
                            pb_utils.TritonError.INTERNAL,
                        )
                    )
                    continue
                outputs = [pb_utils.Tensor("logits", part)]
                if "probabilities" in requests[index].requested_output_names():
                    outputs.append(pb_utils.Tensor("probabilities", softmax(part)))
                responses[index] = pb_utils.InferenceResponse(output_tensors=outputs)
        return responses

    def finalize(self) -> None:
        self.session = None
