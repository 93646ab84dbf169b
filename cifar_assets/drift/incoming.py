"""Production batches waiting for a drift check: files dropped in the incoming folder, and windows
of the traffic the A/B router captured.

The incoming folder (``settings.incoming_dir``) holds one batch per entry:

- ``<name>.npz`` with an ``images`` array, uint8 (N, 32, 32, 3), and optionally ``labels``
  (int, 0..9, or -1 for an unlabelled image);
- ``<name>/``, a folder of PNG/JPEG images: labelled when its subfolders are CIFAR-10 class names
  (``<name>/cat/1.png``), unlabelled when the images lie in it directly.

Hidden entries (``.name``) and half-written files (``*.tmp.npz``, as :func:`save_npz` writes
them) are skipped. A batch id is the entry's name when that is made of letters, digits, ``-`` and
``_`` only (so it can serve as a Dagster partition key); any other name is made safe and given a
short hash of the original, so two different names never share an id and an id never changes.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np

from cifar_assets.data.errors import DataSourceError
from cifar_assets.data.imageset import CLASSES, IMAGE_SHAPE, UNLABELLED, ImageSet

BatchKind = Literal["npz", "image_folder"]
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_ID = 64


@dataclass(frozen=True)
class IncomingBatch:
    batch_id: str
    path: Path
    kind: BatchKind


def batch_id_for(name: str) -> str:
    """A stable id made of letters, digits, ``-`` and ``_`` for an entry called ``name``."""
    if _SAFE_ID.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    safe = _UNSAFE.sub("-", name).strip("-")[: _MAX_ID - len(digest) - 1]
    return f"{safe}-{digest}" if safe else f"batch-{digest}"


def discover_batches(incoming_dir: Path) -> list[IncomingBatch]:
    """Every batch in ``incoming_dir``, sorted by id; an absent folder holds none yet."""
    incoming_dir = Path(incoming_dir)
    if not incoming_dir.exists():
        return []
    if not incoming_dir.is_dir():
        raise DataSourceError(
            f"The incoming folder {incoming_dir} is a file, not a folder; point "
            "CIFAR_INCOMING_DIR at a folder of .npz files and image folders."
        )
    batches: dict[str, IncomingBatch] = {}
    for entry in sorted(incoming_dir.iterdir()):
        if entry.name.startswith(".") or entry.name.endswith(".tmp.npz"):
            continue
        if entry.is_dir():
            batch = IncomingBatch(batch_id_for(entry.name), entry, "image_folder")
        elif entry.is_file() and entry.suffix.lower() == ".npz":
            batch = IncomingBatch(batch_id_for(entry.stem), entry, "npz")
        else:
            continue
        if batch.batch_id in batches:
            raise DataSourceError(
                f"{batches[batch.batch_id].path} and {entry} would both be batch "
                f"{batch.batch_id!r}; rename one of them so every batch has its own name."
            )
        batches[batch.batch_id] = batch
    return sorted(batches.values(), key=lambda batch: batch.batch_id)


def load_batch(batch: IncomingBatch) -> ImageSet:
    """Read a batch; images without labels get label -1."""
    if batch.kind == "npz":
        return _load_npz_batch(batch)
    return _load_folder_batch(batch)


def _load_npz_batch(batch: IncomingBatch) -> ImageSet:
    path = batch.path
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError as exc:
        raise DataSourceError(
            f"Batch file {path} has disappeared; it was listed but can no longer be read. "
            "Run the discovery again."
        ) from exc
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataSourceError(
            f"Batch file {path} is not a readable .npz ({exc}). Write it with numpy.savez "
            "(arrays 'images' and optional 'labels', no object arrays), or remove it."
        ) from exc
    if "images" not in arrays:
        raise DataSourceError(
            f"Batch file {path} has arrays {sorted(arrays)} but no 'images'; save the pixels "
            "as images=uint8 array (N, 32, 32, 3)."
        )
    images = arrays["images"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise DataSourceError(
            f"Batch file {path}: 'images' is {images.dtype} {images.shape}, expected uint8 "
            "(N, 32, 32, 3); convert to 8-bit 32x32 RGB (0..255) before saving."
        )
    if len(images) == 0:
        raise DataSourceError(f"Batch file {path} holds no images; remove it or fill it.")
    if "labels" in arrays:
        labels = arrays["labels"]
        if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (len(images),):
            raise DataSourceError(
                f"Batch file {path}: 'labels' is {labels.dtype} {labels.shape}, expected "
                f"integers of shape ({len(images)},), one per image."
            )
        bad = labels[(labels < UNLABELLED) | (labels >= len(CLASSES))]
        if bad.size:
            raise DataSourceError(
                f"Batch file {path}: labels {np.unique(bad)[:10].tolist()} are outside 0..9; "
                "use the CIFAR-10 class index, or -1 for an image without a label."
            )
    else:
        labels = np.full(len(images), UNLABELLED, dtype=np.int64)
    return ImageSet.from_arrays(images, labels, source=f"incoming:{batch.batch_id}")


def _load_folder_batch(batch: IncomingBatch) -> ImageSet:
    from cifar_assets.data.image_folder import load_image_folder

    subfolders = [
        entry.name
        for entry in batch.path.iterdir()
        if entry.is_dir() and not entry.name.startswith(".")
    ]
    labelled = bool(subfolders) and all(name in CLASSES for name in subfolders)
    if subfolders and not labelled and any(name in CLASSES for name in subfolders):
        unknown = sorted(name for name in subfolders if name not in CLASSES)
        raise DataSourceError(
            f"Batch folder {batch.path} mixes class folders with other folders {unknown}; "
            f"name every subfolder after a class ({', '.join(CLASSES)}) for a labelled batch, "
            "or use no class names for an unlabelled one."
        )
    imageset, _ = load_image_folder(batch.path, labelled=labelled)
    return ImageSet(imageset.images, imageset.labels, imageset.ids, f"incoming:{batch.batch_id}")


def batch_from_capture(
    capture_dir: Path, since: datetime | None = None, until: datetime | None = None
) -> ImageSet | None:
    """The captured images whose request arrived in ``[since, until)``, labelled with feedback
    where some was given (else -1); ``None`` when the window holds no captured image.

    Only images whose routing record has been written count: the router samples pixels and
    records requests separately, and an image without a record has no time to place it in a window.
    """
    import pandas as pd

    from cifar_assets.serving.capture import read_capture, read_captured_inputs, read_feedback

    for name, moment in (("since", since), ("until", until)):
        if moment is not None and moment.tzinfo is None:
            raise DataSourceError(
                f"batch_from_capture: {name}={moment.isoformat()} has no time zone; capture "
                "times are UTC, so pass an aware datetime such as datetime.now(UTC)."
            )
    images, request_ids = read_captured_inputs(Path(capture_dir))
    if len(images) == 0:
        return None
    inputs = pd.DataFrame({"request_id": request_ids.astype(str), "row": np.arange(len(images))})
    # Pixels of a multi-image request are stored in item order, one after another.
    inputs["item"] = inputs.groupby("request_id").cumcount()
    records = read_capture(Path(capture_dir))[["request_id", "item", "time"]]
    rows = inputs.merge(records, on=["request_id", "item"], how="inner")
    if since is not None:
        rows = rows[rows["time"] >= pd.Timestamp(since)]
    if until is not None:
        rows = rows[rows["time"] < pd.Timestamp(until)]
    if rows.empty:
        return None
    feedback = read_feedback(Path(capture_dir))[["request_id", "item", "label"]]
    rows = rows.merge(feedback, on=["request_id", "item"], how="left").sort_values("row")
    labels = rows["label"].fillna(UNLABELLED).to_numpy(dtype=np.int64)
    window = f"{since.isoformat() if since else 'start'}..{until.isoformat() if until else 'now'}"
    return ImageSet.from_arrays(images[rows["row"].to_numpy()], labels, source=f"capture:{window}")


CAPTURE_PREFIX = "capture-"
_WINDOW_FORMAT = "%Y%m%dT%H%M%SZ"


def capture_window_key(since: datetime, until: datetime) -> str:
    """The partition key of a capture window, e.g. ``capture-20261125T060000Z-20261126T060000Z``."""
    utc = [moment.astimezone(UTC) for moment in (since, until)]
    return CAPTURE_PREFIX + "-".join(moment.strftime(_WINDOW_FORMAT) for moment in utc)


def parse_capture_window_key(key: str) -> tuple[datetime, datetime]:
    try:
        since, until = key.removeprefix(CAPTURE_PREFIX).split("-")
        return (
            datetime.strptime(since, _WINDOW_FORMAT).replace(tzinfo=UTC),
            datetime.strptime(until, _WINDOW_FORMAT).replace(tzinfo=UTC),
        )
    except ValueError as exc:
        raise DataSourceError(
            f"{key!r} is not a capture window key; expected "
            f"'capture-<since>-<until>' with times like 20261126T060000Z."
        ) from exc


def count_captured(capture_dir: Path, since: datetime, until: datetime) -> int:
    """How many captured images fall in ``[since, until)`` (0 when there is no capture yet)."""
    batch = batch_from_capture(capture_dir, since, until)
    return 0 if batch is None else len(batch)


def load_partition(key: str, incoming_dir: Path, capture_dir: Path) -> ImageSet:
    """The ImageSet behind an ``incoming_batch`` partition key: a capture window or a batch in
    the incoming folder."""
    if key.startswith(CAPTURE_PREFIX):
        since, until = parse_capture_window_key(key)
        batch = batch_from_capture(capture_dir, since, until)
        if batch is None:
            raise DataSourceError(
                f"No captured images between {since.isoformat()} and {until.isoformat()} in "
                f"{capture_dir}; send traffic through the cifar10_ab router first."
            )
        return batch
    for candidate in discover_batches(incoming_dir):
        if candidate.batch_id == key:
            return load_batch(candidate)
    raise DataSourceError(
        f"Batch {key!r} is no longer in {incoming_dir}; put the file back or delete the "
        "partition in the Dagster UI."
    )
