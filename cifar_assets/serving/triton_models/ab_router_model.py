"""Triton python-backend model: the A/B router in front of ``cifar10_resnet18``.

Copied to ``cifar10_ab/1/model.py`` by ``cifar_assets.serving.repository.install_router``. Runs
inside Triton's python-backend stub, so it is self-contained: numpy, and onnxruntime in the
``inprocess`` execution mode, never the ``cifar_assets`` package.

Each request goes to one live version of the target model, chosen by a deterministic hash of its
``user_id`` request parameter against the weights in the JSON file named by the ``ab_weights_file``
config parameter (so a user always sees the same version while the weights stay the same).
Requests without a user id are spread by their request id, or by a golden-ratio counter when they
have none. The file is re-read when it changes, checked by one ``stat`` per batch (microseconds),
so once ``set_ab_weights`` has replaced the file the next batch uses the new weights; it is also
re-read at least once a second.

The ``execution`` config parameter says how the chosen version runs:

- ``inprocess`` (default): the router runs the version's ``model_serving.onnx`` (the target
  model's folder, a sibling of the router's) with ONNX Runtime itself, with the classifier's
  session options (``intra_op_threads``, ``allow_spinning``): the network with the normalisation
  of uint8 pixels in its graph, which takes both inputs, as the classifier runs it. That saves
  the second python-backend hop of ``bls``: on 2 cores it was most of the router's cost at
  batch 1. One session per weighted version, created when the weights are (re)read, dropped when
  the version leaves the weights, and re-created when its ``model_serving.onnx`` changes (inode,
  mtime, size). At every re-read (at least once a second) each weighted version is asked
  ``is_model_ready`` on the target model: a version that Triton no longer serves (a rollback
  unloaded it) is refused with UNAVAILABLE, as ``bls`` refuses it. A dynamic batch becomes one
  ONNX Runtime call per version, uint8 and float requests together.
- ``bls``: a whole dynamic batch is routed at once: its requests are grouped by (version, input),
  each group becomes one BLS call to the target model's version, the groups run concurrently
  with ``async_exec``, and a group of one request forwards its input tensor untouched. For
  servers whose versions run elsewhere (the native onnxruntime backend, a GPU).

Requests are checked as the classifier checks them (one input; finite floats within
+-FLOAT_LIMIT; at least one image) and ``user_id`` and the request id are at most MAX_ID_BYTES
bytes; a bad request gets its own INVALID_ARG error. Logits that are not finite are never
answered.

Every routed image is recorded (UTC time, request id, user, served version, predicted class,
confidence, router latency) as a strict-JSON line under ``capture_dir``. The lines of a batch are
handed to the kernel with one ``write`` on an ``O_APPEND`` descriptor inside ``execute``, before
its responses are returned, so every answered request has its record in the page cache: a
SIGKILL of tritonserver or of this stub loses none. ``capture_fsync`` says when they reach the
disk: ``interval`` (default), a background thread calls ``fdatasync`` at most once a second after
a write, so a power failure loses at most about a second of records; ``batch``, ``fdatasync``
before each batch's responses leave (nothing answered is lost even then, at the cost of a disk
flush per batch). A record that cannot be written (a full disk) is kept and written with the next
batch; serving goes on, and the error is printed to the server log.

Shadow traffic: when ``shadow.json`` beside the weights file names a version and a share, that
share of the requests (by a hash of the request id) is also run on that version, after the
user's answer has left (the model's CPU time per image is recorded on both sides, so their cost
compares like with like on a busy machine): the batch goes to a bounded queue that a background thread drains with
the version's own session, and the candidate's answer is recorded under ``capture_dir/shadow``
(its predicted class beside the champion's, its latency, or its error) and never sent to anyone.
When the queue is full, mirroring is skipped, not the answer delayed. In ``bls`` mode nothing is
mirrored. Requests a version fails to answer are recorded under ``capture_dir/errors``.

A ``capture_input_sample_rate`` share of the requests, chosen by a hash of the request id, also
has its pixels kept as uint8 ``.npz`` chunks (256 images or 10 s, whichever comes first, and on
``finalize``) by the background thread, for drift detection. Those samples are not durable: a
SIGKILL loses the chunk being gathered. The file layout is the one
``cifar_assets.serving.capture`` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from typing import Any, NamedTuple

import numpy as np
import triton_python_backend_utils as pb_utils

UINT8_INPUT = "images_uint8"
FLOAT_INPUT = "input"
# Keep in step with classifier_model.py and cifar_assets.ml.model (a test compares the outputs).
CIFAR_MEAN = np.asarray((0.4914, 0.4822, 0.4465), dtype=np.float32)
CIFAR_STD = np.asarray((0.2470, 0.2435, 0.2616), dtype=np.float32)
GOLDEN = 0.6180339887498949
RECORDS_DIR = "records"
INPUTS_DIR = "inputs"
SHADOW_DIR = "shadow"  # the candidate's answers to mirrored requests (never sent to anyone)
ERRORS_DIR = "errors"  # requests a version failed to answer
SERVING_ONNX = "model_serving.onnx"  # keep in step with repository.SERVING_ONNX
NO_IMAGES = np.zeros((0, 32, 32, 3), dtype=np.uint8)
NO_FLOATS = np.zeros((0, 3, 32, 32), dtype=np.float32)
SHADOW_FILE = "shadow.json"  # beside the weights file: {"version": N, "share": s} or null
SHADOW_QUEUE_BATCHES = 64  # mirrored batches waiting for the candidate; more are dropped
WEIGHTS_MAX_AGE_S = 1.0
# Pixels go out in chunks of up to 256 images, at least every 10 s: fewer, larger files.
INPUT_CHUNK_IMAGES = 256
INPUT_FLUSH_INTERVAL_S = 10.0
EXECUTION_MODES = ("inprocess", "bls")
FSYNC_MODES = ("interval", "batch")
FSYNC_INTERVAL_S = 1.0
# Records that could not be written wait for the next batch, up to this many lines.
MAX_PENDING_ROWS = 100_000
# Keep in step with classifier_model.py: the router runs the versions itself in inprocess mode.
FLOAT_LIMIT = 5.0
# user_id and the request id are stored with every captured image.
MAX_ID_BYTES = 256
_STOP = object()


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from a string (Python's own hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def log(level: str, message: str, **context: Any) -> None:
    """One JSON line on stderr (Triton's log) with the fields of ``cifar_assets.logs`` (time,
    level, logger, component, message, and context such as ``request_ids``). The router runs in
    Triton's stub and cannot import that module, so it writes the same format itself."""
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "level": level,
        "logger": "cifar_assets.router",
        "component": "router",
        "message": message,
        **context,
    }
    print(json.dumps(entry, default=str), file=sys.stderr, flush=True)


def joined(arrays: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
    """One array of all ``arrays`` (no copy for one), or ``empty`` for none."""
    if not arrays:
        return empty
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def to_uint8(batch: np.ndarray) -> np.ndarray:
    """Normalised float NCHW back to uint8 NHWC pixels (exact for inputs that began as uint8)."""
    pixels = (batch.transpose(0, 2, 3, 1) * CIFAR_STD + CIFAR_MEAN) * 255.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def error_response(message: str, code: Any = None) -> Any:
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class CaptureWriter:
    """Writes each batch's records before its responses leave; sampled pixels on its own thread
    (with the once-a-second ``fdatasync`` of the ``interval`` policy)."""

    def __init__(
        self, capture_dir: Path, sample_rate: float, labels: list[str], fsync: str
    ) -> None:
        self.records_dir = capture_dir / RECORDS_DIR
        self.inputs_dir = capture_dir / INPUTS_DIR
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self.inputs_dir.mkdir(parents=True, exist_ok=True)
        self.sample_rate = sample_rate
        self.label_json = [json.dumps(label) for label in labels]
        self.fsync = fsync
        # One file per router process: appends never interleave between writers.
        self.stem = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
        self.records_path = self.records_dir / f"{self.stem}.jsonl"
        self.descriptor = os.open(
            self.records_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
        )
        self.pending: list[bytes] = []
        self.unsynced = threading.Event()
        self.chunk_index = 0
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self.thread.start()

    def sampled(self, request_id: str) -> bool:
        return self.sample_rate > 0 and hash_fraction("sample:" + request_id) < self.sample_rate

    def rows(self, entry: dict[str, Any]) -> list[bytes]:
        """One strict-JSON line per image. Runs before the response leaves, so the fields that
        all images of a request share are encoded once (per-image json.dumps of a dict cost
        7-8 us an image, this about 1)."""
        logits = entry["logits"]
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        predicted = probabilities.argmax(axis=1)
        confidences = probabilities[np.arange(len(predicted)), predicted]
        shared = {
            "time": entry["time"],
            "request_id": entry["request_id"],
            "user_id": entry["user_id"],
            "served_version": entry["version"],
            "latency_ms": round(entry["latency_ms"], 3),
            # The version's own model CPU time per image (inprocess mode): comparable between
            # versions, while latency_ms of a later group in a batch includes earlier groups.
            "model_ms": None if entry.get("model_ms") is None else round(entry["model_ms"], 3),
        }
        # Strict JSON: the router never answers non-finite logits, so nothing here is NaN.
        head = json.dumps(shared, allow_nan=False)[:-1]
        return [
            (
                f'{head}, "item": {item}, "predicted_class": {cls}, '
                f'"predicted_label": {self.label_json[cls]}, '
                f'"confidence": {round(confidence, 6)!r}}}\n'
            ).encode()
            for item, (cls, confidence) in enumerate(
                zip(predicted.tolist(), confidences.tolist(), strict=True)
            )
        ]

    def write(self, rows: list[bytes]) -> None:
        """Append ``rows`` (and any left over from a failed write) with one ``write`` call."""
        data = b"".join(self.pending + rows)
        if not data:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.descriptor, view) :]
            if self.fsync == "batch":
                os.fdatasync(self.descriptor)
            else:
                self.unsynced.set()
        except OSError as exc:
            # Serving goes on; the records wait for the next batch.
            kept = (self.pending + rows)[-MAX_PENDING_ROWS:]
            dropped = len(self.pending) + len(rows) - len(kept)
            self.pending = kept
            log(
                "ERROR",
                f"cifar10_ab capture: cannot write {self.records_path}: {exc}; "
                f"{len(kept)} records kept for the next batch, {dropped} dropped",
                request_ids=sorted({json.loads(row)["request_id"] for row in rows[:100]}),
            )
            return
        self.pending = []

    def put_pixels(self, pixels: np.ndarray, request_id: str) -> None:
        self.queue.put((pixels, request_id))

    def close(self, timeout_s: float = 30.0) -> None:
        self.queue.put(_STOP)
        self.thread.join(timeout_s)
        self.write([])
        with contextlib.suppress(OSError):
            os.fdatasync(self.descriptor)
        os.close(self.descriptor)

    def _write_inputs(self, images: list[np.ndarray], request_ids: list[str]) -> None:
        path = self.inputs_dir / f"{self.stem}-{self.chunk_index:06d}.npz"
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, images=np.concatenate(images), request_ids=np.asarray(request_ids))
        tmp.replace(path)
        self.chunk_index += 1

    def _run(self) -> None:
        images: list[np.ndarray] = []
        image_ids: list[str] = []
        next_input_flush = time.monotonic() + INPUT_FLUSH_INTERVAL_S
        stopping = False
        while not stopping:
            try:
                entry = self.queue.get(timeout=FSYNC_INTERVAL_S)
            except queue.Empty:
                entry = None
            if entry is _STOP:
                stopping = True
            elif entry is not None:
                pixels, request_id = entry
                images.append(pixels)
                image_ids.extend([request_id] * len(pixels))
            if self.unsynced.is_set():
                self.unsynced.clear()
                try:
                    os.fdatasync(self.descriptor)
                except OSError as exc:
                    log("ERROR", f"cifar10_ab capture: fdatasync failed: {exc}")
            chunk_due = len(image_ids) >= INPUT_CHUNK_IMAGES
            chunk_due = chunk_due or time.monotonic() >= next_input_flush
            if images and (stopping or chunk_due):
                try:
                    self._write_inputs(images, image_ids)
                except OSError as exc:
                    # Capture must never stop serving; the pixels stay for the next chunk.
                    log(
                        "ERROR",
                        f"cifar10_ab capture: cannot write under {self.inputs_dir}: {exc}",
                        request_ids=sorted(set(image_ids))[:100],
                    )
                else:
                    images, image_ids = [], []
                next_input_flush = time.monotonic() + INPUT_FLUSH_INTERVAL_S


class JsonLines:
    """An append-only JSON-lines file of this router process (not fsynced: these records are
    evidence for the rollout gates, not answers anyone was given)."""

    def __init__(self, folder: Path, stem: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{stem}.jsonl"
        self.descriptor = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
        )

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        data = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records).encode()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.descriptor, view) :]
        except OSError as exc:
            log(
                "ERROR",
                f"cifar10_ab: cannot write {self.path}: {exc}",
                request_ids=[r.get("request_id") for r in records][:100],
            )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.descriptor)


class ShadowWorker:
    """Runs mirrored batches on the shadow version after the answers have left."""

    def __init__(self, out: JsonLines) -> None:
        self.out = out
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=SHADOW_QUEUE_BATCHES)
        self.dropped = 0
        self.thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self.thread.start()

    def offer(self, item: tuple[Any, ...]) -> None:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log(
                    "WARNING",
                    f"cifar10_ab shadow: queue full, {self.dropped} batches not mirrored",
                    request_ids=sorted({row[0] for row in item[-1]["rows"]})[:100],
                )

    def close(self, timeout_s: float = 10.0) -> None:
        with contextlib.suppress(queue.Full):
            self.queue.put(_STOP, timeout=timeout_s)
        self.thread.join(timeout_s)
        self.out.close()

    def _run(self) -> None:
        while (item := self.queue.get()) is not _STOP:
            local, version, images, floats, meta = item
            count = len(images) + len(floats)
            started = time.thread_time()
            try:
                logits = local.run(images, floats)
                if not np.isfinite(logits).all():
                    raise ValueError("non-finite logits")
                predicted = logits.argmax(axis=1).tolist()
                error = None
            except Exception as exc:
                predicted, error = [None] * count, str(exc)[:500]
            # CPU time per image of this thread (ONNX Runtime runs in it), as the champion's
            # beside it: the same measure on both sides, which a busy machine does not skew.
            cpu_ms = round((time.thread_time() - started) * 1000.0 / count, 3)
            self.out.write(
                [
                    {
                        "time": meta["time"],
                        "request_id": request_id,
                        "item": item_index,
                        "shadow_version": version,
                        "champion_version": meta["champion"],
                        "champion_class": champion_class,
                        "predicted_class": cls,
                        "model_cpu_ms": cpu_ms,
                        "champion_model_cpu_ms": round(champion_ms, 3),
                        "error": error,
                    }
                    for (request_id, item_index, champion_class, champion_ms), cls in zip(
                        meta["rows"], predicted, strict=True
                    )
                ]
            )


class Routed(NamedTuple):
    """One request that passed the checks, and the version it goes to."""

    position: int  # in the batch of requests
    version: int
    tensor: Any  # pb_utils.Tensor: images_uint8 or input
    request_id: str
    user_id: str | None


class LocalVersion:
    """One version's model_serving.onnx in an ONNX Runtime session of the router's own
    (inprocess)."""

    def __init__(self, path: Path, key: tuple[int, int, int], options: Any) -> None:
        import onnxruntime as ort

        self.path = path
        self.key = key
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def run(self, images: np.ndarray, floats: np.ndarray) -> np.ndarray:
        """Logits of uint8 ``images`` and normalised ``floats`` (either may be empty): the
        images' rows first."""
        feed = {UINT8_INPUT: images, FLOAT_INPUT: floats}
        return np.asarray(self.session.run(["logits"], feed)[0], dtype=np.float32)


def session_options(parameters: dict[str, str], model_name: str) -> Any:
    """The classifier's ONNX Runtime options, from the same config parameters."""
    import onnxruntime as ort

    threads = parameters.get("intra_op_threads", "1")
    spinning = parameters.get("allow_spinning", "0")
    if not threads.isdigit() or spinning not in ("0", "1"):
        raise pb_utils.TritonModelException(
            f"{model_name}: config parameters intra_op_threads={threads!r} and "
            f"allow_spinning={spinning!r}; use a whole number of threads (0 = ONNX Runtime's "
            "choice) and 0 or 1, as in cifar10_resnet18's config.pbtxt."
        )
    options = ort.SessionOptions()
    # The cores are shared with the HTTP/gRPC threads and the stubs: see the classifier's config.
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


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
        self.execution = parameters.get("execution", "inprocess")
        if self.execution not in EXECUTION_MODES:
            raise pb_utils.TritonModelException(
                f"{self.model_name}: config parameter execution={self.execution!r}; use one of "
                f"{', '.join(EXECUTION_MODES)} (load_router(..., execution=...) sets it)."
            )
        self.weights_path = Path(weights_file)
        self.weights_key: tuple[int, int, int] | None = None
        self.weights_read_at = 0.0
        self.weights_problem = f"{self.model_name}: no usable A/B weights yet."
        self.versions: list[int] = []
        self.cumulative: list[float] = []
        self.counter = 0
        router_dir = Path(args["model_repository"])
        labels = (router_dir / "labels.txt").read_text().split()
        # inprocess: the target model's folder, the sessions of the weighted versions, and why
        # each weighted version without a session is refused.
        self.target_dir = router_dir.parent / self.target
        self.options = (
            session_options(parameters, self.model_name) if self.execution == "inprocess" else None
        )
        self.local: dict[int, LocalVersion] = {}
        self.refused: dict[int, tuple[str, Any]] = {}
        # version -> (file key, error) of a model_serving.onnx that could not be loaded: not retried
        # until the file changes.
        self.failed: dict[int, tuple[tuple[int, int, int] | None, str]] = {}
        fsync = parameters.get("capture_fsync", FSYNC_MODES[0])
        if fsync not in FSYNC_MODES:
            raise pb_utils.TritonModelException(
                f"{self.model_name}: config parameter capture_fsync={fsync!r}; use one of "
                f"{', '.join(FSYNC_MODES)} (load_router(..., capture_fsync=...) sets it)."
            )
        self.capture = CaptureWriter(
            Path(capture_dir),
            float(parameters.get("capture_input_sample_rate", "0")),
            labels,
            fsync,
        )
        self.shadow_path = self.weights_path.parent / SHADOW_FILE
        self.shadow: tuple[int, float] | None = None
        stem = self.capture.stem
        self.errors = JsonLines(Path(capture_dir) / ERRORS_DIR, stem)
        self.shadow_worker = ShadowWorker(JsonLines(Path(capture_dir) / SHADOW_DIR, stem))
        if self.execution == "inprocess":
            # Build the sessions now rather than in the first request, when the weights exist.
            try:
                self._refresh_weights()
            except Exception as exc:
                log("WARNING", f"{self.model_name}: weights not read at load ({exc})")
                self.weights_key = None

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
            log("ERROR", f"{self.model_name}: ignoring unusable {self.weights_path}: {exc}")
            self.weights_problem = (
                f"{self.model_name}: {self.weights_path} is unusable ({exc}); rewrite it with "
                "set_ab_weights."
            )
        else:
            total = sum(w for _, w in pairs)
            running = 0.0
            self.versions, self.cumulative = [], []
            for version, weight in pairs:
                running += weight / total
                self.versions.append(version)
                self.cumulative.append(running)
        self.shadow = self._read_shadow()
        if self.execution == "inprocess":
            self._sync_sessions()
        return None if self.versions else self.weights_problem

    def _read_shadow(self) -> tuple[int, float] | None:
        try:
            shadow = json.loads(self.shadow_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log("ERROR", f"{self.model_name}: ignoring unusable {self.shadow_path}: {exc}")
            return None
        if not shadow:
            return None
        return int(shadow["version"]), float(shadow["share"])

    def _not_live(self, version: int) -> str:
        return (
            f"{self.model_name} -> {self.target} version {version}: that version is not live, "
            f"but the A/B weights in {self.weights_path} send traffic to it; set weights for "
            "live versions with set_ab_weights."
        )

    def _sync_sessions(self) -> None:
        """One session per weighted version that Triton serves, on its current
        model_serving.onnx."""
        wanted = list(self.versions)
        if self.shadow is not None and self.shadow[0] not in wanted:
            wanted.append(self.shadow[0])
        for version in [v for v in self.local if v not in wanted]:
            del self.local[version]
        self.refused = {}
        for version in wanted:
            if not pb_utils.is_model_ready(model_name=self.target, model_version=str(version)):
                self.local.pop(version, None)
                self.refused[version] = (self._not_live(version), pb_utils.TritonError.UNAVAILABLE)
                continue
            path = self.target_dir / str(version) / SERVING_ONNX
            key: tuple[int, int, int] | None = None
            try:
                status = os.stat(path)
                key = (status.st_ino, status.st_mtime_ns, status.st_size)
                current = self.local.get(version)
                failed = self.failed.get(version)
                if failed is not None and failed[0] == key:
                    raise RuntimeError(failed[1])  # the same file failed before: no retry
                if current is None or current.key != key:
                    # Stat first: a file replaced during the load is loaded again next time.
                    self.local[version] = LocalVersion(path, key, self.options)
                self.failed.pop(version, None)
            except Exception as exc:
                self.local.pop(version, None)
                message = (
                    f"{self.model_name} -> {self.target} version {version}: cannot run {path} "
                    f"in process ({exc}); rewrite the version with write_version, or load the "
                    "router with execution='bls'."
                )
                if version not in self.failed:
                    log("ERROR", message, version=version)
                self.failed[version] = (key, str(exc))
                self.refused[version] = (message, pb_utils.TritonError.INTERNAL)

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

    def _problem(self, images: Any, floats: Any) -> str | None:
        """Why a request's inputs are refused, or None. Checked here as the target model checks
        them: errors that come back through BLS lose their code (500 instead of 400), and in
        inprocess mode the router runs the model itself."""
        if (images is None) == (floats is None):
            given = "both" if images is not None else "neither"
            return (
                f"{self.model_name}: send exactly one of the inputs '{UINT8_INPUT}' (uint8 "
                f"N,32,32,3) or '{FLOAT_INPUT}' (normalised float32 N,3,32,32); this request had "
                f"{given}."
            )
        tensor = images if images is not None else floats
        if tensor.shape()[0] == 0:
            return f"{self.model_name}: the request holds no images; send at least one."
        if floats is not None:
            batch = floats.as_numpy()
            if not np.isfinite(batch).all():
                return (
                    f"{self.model_name}: '{FLOAT_INPUT}' holds NaN or infinite values; send "
                    f"normalised finite pixels, or raw pixels as '{UINT8_INPUT}'."
                )
            largest = float(np.abs(batch).max())
            if largest > FLOAT_LIMIT:
                return (
                    f"{self.model_name}: '{FLOAT_INPUT}' holds values up to {largest:.6g} in "
                    f"magnitude, beyond the limit of {FLOAT_LIMIT:g} (normalised pixels lie "
                    f"within [-1.99, 2.13]); send raw pixels as '{UINT8_INPUT}', or normalise "
                    "them as cifar_assets.ml.model.normalise_uint8 does."
                )
        return None

    def _too_long(self, what: str, value: str) -> str | None:
        size = len(value.encode("utf-8", errors="surrogatepass"))
        if size <= MAX_ID_BYTES:
            return None
        return (
            f"{self.model_name}: the {what} is {size} bytes, more than {MAX_ID_BYTES}; it is "
            "stored with every captured image, so send a short opaque id (e.g. a hash)."
        )

    def _route(self, requests: list[Any], responses: list[Any]) -> list[Routed]:
        """Check each request and pick its version; rejected ones get their error response."""
        routed = []
        for index, request in enumerate(requests):
            images = pb_utils.get_input_tensor_by_name(request, UINT8_INPUT)
            floats = pb_utils.get_input_tensor_by_name(request, FLOAT_INPUT)
            problem = self._problem(images, floats)
            try:
                parameters = json.loads(request.parameters() or "{}")
            except ValueError:
                parameters = {}
            user_id = parameters.get("user_id")
            user_id = None if user_id is None else str(user_id)
            given_id = request.request_id()
            if problem is None and user_id is not None:
                problem = self._too_long("user_id parameter", user_id)
            if problem is None and given_id:
                problem = self._too_long("request id", given_id)
            if problem is not None:
                responses[index] = error_response(problem)
                continue
            tensor = images if images is not None else floats
            version = self._pick(self._fraction(user_id, given_id))
            routed.append(Routed(index, version, tensor, given_id or uuid.uuid4().hex, user_id))
        return routed

    def _not_finite(self, version: int) -> Any:
        return error_response(
            f"{self.model_name} -> {self.target} version {version}: the model produced "
            "non-finite logits for this request, so it is not answered; rewrite the version "
            "with a model that passes the ONNX parity check.",
            pb_utils.TritonError.INTERNAL,
        )

    def _record(
        self,
        member: Routed,
        values: np.ndarray,
        when: str,
        latency_ms: float,
        model_ms: float | None = None,
    ) -> list[bytes]:
        """The request's capture lines (written by execute before it answers); its pixels go to
        the background thread if the request is sampled."""
        if self.capture.sampled(member.request_id):
            array = member.tensor.as_numpy()
            pixels = array.copy() if member.tensor.name() == UINT8_INPUT else to_uint8(array)
            self.capture.put_pixels(pixels, member.request_id)
        return self.capture.rows(
            {
                "time": when,
                "request_id": member.request_id,
                "user_id": member.user_id,
                "version": member.version,
                "logits": values,
                "latency_ms": latency_ms,
                "model_ms": model_ms,
            }
        )

    def execute(self, requests: list[Any]) -> Any:
        # bls returns a coroutine, which the stub runs on its event loop; inprocess returns the
        # responses directly and so skips the hand-over to the event loop's thread.
        if self.execution == "bls":
            return self._execute_bls(requests)
        return self._execute_inprocess(requests)

    def _execute_inprocess(self, requests: list[Any]) -> list[Any]:
        started = time.perf_counter()
        responses: list[Any] = [None] * len(requests)
        problem = self._refresh_weights()
        if problem is not None:
            return [error_response(problem, pb_utils.TritonError.UNAVAILABLE) for _ in requests]
        groups: dict[int, list[Routed]] = {}
        for member in self._route(requests, responses):
            groups.setdefault(member.version, []).append(member)
        rows: list[bytes] = []
        failures: list[dict[str, Any]] = []
        mirrored: list[tuple[Any, ...]] = []
        for version, members in groups.items():
            local = self.local.get(version)
            if local is None:
                message, code = self.refused.get(
                    version, (self._not_live(version), pb_utils.TritonError.UNAVAILABLE)
                )
                for member in members:
                    responses[member.position] = error_response(message, code)
                failures.extend(self._failure(m, version, message) for m in members)
                continue
            # One ONNX Runtime call: the uint8 requests' rows first, then the float ones'.
            members = [m for m in members if m.tensor.name() == UINT8_INPUT] + [
                m for m in members if m.tensor.name() != UINT8_INPUT
            ]
            arrays = [member.tensor.as_numpy() for member in members]
            uint8 = [a for a in arrays if a.dtype == np.uint8]
            floats = [a for a in arrays if a.dtype != np.uint8]
            images_in, floats_in = joined(uint8, NO_IMAGES), joined(floats, NO_FLOATS)
            run_started = time.thread_time()
            try:
                logits = local.run(images_in, floats_in)
            except Exception as exc:
                message = (
                    f"{self.model_name} -> {self.target} version {version}: ONNX Runtime failed "
                    f"on {local.path}: {exc}"
                )
                log("ERROR", message, request_ids=[m.request_id for m in members])
                for member in members:
                    responses[member.position] = error_response(
                        message, pb_utils.TritonError.INTERNAL
                    )
                failures.extend(self._failure(m, version, message) for m in members)
                continue
            latency_ms = (time.perf_counter() - started) * 1000.0
            model_ms = (time.thread_time() - run_started) * 1000.0 / len(logits)
            when = datetime.now(UTC).isoformat(timespec="milliseconds")
            start = 0
            for member, array in zip(members, arrays, strict=True):
                count = array.shape[0]
                values = logits[start : start + count]
                start += count
                if not np.isfinite(values).all():
                    responses[member.position] = self._not_finite(version)
                    failures.append(self._failure(member, version, "non-finite logits"))
                    continue
                served = np.full((count, 1), version, dtype=np.int64)
                responses[member.position] = pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("logits", values),
                        pb_utils.Tensor("served_version", served),
                    ]
                )
                rows.extend(self._record(member, values, when, latency_ms, model_ms))
                if self._mirrors(version, member.request_id):
                    mirrored.append((member, array, values, version, when, model_ms))
        self.capture.write(rows)  # before the responses leave: see the module's docstring
        self.errors.write(failures)
        self._mirror(mirrored)
        return responses

    def _failure(self, member: Routed, version: int, message: str) -> dict[str, Any]:
        return {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": member.request_id,
            "served_version": version,
            "error": message[:500],
        }

    def _mirrors(self, version: int, request_id: str) -> bool:
        return (
            self.shadow is not None
            and self.shadow[0] != version
            and hash_fraction("shadow:" + request_id) < self.shadow[1]
        )

    def _mirror(self, mirrored: list[tuple[Any, ...]]) -> None:
        """Queue the mirrored requests for the shadow version, as one batch."""
        if not mirrored or self.shadow is None:
            return
        local = self.local.get(self.shadow[0])
        if local is None:
            return
        # LocalVersion.run answers the uint8 images first: the rows follow that order.
        mirrored = [m for m in mirrored if m[1].dtype == np.uint8] + [
            m for m in mirrored if m[1].dtype != np.uint8
        ]
        images = joined([m[1] for m in mirrored if m[1].dtype == np.uint8], NO_IMAGES)
        floats = joined([m[1] for m in mirrored if m[1].dtype != np.uint8], NO_FLOATS)
        rows = [
            (member.request_id, index, int(cls), model_ms)
            for member, _, values, _, _, model_ms in mirrored
            for index, cls in enumerate(values.argmax(axis=1).tolist())
        ]
        meta = {"time": mirrored[0][4], "champion": mirrored[0][3], "rows": rows}
        self.shadow_worker.offer((local, self.shadow[0], images, floats, meta))

    async def _execute_bls(self, requests: list[Any]) -> list[Any]:
        started = time.perf_counter()
        responses: list[Any] = [None] * len(requests)
        problem = self._refresh_weights()
        if problem is not None:
            return [error_response(problem, pb_utils.TritonError.UNAVAILABLE) for _ in requests]
        groups: dict[tuple[int, str], list[Routed]] = {}
        for member in self._route(requests, responses):
            groups.setdefault((member.version, member.tensor.name()), []).append(member)
        rows: list[bytes] = []

        async def forward(version: int, name: str, members: list[Routed]) -> None:
            if len(members) == 1:
                inputs = [members[0].tensor]
            else:
                joined = np.concatenate([member.tensor.as_numpy() for member in members])
                inputs = [pb_utils.Tensor(name, joined)]
            bls = pb_utils.InferenceRequest(
                model_name=self.target,
                model_version=version,
                requested_output_names=["logits"],
                inputs=inputs,
            )
            answer = await bls.async_exec()
            if answer.has_error():
                if pb_utils.is_model_ready(model_name=self.target, model_version=str(version)):
                    message = f"{self.model_name} -> {self.target} version {version}: "
                    message += answer.error().message()
                    code = pb_utils.TritonError.INTERNAL
                else:
                    message, code = self._not_live(version), pb_utils.TritonError.UNAVAILABLE
                for member in members:
                    responses[member.position] = error_response(message, code)
                return
            logits = pb_utils.get_output_tensor_by_name(answer, "logits")
            whole = logits.as_numpy() if len(members) > 1 else None
            latency_ms = (time.perf_counter() - started) * 1000.0
            when = datetime.now(UTC).isoformat(timespec="milliseconds")
            start = 0
            for member in members:
                count = member.tensor.shape()[0]
                if whole is None:
                    out = logits
                    values = logits.as_numpy()
                else:
                    values = whole[start : start + count]
                    out = pb_utils.Tensor("logits", values)
                start += count
                if not np.isfinite(values).all():
                    responses[member.position] = self._not_finite(version)
                    continue
                served = np.full((count, 1), version, dtype=np.int64)
                responses[member.position] = pb_utils.InferenceResponse(
                    output_tensors=[out, pb_utils.Tensor("served_version", served)]
                )
                rows.extend(self._record(member, values, when, latency_ms))

        await asyncio.gather(*(forward(v, name, m) for (v, name), m in groups.items()))
        self.capture.write(rows)  # before the responses leave: see the module's docstring
        return responses

    def finalize(self) -> None:
        self.shadow_worker.close()
        self.errors.close()
        self.local = {}
        self.capture.close()
