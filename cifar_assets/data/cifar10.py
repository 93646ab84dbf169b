"""The real CIFAR-10 data set: download through torchvision, verify every byte, then parse safely.

The archive comes as pickled Python objects, and unpickling runs code, so nothing is unpickled
before its md5 matches torchvision's published checksums: the archive's own md5 before it is
extracted, and each batch file's md5 before it is read. Even then the batches are read with an
unpickler that only rebuilds dicts, lists, strings and numpy arrays.

Offline machines get an error saying where to put ``cifar-10-python.tar.gz`` and which other
sources exist (``synthetic`` and ``image_folder``).
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import socket
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from cifar_assets.data.errors import DataSourceError
from cifar_assets.data.imageset import CLASSES, ImageSet

ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCH_FOLDER = "cifar-10-batches-py"
_DOWNLOAD_TIMEOUT_S = 60.0
_ALTERNATIVES = (
    'Other sources exist: "synthetic" (generated look-alike images, no download) and '
    '"image_folder" (your own PNG/JPEG files, one subfolder per class).'
)


def load_cifar10(data_dir: Path, download: bool = True) -> tuple[ImageSet, ImageSet]:
    """Return (official train 50,000 images, official test 10,000 images), source "cifar10".

    Uses ``data_dir/cifar-10-batches-py`` when its files are intact, else extracts
    ``data_dir/cifar-10-python.tar.gz`` after checking its md5, downloading it first when it is
    missing and ``download`` is true.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    folder = data_dir / BATCH_FOLDER
    if folder.is_dir() and not _batch_mismatches(folder):
        return _parse_batches(folder)
    archive = data_dir / ARCHIVE_NAME
    if not archive.is_file():
        if not download:
            raise DataSourceError(_missing_message(data_dir, "download=False was passed"))
        _download(data_dir)
    actual = _md5(archive)
    if actual != ARCHIVE_MD5:
        raise DataSourceError(
            f"{archive} is corrupted: its md5 is {actual}, expected {ARCHIVE_MD5}. It was not "
            f"extracted. Delete it and run again to download it, or replace it with an intact "
            f"copy of {ARCHIVE_NAME}. {_ALTERNATIVES}"
        )
    _extract(archive, data_dir)
    mismatches = _batch_mismatches(folder)
    if mismatches:
        raise DataSourceError(
            f"{folder}: these files do not match torchvision's checksums even after extracting "
            f"the verified archive {archive}: {', '.join(mismatches)}. Nothing was unpickled. "
            f"Delete {folder} and run again."
        )
    return _parse_batches(folder)


def _missing_message(data_dir: Path, reason: str) -> str:
    return (
        f"CIFAR-10 is not in {data_dir} and was not downloaded ({reason}). On a machine with "
        f"internet, download {_cifar10_class().url} and put it at {data_dir / ARCHIVE_NAME} "
        f"(md5 {ARCHIVE_MD5}), then run again. {_ALTERNATIVES}"
    )


def _cifar10_class() -> Any:
    from torchvision.datasets import CIFAR10

    return CIFAR10


def _download(data_dir: Path) -> None:
    from torchvision.datasets.utils import download_url

    cifar10 = _cifar10_class()
    archive = data_dir / ARCHIVE_NAME
    # torchvision's urlopen has no timeout; a black-holed network would hang a run forever.
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        download_url(cifar10.url, str(data_dir), filename=ARCHIVE_NAME, md5=ARCHIVE_MD5)
    except Exception as exc:
        # A partial or corrupted download must not be mistaken for the archive next time.
        archive.unlink(missing_ok=True)
        raise DataSourceError(
            _missing_message(data_dir, f"downloading from {cifar10.url} failed: {exc}")
        ) from exc
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_batch_md5() -> dict[str, str]:
    cifar10 = _cifar10_class()
    expected = {name: md5 for name, md5 in cifar10.train_list + cifar10.test_list}
    expected[cifar10.meta["filename"]] = cifar10.meta["md5"]
    return expected


def _batch_mismatches(folder: Path) -> list[str]:
    """Names of batch files that are missing or whose md5 differs from torchvision's list."""
    mismatches = []
    for name, md5 in _expected_batch_md5().items():
        path = folder / name
        if not path.is_file():
            mismatches.append(f"{name} (missing)")
        elif _md5(path) != md5:
            mismatches.append(f"{name} (md5 differs)")
    return mismatches


def _extract(archive: Path, data_dir: Path) -> None:
    folder = data_dir / BATCH_FOLDER
    if folder.exists():
        shutil.rmtree(folder)
    with tarfile.open(archive, "r:gz") as tar:
        # The "data" filter refuses absolute paths, links out of the folder and device files.
        tar.extractall(data_dir, filter="data")


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds only what CIFAR-10 batches hold: builtins plus numpy arrays and dtypes.

    ``_codecs.encode`` is how protocol-2 pickles written by Python 3 store bytes; it only turns a
    string into bytes.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")
        return super().find_class(module, name)


def _read_batch(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            entry = _ArrayUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataSourceError(
            f"{path} is not a CIFAR-10 batch ({exc}). Delete {path.parent} and run again."
        ) from exc
    if not isinstance(entry, dict):
        raise DataSourceError(f"{path} holds a {type(entry).__name__}, not a CIFAR-10 batch dict.")
    return entry


def _parse_batches(folder: Path) -> tuple[ImageSet, ImageSet]:
    """Read CIFAR-10 batch files (already verified) into (train, test) image sets."""
    cifar10 = _cifar10_class()
    meta = _read_batch(folder / cifar10.meta["filename"])
    names = tuple(meta.get(cifar10.meta["key"], ()))
    if names != CLASSES:
        raise DataSourceError(
            f"{folder / cifar10.meta['filename']}: class names {names} differ from {CLASSES}."
        )
    parts = []
    for files in (cifar10.train_list, cifar10.test_list):
        images, labels = [], []
        for name, _ in files:
            path = folder / name
            entry = _read_batch(path)
            if "data" not in entry or "labels" not in entry:
                raise DataSourceError(
                    f"{path} lacks the 'data' or 'labels' entry of a CIFAR-10 batch (keys: "
                    f"{sorted(entry)}). Delete {folder} and run again."
                )
            data = np.asarray(entry["data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(entry["labels"], dtype=np.int64))
        parts.append(
            ImageSet.from_arrays(np.concatenate(images), np.concatenate(labels), source="cifar10")
        )
    return parts[0], parts[1]
