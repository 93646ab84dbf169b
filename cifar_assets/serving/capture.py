"""Read the traffic the A/B router captured, and join user feedback (true labels) to it.

Layout under ``settings.capture_dir``, written by the router model (``triton_models/
ab_router_model.py``) and by :func:`record_feedback`; every file is append-only or written once::

    records/<utc-start>-<pid>.jsonl   one line per routed image: time, request_id, item (index
                                      in its request), user_id, served_version, predicted_class,
                                      predicted_label, confidence, latency_ms (router side);
                                      written before the router answers the request
    inputs/<utc-start>-<pid>-<n>.npz  sampled pixels: images uint8 (N, 32, 32, 3), request_ids
    feedback.jsonl                    time, request_id, item, label
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
    for column in ("confidence", "latency_ms"):
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
    feedback recorded for an image wins.
    """
    if isinstance(label, str):
        if label not in CLASSES:
            raise CaptureError(
                f"Feedback label {label!r} for request {request_id!r} is not a CIFAR-10 class; "
                f"use one of {list(CLASSES)} or its index 0..9."
            )
        label = CLASSES.index(label)
    if isinstance(label, bool) or not isinstance(label, int | np.integer) or not 0 <= label <= 9:
        raise CaptureError(
            f"Feedback label {label!r} for request {request_id!r} is not a class index 0..9 "
            f"(or a class name such as {CLASSES[0]!r})."
        )
    capture = read_capture(capture_dir)
    match = capture[capture["request_id"] == request_id]
    if match.empty:
        raise CaptureError(
            f"Request id {request_id!r} is not in the capture under {capture_dir}; send the "
            "request through the router (cifar10_ab) with that id (the router writes its "
            "record before it answers)."
        )
    if item not in set(match["item"]):
        raise CaptureError(
            f"Request {request_id!r} has items {sorted(match['item'])}, not {item}; give the "
            "index of the image within its request."
        )
    line = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "request_id": request_id,
        "item": int(item),
        "label": int(label),
    }
    path = Path(capture_dir) / FEEDBACK_FILE
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


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


def join_feedback(capture_dir: Path) -> pd.DataFrame:
    """Captured images that have feedback, with ``label`` and ``correct`` (prediction == label)
    beside the capture columns: the data an A/B report compares versions on."""
    joined = read_capture(capture_dir).merge(
        read_feedback(capture_dir), on=["request_id", "item"], how="inner"
    )
    joined["correct"] = joined["predicted_class"] == joined["label"]
    return joined
