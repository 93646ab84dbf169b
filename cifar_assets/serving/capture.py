"""Read the traffic the A/B router captured, and join user feedback (true labels) to it.

Layout under ``settings.capture_dir``, written by the router model (``triton_models/
ab_router_model.py``) and by :func:`record_feedback`; every file is append-only or written once::

    records/<utc-start>-<pid>.jsonl   one line per routed image: time, request_id, item (index
                                      in its request), user_id, served_version, predicted_class,
                                      predicted_label, confidence, latency_ms (router side),
                                      model_ms (the version's model CPU time per image);
                                      written before the router answers the request
    inputs/<utc-start>-<pid>-<n>.npz  sampled pixels: images uint8 (N, 32, 32, 3), request_ids
    feedback.jsonl                    time, request_id, item, label
    shadow/<utc-start>-<pid>.jsonl    mirrored requests run on the shadow version: time,
                                      request_id, item, shadow_version, champion_version,
                                      champion_class, predicted_class, model_cpu_ms and
                                      champion_model_cpu_ms (per image), error
    errors/<utc-start>-<pid>.jsonl    requests a version failed to answer: time, request_id,
                                      served_version, error
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cifar_assets.data.imageset import CLASSES

if TYPE_CHECKING:
    import pandas as pd

RECORDS_DIR = "records"
INPUTS_DIR = "inputs"
SHADOW_DIR = "shadow"
ERRORS_DIR = "errors"
SHADOW_COLUMNS = (
    "time",
    "request_id",
    "item",
    "shadow_version",
    "champion_version",
    "champion_class",
    "predicted_class",
    "model_cpu_ms",
    "champion_model_cpu_ms",
    "error",
)
ERROR_COLUMNS = ("time", "request_id", "served_version", "error")
FEEDBACK_FILE = "feedback.jsonl"
CAPTURE_COLUMNS = (
    "time",
    "request_id",
    "item",
    "user_id",
    "served_version",
    "predicted_class",
    "predicted_label",
    "confidence",
    "latency_ms",
    "model_ms",
)
FEEDBACK_COLUMNS = ("feedback_time", "request_id", "item", "label")


class CaptureError(ValueError):
    """Captured traffic or feedback that cannot be read or recorded as asked."""


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as exc:
            # A server killed mid-write can leave a torn last line; anything else is damage.
            if number == len(lines):
                break
            raise CaptureError(
                f"{path}:{number} is not a JSON line ({exc}); the capture file is damaged. "
                "Move the file aside to read the rest of the capture."
            ) from exc
    return rows


def read_capture(capture_dir: Path) -> pd.DataFrame:
    """Every captured image as one row (columns CAPTURE_COLUMNS), oldest first."""
    import pandas as pd

    files = sorted((Path(capture_dir) / RECORDS_DIR).glob("*.jsonl"))
    rows = [row for path in files for row in _read_jsonl(path)]
    frame = pd.DataFrame(rows, columns=list(CAPTURE_COLUMNS))
    frame["time"] = pd.to_datetime(frame["time"], utc=True, format="ISO8601")
    for column in ("item", "served_version", "predicted_class"):
        frame[column] = frame[column].astype("int64")
    for column in ("confidence", "latency_ms", "model_ms"):
        frame[column] = frame[column].astype("float64")
    return frame.sort_values(["time", "request_id", "item"], kind="stable").reset_index(drop=True)


def read_captured_inputs(capture_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The sampled pixels: uint8 (N, 32, 32, 3) and the request id of each image (a request of
    several images repeats its id, in item order)."""
    files = sorted((Path(capture_dir) / INPUTS_DIR).glob("*.npz"))
    files = [f for f in files if not f.name.endswith(".tmp.npz")]
    images, request_ids = [], []
    for path in files:
        with np.load(path, allow_pickle=False) as chunk:
            images.append(chunk["images"])
            request_ids.append(chunk["request_ids"])
    if not images:
        return np.zeros((0, 32, 32, 3), dtype=np.uint8), np.zeros((0,), dtype="<U32")
    return np.concatenate(images), np.concatenate(request_ids)


def record_feedback(capture_dir: Path, request_id: str, label: int | str, item: int = 0) -> None:
    """Append the true ``label`` (0..9 or a class name) of image ``item`` of a captured request.

    The request must be in the capture: feedback for an unknown id would never join. The last
    feedback recorded for an image wins. For many labels at once use :func:`record_feedbacks`,
    which reads the capture once.
    """
    record_feedbacks(capture_dir, [(request_id, label, item)])


def _label_index(request_id: str, label: int | str) -> int:
    if isinstance(label, str):
        if label not in CLASSES:
            raise CaptureError(
                f"Feedback label {label!r} for request {request_id!r} is not a CIFAR-10 class; "
                f"use one of {list(CLASSES)} or its index 0..9."
            )
        return CLASSES.index(label)
    if isinstance(label, bool) or not isinstance(label, int | np.integer) or not 0 <= label <= 9:
        raise CaptureError(
            f"Feedback label {label!r} for request {request_id!r} is not a class index 0..9 "
            f"(or a class name such as {CLASSES[0]!r})."
        )
    return int(label)


def record_feedbacks(capture_dir: Path, feedback: list[tuple[str, int | str, int]]) -> None:
    """Append ``(request_id, label, item)`` feedbacks, all checked against the capture (read
    once) before any is written: one bad entry writes none."""
    checked = [
        (request_id, _label_index(request_id, label), item) for request_id, label, item in feedback
    ]
    capture = read_capture(capture_dir)
    items: dict[str, set[int]] = {}
    for request_id, item in zip(capture["request_id"], capture["item"], strict=True):
        items.setdefault(request_id, set()).add(int(item))
    for request_id, _, item in checked:
        if request_id not in items:
            raise CaptureError(
                f"Request id {request_id!r} is not in the capture under {capture_dir}; send the "
                "request through the router (cifar10_ab) with that id (the router writes its "
                "record before it answers)."
            )
        if item not in items[request_id]:
            raise CaptureError(
                f"Request {request_id!r} has items {sorted(items[request_id])}, not {item}; give "
                "the index of the image within its request."
            )
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    lines = "".join(
        json.dumps({"time": now, "request_id": r, "item": int(i), "label": label}) + "\n"
        for r, label, i in checked
    )
    path = Path(capture_dir) / FEEDBACK_FILE
    with path.open("a", encoding="utf-8") as handle:
        handle.write(lines)


def read_feedback(capture_dir: Path) -> pd.DataFrame:
    """Feedback rows (columns FEEDBACK_COLUMNS), the last one per image only."""
    import pandas as pd

    path = Path(capture_dir) / FEEDBACK_FILE
    rows = _read_jsonl(path) if path.is_file() else []
    frame = pd.DataFrame(rows, columns=["time", "request_id", "item", "label"])
    frame = frame.rename(columns={"time": "feedback_time"})
    frame["feedback_time"] = pd.to_datetime(frame["feedback_time"], utc=True, format="ISO8601")
    frame["item"] = frame["item"].astype("int64")
    frame["label"] = frame["label"].astype("int64")
    frame = frame.drop_duplicates(["request_id", "item"], keep="last")
    return frame.reset_index(drop=True)


def capture_with_feedback(capture_dir: Path) -> pd.DataFrame:
    """Every captured image, with ``label`` and ``correct`` where feedback gave one (missing
    elsewhere): request counts come from all rows, accuracy from the labelled ones."""
    feedback = read_feedback(capture_dir)[["request_id", "item", "label"]]
    joined = read_capture(capture_dir).merge(feedback, on=["request_id", "item"], how="left")
    joined["correct"] = (joined["predicted_class"] == joined["label"]).where(
        joined["label"].notna()
    )
    return joined


def join_feedback(capture_dir: Path) -> pd.DataFrame:
    """Captured images that have feedback, with ``label`` and ``correct`` (prediction == label)
    beside the capture columns: the data an A/B report compares versions on."""
    joined = read_capture(capture_dir).merge(
        read_feedback(capture_dir), on=["request_id", "item"], how="inner"
    )
    joined["correct"] = joined["predicted_class"] == joined["label"]
    return joined


def _read_folder(folder: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    import pandas as pd

    rows = [row for path in sorted(folder.glob("*.jsonl")) for row in _read_jsonl(path)]
    frame = pd.DataFrame(rows, columns=list(columns))
    frame["time"] = pd.to_datetime(frame["time"], utc=True, format="ISO8601")
    return frame.sort_values("time", kind="stable").reset_index(drop=True)


def read_shadow(capture_dir: Path) -> pd.DataFrame:
    """The shadow version's answers to mirrored requests (columns SHADOW_COLUMNS), oldest first;
    ``predicted_class`` is missing where ``error`` says why it failed."""
    return _read_folder(Path(capture_dir) / SHADOW_DIR, SHADOW_COLUMNS)


def read_errors(capture_dir: Path) -> pd.DataFrame:
    """Requests a version failed to answer (columns ERROR_COLUMNS), oldest first."""
    return _read_folder(Path(capture_dir) / ERRORS_DIR, ERROR_COLUMNS)
