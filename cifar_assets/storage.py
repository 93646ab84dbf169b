"""Versioned, content-addressed storage of asset values.

Every value an asset returns is stored once, under its content hash, which is also its Dagster
data version; a new materialization never overwrites an older one. Beside the objects, each
materialization leaves a small reference record (which asset and partition, which Dagster run,
which code version, when), so any version of any asset can be read back::

    <root>/objects/<v[:2]>/<version>.<kind>              the value (npz, Parquet or JSON)
    <root>/refs/<asset>/[<partition>/]<time>-<v[:12]>.json one record per materialization

The root is one setting (``CIFAR_ASSET_STORE``; by default ``<CIFAR_STORAGE_DIR>/assets``) and can
be a local folder or any fsspec URL (``s3://bucket/prefix``, ``memory://store``...). Values are
open formats only; nothing is pickled. The library never imports Dagster: the IO manager in
:mod:`cifar_assets.resources` is a thin caller of :class:`AssetStore`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import uuid
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from cifar_assets import artifacts
from cifar_assets.data import imageset
from cifar_assets.data.imageset import CLASSES, ImageSet, RawData, Splits

if TYPE_CHECKING:
    import pandas as pd

VERSION_LENGTH = 32  # hex digits of sha256 kept: 128 bits
# MLflow runs tag the data version of every input they consumed: <prefix><asset> = <version>
DATA_VERSION_TAG = "cifar/data_version/"
KINDS = ("raw.npz", "splits.npz", "imageset.npz", "parquet", "json")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}$")


class StorageError(RuntimeError):
    """A stored value is missing, unreadable, or a request names something that does not exist."""


# ---------------------------------------------------------------------------------------------
# Content versions


def _arrays(value: Any) -> tuple[str, dict[str, np.ndarray]] | None:
    if isinstance(value, Splits):
        return "splits.npz", imageset.splits_arrays(value)
    if isinstance(value, RawData):
        return "raw.npz", imageset.raw_arrays(value)
    if isinstance(value, ImageSet):
        return "imageset.npz", imageset.imageset_arrays(value)
    return None


def _is_record(value: Any) -> bool:
    return (
        dataclasses.is_dataclass(value)
        and not isinstance(value, type)
        and type(value).__name__ in artifacts.ARTIFACT_TYPES
    )


def _is_frame(value: Any) -> bool:
    return type(value).__name__ == "DataFrame"


@dataclass(frozen=True)
class Encoded:
    kind: str
    data: bytes
    version: str


# id -> (weak reference, version): an asset that computes its value's version for Dagster and
# the IO manager that stores it hash a 150 MB split once, not twice.
_known: dict[int, tuple[weakref.ref[Any], str]] = {}


def _remember(value: Any, version: str) -> None:
    try:
        ref = weakref.ref(value)
    except TypeError:
        return
    _known[id(value)] = (ref, version)
    for key in [k for k, (r, _) in _known.items() if r() is None]:
        del _known[key]


def _recalled(value: Any) -> str | None:
    entry = _known.get(id(value))
    return entry[1] if entry is not None and entry[0]() is value else None


def _record_json(value: Any) -> bytes:
    payload = {"type": type(value).__name__, "value": dataclasses.asdict(value)}
    return json.dumps(payload, indent=2, sort_keys=True, default=str).encode()


def _frame_parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _unstorable(value: Any) -> TypeError:
    return TypeError(
        f"A {type(value).__name__} cannot be stored: return an ImageSet, Splits, RawData, a "
        "pandas DataFrame or a record from cifar_assets.artifacts."
    )


def content_version(value: Any) -> str:
    """The value's content hash (32 hex digits): its data version in Dagster and MLflow.

    Image data is hashed over its arrays (images, labels, ids, source, origins), so equal
    content gives the equal version whichever file it came from; tables and records over their
    canonical bytes (Parquet, sorted JSON)."""
    known = _recalled(value)
    if known is not None:
        return known
    arrays = _arrays(value)
    if arrays is not None:
        version = imageset.digest_arrays(arrays[1])
    elif _is_frame(value):
        version = hashlib.sha256(_frame_parquet(value)).hexdigest()[:VERSION_LENGTH]
    elif _is_record(value):
        version = hashlib.sha256(_record_json(value)).hexdigest()[:VERSION_LENGTH]
    else:
        raise _unstorable(value)
    _remember(value, version)
    return version


def encode(value: Any) -> Encoded:
    """The bytes to store for ``value``, its kind (file suffix) and its content version."""
    version = content_version(value)
    arrays = _arrays(value)
    if arrays is not None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays[1])
        return Encoded(arrays[0], buffer.getvalue(), version)
    if _is_frame(value):
        return Encoded("parquet", _frame_parquet(value), version)
    return Encoded("json", _record_json(value), version)


def decode(kind: str, data: bytes, where: str) -> Any:
    """A stored value back from its bytes (``where`` names the file in errors)."""
    try:
        if kind.endswith(".npz"):
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
            if kind == "splits.npz":
                return imageset.splits_from_arrays(arrays)
            if kind == "raw.npz":
                return imageset.raw_from_arrays(arrays)
            return imageset.imageset_from_arrays(arrays)
        if kind == "parquet":
            import pandas as pd

            return pd.read_parquet(io.BytesIO(data))
        payload = json.loads(data)
        return artifacts.ARTIFACT_TYPES[payload["type"]](**payload["value"])
    except (ValueError, KeyError, OSError, TypeError) as error:
        raise StorageError(
            f"{where} cannot be read as a stored {kind} value ({error}); it is damaged or was "
            "not written by this project. Materialize the asset again."
        ) from error


def load_location(location: str) -> Any:
    """A value from a stored file named by path or URL (e.g. ``stored_value_path``'s answer, or
    an ``.imageset.npz`` written by hand); its kind comes from its suffix."""
    kind = next((k for k in KINDS if location.endswith(f".{k}")), None)
    if kind is None:
        raise StorageError(
            f"{location}: unknown kind of stored file; expected a name ending in "
            + ", ".join(f".{k}" for k in KINDS)
            + "."
        )
    fs, path = fsspec.core.url_to_fs(location)
    if not fs.isfile(path):
        raise StorageError(f"{location} does not exist or is not a file.")
    with fs.open(path, "rb") as handle:
        return decode(kind, handle.read(), location)


# ---------------------------------------------------------------------------------------------
# The store


@dataclass(frozen=True)
class StoredVersion:
    """One materialization of one asset (partition): what it stored, where, and who wrote it."""

    asset: str
    partition: str | None
    version: str
    kind: str
    object: str  # path of the object, relative to the root
    bytes: int
    stored_at: str
    run_id: str = ""
    code_version: str = ""
    ref: str = ""  # path of this record, relative to the root

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_name(value: str, what: str) -> str:
    if not _SAFE_NAME.match(value) or ".." in value:
        raise StorageError(
            f"{what} {value!r} cannot name a stored value: use letters, digits and . _ = + - "
            "only, starting with a letter or digit."
        )
    return value


def _check_version(version: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{4,64}", version):
        raise StorageError(
            f"{version!r} is not a data version: versions are hex content hashes, as shown in "
            "the Dagster UI (data version) or by `cifar-storage versions <asset>`."
        )
    return version


class AssetStore:
    """Content-addressed asset values under one root (local folder or fsspec URL)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root_url = str(root)
        self.fs, self.root = fsspec.core.url_to_fs(self.root_url)
        self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"AssetStore({self.root_url!r})"

    def _path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def location(self, relative: str) -> str:
        """A path or URL a person (or ``np.load``) can open: local path, else the full URL."""
        path = self._path(relative)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def _write_atomic(self, relative: str, data: bytes) -> None:
        path = self._path(relative)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "wb") as handle:
            handle.write(data)
        self.fs.mv(tmp, path)

    @staticmethod
    def _ref_dir(asset: str, partition: str | None) -> str:
        _check_name(asset, "Asset")
        if partition is None:
            return f"refs/{asset}"
        return f"refs/{asset}/{_check_name(partition, 'Partition')}"

    # -- writing --------------------------------------------------------------------------------

    def put(
        self,
        asset: str,
        value: Any,
        partition: str | None = None,
        *,
        run_id: str = "",
        code_version: str = "",
    ) -> tuple[StoredVersion, bool]:
        """Store ``value`` as a new materialization of ``asset``; the object is written only if
        no equal content is stored yet. Returns the record and whether the object was new."""
        encoded = encode(value)
        obj = f"objects/{encoded.version[:2]}/{encoded.version}.{encoded.kind}"
        is_new = not self.fs.exists(self._path(obj))
        if is_new:
            self._write_atomic(obj, encoded.data)
        now = datetime.now(UTC)
        ref = (
            f"{self._ref_dir(asset, partition)}/"
            f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{encoded.version[:12]}.json"
        )
        record = StoredVersion(
            asset=asset,
            partition=partition,
            version=encoded.version,
            kind=encoded.kind,
            object=obj,
            bytes=len(encoded.data),
            stored_at=now.isoformat(timespec="microseconds"),
            run_id=run_id,
            code_version=code_version,
            ref=ref,
        )
        self._write_atomic(ref, json.dumps(record.to_dict(), indent=2).encode())
        return record, is_new

    # -- reading --------------------------------------------------------------------------------

    def assets(self) -> list[str]:
        path = self._path("refs")
        if not self.fs.exists(path):
            return []
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))

    def partitions(self, asset: str) -> list[str | None]:
        """``[None]`` for an unpartitioned asset, else its stored partition keys."""
        base = self._path(self._ref_dir(asset, None))
        if not self.fs.exists(base):
            return []
        keys: list[str] = []
        unpartitioned = False
        for entry in self.fs.ls(base, detail=True):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry["type"] == "directory":
                keys.append(name)
            elif name.endswith(".json"):
                unpartitioned = True
        return ([None] if unpartitioned else []) + sorted(keys)

    def _read_record(self, path: str) -> StoredVersion:
        try:
            with self.fs.open(path, "rb") as handle:
                return StoredVersion(**json.loads(handle.read()))
        except (ValueError, TypeError) as error:
            raise StorageError(
                f"{self.location(path[len(self.root) + 1 :])} is not a valid version record "
                f"({error}); delete it or restore it from a backup."
            ) from error

    def history(self, asset: str, partition: str | None = None) -> list[StoredVersion]:
        """Every materialization of ``asset`` (partition), oldest first."""
        base = self._path(self._ref_dir(asset, partition))
        if not self.fs.exists(base):
            return []
        paths = sorted(
            p
            for p in self.fs.ls(base, detail=False)
            if p.endswith(".json") and ".tmp-" not in p.rsplit("/", 1)[-1]
        )
        return [self._read_record(p) for p in paths]

    def latest(self, asset: str, partition: str | None = None) -> StoredVersion | None:
        records = self.history(asset, partition)
        return records[-1] if records else None

    def find(self, asset: str, version: str, partition: str | None = None) -> StoredVersion:
        """The newest record of ``asset`` whose version is ``version`` (or starts with it)."""
        _check_version(version)
        partitions = [partition] if partition is not None else self.partitions(asset)
        matches = [
            record
            for key in partitions
            for record in self.history(asset, key)
            if record.version.startswith(version)
        ]
        if not matches:
            known = ", ".join(sorted({r.version[:12] for r in self.history(asset, partition)}))
            raise StorageError(
                f"No stored version {version} of asset {asset!r} under {self.root_url}. "
                f"Versions stored: {known or 'none'}; list them with "
                f"`cifar-storage versions {asset}`."
            )
        if len({m.version for m in matches}) > 1:
            raise StorageError(
                f"Version prefix {version} of asset {asset!r} matches several versions; "
                "give more digits."
            )
        return max(matches, key=lambda r: r.stored_at)

    def read(self, record: StoredVersion) -> Any:
        path = self._path(record.object)
        if not self.fs.exists(path):
            raise StorageError(
                f"{self.location(record.object)} (version {record.version} of {record.asset}) "
                "is missing: it was deleted outside `cifar-storage gc`. Materialize the asset "
                "again."
            )
        with self.fs.open(path, "rb") as handle:
            data = handle.read()
        value = decode(record.kind, data, self.location(record.object))
        _remember(value, record.version)
        return value

    def require_latest(self, asset: str, partition: str | None = None) -> StoredVersion:
        """The latest record of ``asset`` (partition), or a StorageError that says to
        materialize it."""
        record = self.latest(asset, partition)
        if record is None:
            where = f" partition {partition!r}" if partition else ""
            raise StorageError(
                f"No stored value for asset {asset!r}{where} under {self.root_url}. Materialize "
                "it first (from the Dagster UI or with `dagster job execute`)."
            )
        return record

    def load(self, asset: str, version: str | None = None, partition: str | None = None) -> Any:
        """The value of ``asset``: the given ``version``, else the latest materialization."""
        if version is not None:
            return self.read(self.find(asset, version, partition))
        return self.read(self.require_latest(asset, partition))

    # -- retention ------------------------------------------------------------------------------

    def all_records(self) -> list[StoredVersion]:
        return [
            record
            for asset in self.assets()
            for partition in self.partitions(asset)
            for record in self.history(asset, partition)
        ]

    def plan_retention(
        self,
        keep_last: int,
        protected: Iterable[str] = (),
        protected_runs: Iterable[str] = (),
    ) -> RetentionPlan:
        """What ``gc`` keeps and deletes: the last ``keep_last`` records of every asset partition
        (so always the live one), every record whose version is ``protected`` or that a
        ``protected_runs`` Dagster run wrote (what registered models refer to), and every object
        a kept record points to."""
        if keep_last < 1:
            raise StorageError(
                f"keep_last must be at least 1 (the live version of each asset), got {keep_last}."
            )
        protected = set(protected)
        runs = set(protected_runs)
        kept: list[StoredVersion] = []
        dropped: list[StoredVersion] = []
        for asset in self.assets():
            for partition in self.partitions(asset):
                records = self.history(asset, partition)
                for index, record in enumerate(records):
                    keep = (
                        index >= len(records) - keep_last
                        or record.version in protected
                        or record.run_id in runs
                    )
                    (kept if keep else dropped).append(record)
        kept_objects = {r.object for r in kept}
        objects = {}
        objects_dir = self._path("objects")
        if self.fs.exists(objects_dir):
            for path, info in self.fs.find(objects_dir, detail=True).items():
                relative = path[len(self.root) + 1 :]
                objects[relative] = int(info.get("size") or 0)
        delete_objects = sorted(o for o in objects if o not in kept_objects)
        return RetentionPlan(
            kept=kept,
            dropped=dropped,
            delete_objects=delete_objects,
            freed_bytes=sum(objects[o] for o in delete_objects),
            kept_bytes=sum(size for o, size in objects.items() if o in kept_objects),
            protected=sorted(protected),
            protected_runs=sorted(runs),
        )

    def apply_retention(self, plan: RetentionPlan) -> None:
        """Delete what ``plan`` drops: records first, so no record ever points at nothing."""
        for record in plan.dropped:
            self.fs.rm(self._path(record.ref))
        for obj in plan.delete_objects:
            self.fs.rm(self._path(obj))


@dataclass(frozen=True)
class RetentionPlan:
    kept: list[StoredVersion]
    dropped: list[StoredVersion]
    delete_objects: list[str]
    freed_bytes: int
    kept_bytes: int
    protected: list[str]
    protected_runs: list[str]

    def summary(self) -> str:
        return (
            f"keep {len(self.kept)} materializations ({self.kept_bytes / 1e6:.1f} MB of objects), "
            f"drop {len(self.dropped)}, delete {len(self.delete_objects)} objects "
            f"({self.freed_bytes / 1e6:.1f} MB)"
        )


# ---------------------------------------------------------------------------------------------
# Comparing versions


@dataclass(frozen=True)
class PartDiff:
    """How one image set (a split, the pool, a batch) differs between two versions."""

    name: str
    images_before: int
    images_after: int
    class_counts_before: dict[str, int]
    class_counts_after: dict[str, int]
    added_ids: list[str]
    removed_ids: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parts(value: Any) -> dict[str, ImageSet]:
    if isinstance(value, Splits):
        return dict(value.items())
    if isinstance(value, RawData):
        parts = {"pool": value.pool}
        if value.official_test is not None:
            parts["official_test"] = value.official_test
        return parts
    if isinstance(value, ImageSet):
        return {"images": value}
    raise StorageError(
        f"Only image data (Splits, RawData, ImageSet) can be diffed, not {type(value).__name__}."
    )


def diff(before: Any, after: Any) -> list[PartDiff]:
    """Per part: image and class counts before and after, and the image ids added or removed."""
    parts_before, parts_after = _parts(before), _parts(after)
    result = []
    for name in list(parts_before) + [n for n in parts_after if n not in parts_before]:
        a = parts_before.get(name)
        b = parts_after.get(name)
        ids_a = set(a.ids.tolist()) if a is not None else set()
        ids_b = set(b.ids.tolist()) if b is not None else set()
        empty = dict.fromkeys(CLASSES, 0)
        result.append(
            PartDiff(
                name=name,
                images_before=len(a) if a is not None else 0,
                images_after=len(b) if b is not None else 0,
                class_counts_before=a.class_counts() if a is not None else empty,
                class_counts_after=b.class_counts() if b is not None else empty,
                added_ids=sorted(ids_b - ids_a),
                removed_ids=sorted(ids_a - ids_b),
            )
        )
    return result
