"""Triton python-backend model: the A/B router in front of ``cifar10_resnet18``.

Copied to ``cifar10_ab/1/model.py`` by ``cifar_assets.serving.repository.install_router``. Runs
inside Triton's python-backend stub, so it is self-contained (numpy only).

Each request goes to one live version of the target model, chosen by a deterministic hash of its
``user_id`` request parameter against the weights in the JSON file named by the ``ab_weights_file``
config parameter (so a user always sees the same version while the weights stay the same).
Requests without a user id are spread by their request id, or by a golden-ratio counter when they
have none. The file is re-read when it changes, checked by one ``stat`` per batch (microseconds),
so once ``set_ab_weights`` has replaced the file the next batch uses the new weights; it is also
re-read at least once a second.

To keep the extra hop cheap, a whole dynamic batch is routed at once: its requests are grouped by
(version, input), each group becomes one BLS call, the groups run concurrently with ``async_exec``,
and a group of one request forwards its input tensor untouched.

Every routed image is recorded (UTC time, request id, user, served version, predicted class,
confidence, router latency) by a background thread that appends JSON lines under ``capture_dir``
at least once a second and on ``finalize``; a ``capture_input_sample_rate`` share of the requests,
chosen by a hash of the request id, also has its pixels kept as uint8 ``.npz`` chunks (256 images
or 10 s, whichever comes first, and on ``finalize``) for drift detection. The file layout is the one ``cifar_assets.serving.capture`` reads.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

UINT8_INPUT = "images_uint8"
FLOAT_INPUT = "input"
CIFAR_MEAN = np.asarray((0.4914, 0.4822, 0.4465), dtype=np.float32)
CIFAR_STD = np.asarray((0.2470, 0.2435, 0.2616), dtype=np.float32)
GOLDEN = 0.6180339887498949
RECORDS_DIR = "records"
INPUTS_DIR = "inputs"
FLUSH_INTERVAL_S = 1.0
WEIGHTS_MAX_AGE_S = 1.0
# Pixels go out in chunks of up to 256 images, at least every 10 s: fewer, larger files.
INPUT_CHUNK_IMAGES = 256
INPUT_FLUSH_INTERVAL_S = 10.0
_STOP = object()


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from a string (Python's own hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def to_uint8(batch: np.ndarray) -> np.ndarray:
    """Normalised float NCHW back to uint8 NHWC pixels (exact for inputs that began as uint8)."""
    pixels = (batch.transpose(0, 2, 3, 1) * CIFAR_STD + CIFAR_MEAN) * 255.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def error_response(message: str, code: Any = None) -> Any:
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class CaptureWriter:
    """Appends capture records from a queue on its own thread, so serving never waits on disk."""

    def __init__(self, capture_dir: Path, sample_rate: float, labels: list[str]) -> None:
        self.records_dir = capture_dir / RECORDS_DIR
        self.inputs_dir = capture_dir / INPUTS_DIR
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self.inputs_dir.mkdir(parents=True, exist_ok=True)
        self.sample_rate = sample_rate
        self.labels = labels
        # One file per router process: appends never interleave between writers.
        self.stem = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
        self.records_path = self.records_dir / f"{self.stem}.jsonl"
        self.chunk_index = 0
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self.thread.start()

    def sampled(self, request_id: str) -> bool:
        return self.sample_rate > 0 and hash_fraction("sample:" + request_id) < self.sample_rate

    def put(self, entry: dict[str, Any]) -> None:
        self.queue.put(entry)

    def close(self, timeout_s: float = 30.0) -> None:
        self.queue.put(_STOP)
        self.thread.join(timeout_s)

    def _rows(self, entry: dict[str, Any]) -> list[str]:
        logits = entry["logits"]
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        predicted = probabilities.argmax(axis=1)
        rows = []
        for item, cls in enumerate(predicted):
            rows.append(
                json.dumps(
                    {
                        "time": entry["time"],
                        "request_id": entry["request_id"],
                        "item": item,
                        "user_id": entry["user_id"],
                        "served_version": entry["version"],
                        "predicted_class": int(cls),
                        "predicted_label": self.labels[int(cls)],
                        "confidence": round(float(probabilities[item, cls]), 6),
                        "latency_ms": round(entry["latency_ms"], 3),
                    }
                )
            )
        return rows

    def _write_inputs(self, images: list[np.ndarray], request_ids: list[str]) -> None:
        path = self.inputs_dir / f"{self.stem}-{self.chunk_index:06d}.npz"
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, images=np.concatenate(images), request_ids=np.asarray(request_ids))
        tmp.replace(path)
        self.chunk_index += 1

    def _run(self) -> None:
        rows: list[str] = []
        images: list[np.ndarray] = []
        image_ids: list[str] = []
        next_flush = time.monotonic() + FLUSH_INTERVAL_S
        next_input_flush = time.monotonic() + INPUT_FLUSH_INTERVAL_S
        stopping = False
        while not stopping:
            try:
                entry = self.queue.get(timeout=max(0.0, next_flush - time.monotonic()))
            except queue.Empty:
                entry = None
            if entry is _STOP:
                stopping = True
            elif entry is not None:
                rows.extend(self._rows(entry))
                if entry["pixels"] is not None:
                    images.append(entry["pixels"])
                    image_ids.extend([entry["request_id"]] * len(entry["pixels"]))
            try:
                if rows and (stopping or time.monotonic() >= next_flush):
                    with self.records_path.open("a", encoding="utf-8") as handle:
                        handle.write("\n".join(rows) + "\n")
                    rows = []
                chunk_due = len(image_ids) >= INPUT_CHUNK_IMAGES
                chunk_due = chunk_due or time.monotonic() >= next_input_flush
                if images and (stopping or chunk_due):
                    self._write_inputs(images, image_ids)
                    images, image_ids = [], []
                    next_input_flush = time.monotonic() + INPUT_FLUSH_INTERVAL_S
            except OSError as exc:
                # Capture must never stop serving; the records stay queued for the next flush.
                print(
                    f"cifar10_ab capture: cannot write under {self.records_dir}: {exc}",
                    file=sys.stderr,
                )
            if time.monotonic() >= next_flush:
                next_flush = time.monotonic() + FLUSH_INTERVAL_S


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.model_name = config["name"]
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.target = parameters.get("target_model", "cifar10_resnet18")
        weights_file = parameters.get("ab_weights_file", "")
        capture_dir = parameters.get("capture_dir", "")
        if not weights_file or not capture_dir:
            raise pb_utils.TritonModelException(
                f"{self.model_name}: the config parameters 'ab_weights_file' and 'capture_dir' "
                "must be absolute paths; load the router with "
                "cifar_assets.serving.repository.load_router (cifar-triton start does)."
            )
        self.weights_path = Path(weights_file)
        self.weights_key: tuple[int, int, int] | None = None
        self.weights_read_at = 0.0
        self.weights_problem = f"{self.model_name}: no usable A/B weights yet."
        self.versions: list[int] = []
        self.cumulative: list[float] = []
        self.counter = 0
        labels_path = Path(args["model_repository"]) / "labels.txt"
        labels = labels_path.read_text().split()
        self.capture = CaptureWriter(
            Path(capture_dir), float(parameters.get("capture_input_sample_rate", "0")), labels
        )

    def _refresh_weights(self) -> str | None:
        """Re-read the weights if the file changed; returns why routing is impossible, if it is."""
        try:
            status = os.stat(self.weights_path)
        except FileNotFoundError:
            return (
                f"{self.model_name}: no A/B weights at {self.weights_path}; set them with "
                "cifar_assets.serving.repository.set_ab_weights (or cifar-triton weights)."
            )
        # set_ab_weights renames a new file into place, so the inode changes with every write;
        # mtimes tick only every few ms. The forced re-read bounds what a reused inode within
        # the same tick could hide to one second.
        key = (status.st_ino, status.st_mtime_ns, status.st_size)
        now = time.monotonic()
        if key == self.weights_key and now < self.weights_read_at + WEIGHTS_MAX_AGE_S:
            return None if self.versions else self.weights_problem
        self.weights_key, self.weights_read_at = key, now
        try:
            weights = json.loads(self.weights_path.read_text())["weights"]
            pairs = sorted((int(v), float(w)) for v, w in weights.items() if float(w) > 0)
            if not pairs:
                raise ValueError("no version has a positive weight")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Keep serving with the weights already loaded; set_ab_weights never writes this.
            print(
                f"{self.model_name}: ignoring unusable {self.weights_path}: {exc}",
                file=sys.stderr,
            )
            self.weights_problem = (
                f"{self.model_name}: {self.weights_path} is unusable ({exc}); rewrite it with "
                "set_ab_weights."
            )
            return None if self.versions else self.weights_problem
        total = sum(w for _, w in pairs)
        running = 0.0
        self.versions, self.cumulative = [], []
        for version, weight in pairs:
            running += weight / total
            self.versions.append(version)
            self.cumulative.append(running)
        return None

    def _pick(self, fraction: float) -> int:
        for version, bound in zip(self.versions, self.cumulative, strict=True):
            if fraction < bound:
                return version
        return self.versions[-1]

    def _fraction(self, user_id: str | None, request_id: str | None) -> float:
        if user_id is not None:
            return hash_fraction(user_id)
        if request_id:
            return hash_fraction("request:" + request_id)
        self.counter += 1
        return (self.counter * GOLDEN) % 1.0

    async def execute(self, requests: list[Any]) -> list[Any]:
        started = time.perf_counter()
        responses: list[Any] = [None] * len(requests)
        problem = self._refresh_weights()
        if problem is not None:
            return [error_response(problem, pb_utils.TritonError.UNAVAILABLE) for _ in requests]
        # (version, input name) -> [(request index, tensor, request id, user id)]
        groups: dict[tuple[int, str], list[tuple[int, Any, str, str | None]]] = {}
        for index, request in enumerate(requests):
            images = pb_utils.get_input_tensor_by_name(request, UINT8_INPUT)
            floats = pb_utils.get_input_tensor_by_name(request, FLOAT_INPUT)
            if (images is None) == (floats is None):
                responses[index] = error_response(
                    f"{self.model_name}: send exactly one of the inputs '{UINT8_INPUT}' (uint8 "
                    f"N,32,32,3) or '{FLOAT_INPUT}' (normalised float32 N,3,32,32)."
                )
                continue
            # Checked here as the target model checks it: errors that come back through BLS
            # lose their code and would reach the client as 500 instead of 400.
            if floats is not None and not np.isfinite(floats.as_numpy()).all():
                responses[index] = error_response(
                    f"{self.model_name}: '{FLOAT_INPUT}' holds NaN or infinite values; send "
                    f"normalised finite pixels, or raw pixels as '{UINT8_INPUT}'."
                )
                continue
            try:
                parameters = json.loads(request.parameters() or "{}")
            except ValueError:
                parameters = {}
            user_id = parameters.get("user_id")
            user_id = None if user_id is None else str(user_id)
            given_id = request.request_id()
            version = self._pick(self._fraction(user_id, given_id))
            tensor = images if images is not None else floats
            groups.setdefault((version, tensor.name()), []).append(
                (index, tensor, given_id or uuid.uuid4().hex, user_id)
            )

        async def forward(version: int, name: str, members: list[Any]) -> None:
            if len(members) == 1:
                inputs = [members[0][1]]
            else:
                joined = np.concatenate([member[1].as_numpy() for member in members])
                inputs = [pb_utils.Tensor(name, joined)]
            bls = pb_utils.InferenceRequest(
                model_name=self.target,
                model_version=version,
                requested_output_names=["logits"],
                inputs=inputs,
            )
            answer = await bls.async_exec()
            if answer.has_error():
                message = f"{self.model_name} -> {self.target} version {version}: "
                if pb_utils.is_model_ready(model_name=self.target, model_version=str(version)):
                    message += answer.error().message()
                    code = pb_utils.TritonError.INTERNAL
                else:
                    message += (
                        f"that version is not live, but the A/B weights in {self.weights_path} "
                        "send traffic to it; set weights for live versions with set_ab_weights."
                    )
                    code = pb_utils.TritonError.UNAVAILABLE
                for index, *_ in members:
                    responses[index] = error_response(message, code)
                return
            logits = pb_utils.get_output_tensor_by_name(answer, "logits")
            whole = logits.as_numpy() if len(members) > 1 else None
            latency_ms = (time.perf_counter() - started) * 1000.0
            now = datetime.now(UTC).isoformat(timespec="milliseconds")
            start = 0
            for index, tensor, request_id, user_id in members:
                count = tensor.shape()[0]
                if whole is None:
                    out = logits
                    values = logits.as_numpy()
                else:
                    values = whole[start : start + count]
                    out = pb_utils.Tensor("logits", values)
                start += count
                served = np.full((count, 1), version, dtype=np.int64)
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[out, pb_utils.Tensor("served_version", served)]
                )
                pixels = None
                if self.capture.sampled(request_id):
                    array = tensor.as_numpy()
                    pixels = array.copy() if name == UINT8_INPUT else to_uint8(array)
                self.capture.put(
                    {
                        "time": now,
                        "request_id": request_id,
                        "user_id": user_id,
                        "version": version,
                        "logits": np.array(values, dtype=np.float32),
                        "pixels": pixels,
                        "latency_ms": latency_ms,
                    }
                )

        await asyncio.gather(*(forward(v, name, m) for (v, name), m in groups.items()))
        return responses

    def finalize(self) -> None:
        self.capture.close()
