"""Production batches waiting for a drift check: files dropped in the incoming folder, and windows
of the traffic the A/B router captured.

The incoming folder (``settings.incoming_dir``) holds one batch per entry:

- ``<name>.npz`` with an ``images`` array, uint8 (N, 32, 32, 3), and optionally ``labels``
  (int, 0..9, or -1 for an unlabelled image);
- ``<name>/``, a folder of PNG/JPEG images: labelled when its subfolders are CIFAR-10 class names
  (``<name>/cat/1.png``), unlabelled when the images lie in it directly.

A batch id is the entry's name when that is made of letters, digits, ``-`` and ``_`` only (so it
can serve as a Dagster partition key); any other name is made safe and given a short hash of the
original, so two different names never share an id and an id never changes.

The folder is read as untrusted input. :func:`discover_batches` reports every entry it does not
register, with a sentence naming the path and what to do:

- ``ignored``, skipped on purpose: hidden entries (``.name``, so a batch can be written under a
  dot-name and renamed when complete), files still being written (``*.tmp.npz`` as
  :func:`save_npz` writes them, ``*.tmp``, ``*.part``, ``*.partial``), files of other kinds, and
  empty folders;
- ``rejected``, needing a person: a symlink that leads outside its folder (or is broken), an .npz
  that is not a zip of plain numeric arrays, a folder without images, and two entries claiming one
  batch id (``dup.npz`` and ``dup.NPZ``). One bad entry never hides the others.

Nothing is ever unpickled: an .npz is opened with :mod:`zipfile` and its members read with
``allow_pickle=False``, and an array of Python objects is refused from its header alone.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
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
_BEING_WRITTEN = (".tmp.npz", ".tmp", ".part", ".partial")
_NPZ_HINT = (
    "Save it again with numpy.savez(path, images=<uint8 array (N, 32, 32, 3)>), adding "
    "labels=<int array (N,)> where known, or remove it."
)
_WRITE_HINT = (
    "If it is still being copied, copy it under a dot-name (.name) and rename it when complete."
)
# What reading a damaged zip or .npy member can raise, besides our own DataSourceError.
_NPZ_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    RuntimeError,
    NotImplementedError,
    zipfile.BadZipFile,
    zlib.error,
)


@dataclass(frozen=True)
class IncomingBatch:
    """A batch in the incoming folder: ``path`` is the entry itself (``<name>.npz`` or
    ``<name>/``), directly inside that folder."""

    batch_id: str
    path: Path
    kind: BatchKind


@dataclass(frozen=True)
class SkippedEntry:
    """An entry of the incoming folder that is not registered as a batch. ``reason`` is a whole
    sentence that names the path and says what to do; ``batch_id`` is the id the entry claims,
    when it looks like a batch (so a partition can say why its data is refused)."""

    path: Path
    reason: str
    batch_id: str | None = None


@dataclass(frozen=True)
class Discovery:
    """What :func:`discover_batches` found in the incoming folder.

    - ``batches``: the batches to register, sorted by id;
    - ``rejected``: entries that look like batches but cannot be used; a person has to act (log
      them as warnings), sorted by path;
    - ``ignored``: entries skipped on purpose (hidden, being written, not a batch, empty folder),
      sorted by path; worth an info line, so nobody is left guessing.
    """

    batches: tuple[IncomingBatch, ...] = ()
    rejected: tuple[SkippedEntry, ...] = ()
    ignored: tuple[SkippedEntry, ...] = ()


def batch_id_for(name: str) -> str:
    """A stable id made of letters, digits, ``-`` and ``_`` for an entry called ``name``."""
    if _SAFE_ID.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    safe = _UNSAFE.sub("-", name).strip("-")[: _MAX_ID - len(digest) - 1]
    return f"{safe}-{digest}" if safe else f"batch-{digest}"


def discover_batches(incoming_dir: Path) -> Discovery:
    """Every batch in ``incoming_dir``, and every entry that is not one with the reason; an absent
    folder holds none yet. Checks what can be checked without reading pixels: symlinks, the
    arrays an .npz declares, the layout of an image folder.

    Two entries that claim one batch id are both rejected, and neither is registered until one is
    renamed: picking one (say, the first by name) would let a file dropped later take over or
    hide an id that is already registered, so that a drift report could describe other pixels
    than the ones its partition names.
    """
    incoming_dir = Path(incoming_dir)
    if not incoming_dir.exists():
        return Discovery()
    if not incoming_dir.is_dir():
        raise DataSourceError(
            f"The incoming folder {incoming_dir} is a file, not a folder; point "
            "CIFAR_INCOMING_DIR at a folder of .npz files and image folders."
        )
    root = incoming_dir.resolve()
    try:
        entries = sorted(incoming_dir.iterdir())
    except OSError as exc:
        raise DataSourceError(
            f"The incoming folder {incoming_dir} cannot be listed ({exc.strerror}); give the "
            "user that runs Dagster read access to it."
        ) from exc
    ignored: list[SkippedEntry] = []
    rejected: list[SkippedEntry] = []
    claims: dict[str, list[IncomingBatch]] = {}
    for entry in entries:
        reason = _ignore_reason(entry)
        if reason is not None:
            ignored.append(SkippedEntry(entry, reason))
            continue
        try:
            target = _inside(entry, root)
        except DataSourceError as exc:
            rejected.append(SkippedEntry(entry, str(exc), _claimed_id(entry)))
            continue
        if target.is_dir():
            batch = IncomingBatch(batch_id_for(entry.name), entry, "image_folder")
        elif target.is_file() and entry.suffix.lower() == ".npz":
            batch = IncomingBatch(batch_id_for(entry.stem), entry, "npz")
        else:
            ignored.append(
                SkippedEntry(
                    entry,
                    f"{entry} is not a batch: only <name>.npz files and folders of images are "
                    "read. Move it out of the incoming folder to silence this note.",
                )
            )
            continue
        claims.setdefault(batch.batch_id, []).append(batch)

    batches: list[IncomingBatch] = []
    for batch_id, claimants in claims.items():
        if len(claimants) > 1:
            rejected.extend(_collisions(batch_id, claimants))
            continue
        batch = claimants[0]
        try:
            if batch.kind == "npz":
                _check_npz(batch.path, _inside(batch.path, root))
            elif not _has_visible_entries(_inside(batch.path, root)):
                ignored.append(
                    SkippedEntry(
                        batch.path,
                        f"{batch.path} is an empty folder; it is registered as batch "
                        f"{batch_id!r} once it holds images. {_WRITE_HINT}",
                        batch_id,
                    )
                )
                continue
            else:
                _check_folder(batch.path, _inside(batch.path, root))
        except DataSourceError as exc:
            rejected.append(SkippedEntry(batch.path, str(exc), batch_id))
            continue
        batches.append(batch)
    return Discovery(
        batches=tuple(sorted(batches, key=lambda batch: batch.batch_id)),
        rejected=tuple(sorted(rejected, key=lambda entry: entry.path)),
        ignored=tuple(sorted(ignored, key=lambda entry: entry.path)),
    )


def _ignore_reason(entry: Path) -> str | None:
    """Why an entry is skipped on purpose, from its name alone; ``None`` when it is not."""
    if entry.name.startswith("."):
        return (
            f"{entry} is hidden (its name starts with '.'), so it is skipped on purpose: write a "
            "batch under a dot-name and rename it when complete. Rename it without the dot to "
            "have it checked."
        )
    for suffix in _BEING_WRITTEN:
        if entry.name.lower().endswith(suffix):
            return (
                f"{entry} is still being written (its name ends in {suffix}), so it is skipped "
                "until it is renamed to its final name. Remove it if the writer died."
            )
    return None


def _claimed_id(entry: Path) -> str:
    """The batch id an entry claims by its name, before its target is known."""
    return batch_id_for(entry.stem if entry.suffix.lower() == ".npz" else entry.name)


def _collisions(batch_id: str, claimants: list[IncomingBatch]) -> list[SkippedEntry]:
    both = len(claimants) == 2
    rejected = []
    for batch in claimants:
        others = ", ".join(str(other.path) for other in claimants if other is not batch)
        rejected.append(
            SkippedEntry(
                batch.path,
                f"{batch.path} and {others} would {'both' if both else 'all'} be batch "
                f"{batch_id!r}, so {'neither' if both else 'none'} is registered; rename or "
                f"remove {'one' if both else 'all but one'} so every batch has its own name.",
                batch_id,
            )
        )
    return rejected


def _inside(path: Path, folder: Path) -> Path:
    """``path`` with every symlink resolved, refused when that leads outside ``folder`` (a
    resolved path) or onto ``folder`` itself, or when a link is broken."""
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError as exc:
        if path.is_symlink():
            raise DataSourceError(
                f"{path} is a broken symlink (to {os.readlink(path)}); remove it, or put the "
                "file itself in its place."
            ) from exc
        raise DataSourceError(
            f"{path} has disappeared; it was listed but can no longer be read. Put it back, "
            "or run the discovery again."
        ) from exc
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop, on Python 3.11
        raise DataSourceError(
            f"{path} cannot be resolved ({exc}); if it is a symlink, remove it and put the file "
            "itself in its place."
        ) from exc
    if target == folder or not target.is_relative_to(folder):
        raise DataSourceError(
            f"{path} is a symlink to {target}, outside its folder {folder}; links that leave the "
            "folder are never followed. Copy the data into the folder instead, or remove the link."
        )
    return target


def _has_visible_entries(folder: Path) -> bool:
    return any(not entry.name.startswith(".") for entry in folder.iterdir())


def load_batch(batch: IncomingBatch) -> ImageSet:
    """Read a batch; images without labels get label -1. The checks of :func:`discover_batches`
    run again (the folder may have changed since), so a batch whose path, or any path below its
    folder, is a symlink leading out of its folder is refused."""
    target = _inside(batch.path, batch.path.parent.resolve())
    if batch.kind == "npz":
        return _load_npz_batch(batch, target)
    return _load_folder_batch(batch, target)


@contextmanager
def _npz_archive(path: Path, target: Path) -> Iterator[zipfile.ZipFile]:
    """The .npz ``path`` (``target`` once its symlinks are resolved), opened as a zip archive;
    every read error inside the block is reported as a :class:`DataSourceError` naming ``path``.

    numpy.load takes a file that is not a zip for a pickle; going through zipfile means nothing
    is ever unpickled, and a stray file is called what it is."""
    try:
        # O_NOFOLLOW: target must not have become a symlink since it was resolved; O_NONBLOCK:
        # a FIFO put in its place must not hang the sensor.
        descriptor = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise DataSourceError(
            f"Batch file {path} has disappeared; it was listed but can no longer be read. "
            "Put it back, or run the discovery again."
        ) from exc
    except OSError as exc:
        raise DataSourceError(
            f"Batch file {path} cannot be opened ({exc.strerror}); make it a regular file the "
            "user that runs Dagster can read, or remove it."
        ) from exc
    with open(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise DataSourceError(
                f"Batch file {path} is not a regular file; put an .npz file there, or remove it."
            )
        try:
            archive = zipfile.ZipFile(file)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise DataSourceError(
                f"Batch file {path} is not a readable .npz (zip) archive ({exc}); every .npz is "
                f"a zip of .npy arrays. {_WRITE_HINT} {_NPZ_HINT}"
            ) from exc
        with archive:
            try:
                yield archive
            except DataSourceError:
                raise
            except _NPZ_READ_ERRORS as exc:
                raise DataSourceError(
                    f"Batch file {path} is not a readable .npz: its zip archive is damaged "
                    f"({exc}). {_NPZ_HINT}"
                ) from exc


def _npz_layout(
    path: Path, archive: zipfile.ZipFile
) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Dtype and shape of every array in the archive, read from the .npy headers alone; refuses
    members that are not .npy arrays and arrays of Python objects (only a pickle could hold
    those, and unpickling runs code)."""
    layout: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            raise DataSourceError(
                f"Batch file {path} holds {info.filename!r}, which is not a .npy array; an .npz "
                f"must hold arrays only. {_NPZ_HINT}"
            )
        name = info.filename.removesuffix(".npy")
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            # Versions 2.0 and 3.0 share the header layout; 3.0 only allows UTF-8 field names.
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        if dtype.hasobject:
            raise DataSourceError(
                f"Batch file {path}: array {name!r} holds Python objects (dtype {dtype}), which "
                "only unpickling could read, and unpickling runs code, so the file is refused. "
                f"Store plain numeric arrays. {_NPZ_HINT}"
            )
        layout[name] = (dtype, tuple(shape))
    return layout


def _check_layout(path: Path, layout: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> None:
    if "images" not in layout:
        raise DataSourceError(
            f"Batch file {path} has arrays {sorted(layout)} but no 'images'; save the pixels "
            "as images=uint8 array (N, 32, 32, 3)."
        )
    dtype, shape = layout["images"]
    if dtype != np.uint8 or len(shape) != 4 or shape[1:] != IMAGE_SHAPE:
        raise DataSourceError(
            f"Batch file {path}: 'images' is {dtype} {shape}, expected uint8 "
            "(N, 32, 32, 3); convert to 8-bit 32x32 RGB (0..255) before saving."
        )
    if shape[0] == 0:
        raise DataSourceError(f"Batch file {path} holds no images; remove it or fill it.")
    if "labels" in layout:
        dtype, labels_shape = layout["labels"]
        if not np.issubdtype(dtype, np.integer) or labels_shape != (shape[0],):
            raise DataSourceError(
                f"Batch file {path}: 'labels' is {dtype} {labels_shape}, expected "
                f"integers of shape ({shape[0]},), one per image."
            )


def _check_npz(path: Path, target: Path) -> None:
    with _npz_archive(path, target) as archive:
        _check_layout(path, _npz_layout(path, archive))


def _load_npz_batch(batch: IncomingBatch, target: Path) -> ImageSet:
    path = batch.path
    with _npz_archive(path, target) as archive:
        layout = _npz_layout(path, archive)
        _check_layout(path, layout)
        arrays = {}
        for name in ("images", "labels"):
            if name in layout:
                with archive.open(f"{name}.npy") as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
    images = arrays["images"]
    if "labels" in arrays:
        labels = arrays["labels"]
        bad = labels[(labels < UNLABELLED) | (labels >= len(CLASSES))]
        if bad.size:
            raise DataSourceError(
                f"Batch file {path}: labels {np.unique(bad)[:10].tolist()} are outside 0..9; "
                "use the CIFAR-10 class index, or -1 for an image without a label."
            )
    else:
        labels = np.full(len(images), UNLABELLED, dtype=np.int64)
    return ImageSet.from_arrays(images, labels, source=f"incoming:{batch.batch_id}")


def _check_folder(path: Path, folder: Path) -> bool:
    """Refuse the batch folder ``path`` (``folder`` once resolved) when a symlink anywhere below
    it leads outside it, when it holds no image, or when it mixes class folders with other
    folders; returns whether it is labelled (its subfolders are class names)."""
    from cifar_assets.data.image_folder import IMAGE_SUFFIXES

    def fail(error: OSError) -> None:
        raise error

    n_images = 0
    try:
        for parent, folders, files in os.walk(folder, onerror=fail):
            for name in folders + files:
                if os.path.islink(os.path.join(parent, name)):
                    _inside(Path(parent, name), folder)
            hidden = any(part.startswith(".") for part in Path(parent).relative_to(folder).parts)
            n_images += sum(
                not hidden
                and not name.startswith(".")
                and Path(name).suffix.lower() in IMAGE_SUFFIXES
                for name in files
            )
        subfolders = [
            entry.name
            for entry in folder.iterdir()
            if entry.is_dir() and not entry.name.startswith(".")
        ]
    except OSError as exc:
        raise DataSourceError(
            f"Batch folder {path} cannot be read ({exc}); give the user that runs Dagster read "
            "access to it, or remove it."
        ) from exc
    if n_images == 0:
        raise DataSourceError(
            f"Batch folder {path} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))}); put the "
            "images in it, or remove it."
        )
    labelled = bool(subfolders) and all(name in CLASSES for name in subfolders)
    if subfolders and not labelled and any(name in CLASSES for name in subfolders):
        unknown = sorted(name for name in subfolders if name not in CLASSES)
        raise DataSourceError(
            f"Batch folder {path} mixes class folders with other folders {unknown}; "
            f"name every subfolder after a class ({', '.join(CLASSES)}) for a labelled batch, "
            "or use no class names for an unlabelled one."
        )
    return labelled


def _load_folder_batch(batch: IncomingBatch, folder: Path) -> ImageSet:
    from cifar_assets.data.image_folder import load_image_folder

    labelled = _check_folder(batch.path, folder)
    imageset, _ = load_image_folder(folder, labelled=labelled)
    return replace(imageset, source=f"incoming:{batch.batch_id}")


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
    discovery = discover_batches(incoming_dir)
    for candidate in discovery.batches:
        if candidate.batch_id == key:
            return load_batch(candidate)
    # Entries that collide over one id each name all of them: the first says it all.
    for entry in discovery.rejected:
        if entry.batch_id == key:
            raise DataSourceError(f"Batch {key!r} cannot be read: {entry.reason}")
    raise DataSourceError(
        f"Batch {key!r} is no longer in {incoming_dir}; put the file back or delete the "
        "partition in the Dagster UI."
    )
