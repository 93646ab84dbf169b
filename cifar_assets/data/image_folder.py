"""Image sets from folders of PNG/JPEG files, and back: the format people can look at and edit.

A labelled folder has one subfolder per CIFAR-10 class (``root/cat/0001.png``). An unlabelled
folder (a production batch) holds images anywhere below the root; they get label -1. Every image
becomes 32x32 RGB; what was converted, resized, skipped or ignored is listed in a
:class:`FolderReport`, so nothing is dropped silently. Each image's origin is its absolute file path,
so validation messages name the file to fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from cifar_assets.data.errors import DataSourceError
from cifar_assets.data.imageset import CLASSES, IMAGE_SHAPE, UNLABELLED, ImageSet

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_SIZE = (IMAGE_SHAPE[1], IMAGE_SHAPE[0])
_EXAMPLES = 10


@dataclass
class FolderReport:
    """What a folder held; paths are relative to ``root``, in sorted order."""

    root: str
    labelled: bool
    on_error: str
    n_images: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    unknown_class_folders: list[str] = field(default_factory=list)
    empty_class_folders: list[str] = field(default_factory=list)
    missing_classes: list[str] = field(default_factory=list)
    stray_files: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    n_resized: int = 0
    resized_examples: list[str] = field(default_factory=list)
    n_converted: int = 0
    converted_examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, e.g. for asset metadata."""
        return asdict(self)

    @property
    def problems(self) -> list[str]:
        """Problems that stop a load with on_error="fail", each with its absolute path."""
        root = Path(self.root)
        return (
            [f"unreadable image: {root / path}" for path in self.unreadable]
            + [f"unknown class folder: {root / path}" for path in self.unknown_class_folders]
            + [f"empty class folder: {root / path}" for path in self.empty_class_folders]
        )


def load_image_folder(
    root: Path, on_error: Literal["fail", "skip"] = "fail", labelled: bool = True
) -> tuple[ImageSet, FolderReport]:
    """Read every image under ``root`` as 32x32 RGB; see the module docstring for the layout.

    ``on_error="fail"`` raises :class:`DataSourceError` naming every unreadable file, unknown
    class folder and empty class folder; ``"skip"`` leaves them out and lists them in the report.
    """
    if on_error not in ("fail", "skip"):
        raise DataSourceError(f'on_error={on_error!r} is not one of "fail" or "skip".')
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataSourceError(
            f"Image folder {root} does not exist or is not a folder. Create it with one "
            f"subfolder per class ({', '.join(CLASSES)}) holding PNG or JPEG files."
        )
    report = FolderReport(root=str(root), labelled=labelled, on_error=on_error)
    files, labels = _list_labelled(root, report) if labelled else _list_unlabelled(root, report)

    # Every file is read before failing, so one error lists every problem at once.
    images, kept, origins = [], [], []
    for path, label in zip(files, labels, strict=True):
        image = _read(path, root, report)
        if image is not None:
            images.append(image)
            kept.append(label)
            origins.append(str(path))
    if on_error == "fail" and report.problems:
        listing = "\n  ".join(report.problems)
        raise DataSourceError(
            f"Image folder {root} has {len(report.problems)} problem(s):\n  {listing}\n"
            f"Class folders must be named one of: {', '.join(CLASSES)}. Fix or remove these "
            f'paths, or load with on_error="skip" to leave them out.'
        )
    if not images:
        layout = "one subfolder per class" if labelled else "anywhere below it"
        loose = [name for name in report.stray_files if Path(name).suffix.lower() in IMAGE_SUFFIXES]
        hint = (
            f" {len(loose)} image(s) sit directly in the folder: move them into class subfolders, "
            "or load with labelled=False for an unlabelled batch."
            if loose
            else ""
        )
        raise DataSourceError(
            f"Image folder {root} holds no readable images ({', '.join(sorted(IMAGE_SUFFIXES))}, "
            f"{layout}). Put images there, or check the path.{hint}"
        )
    label_array = np.asarray(kept, dtype=np.int64)
    report.n_images = len(images)
    if labelled:
        counts = np.bincount(label_array, minlength=len(CLASSES))
        report.counts = {name: int(counts[i]) for i, name in enumerate(CLASSES)}
    imageset = ImageSet.from_arrays(
        np.stack(images), label_array, source=f"image_folder:{root}", origins=origins
    )
    return imageset, report


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _list_labelled(root: Path, report: FolderReport) -> tuple[list[Path], list[int]]:
    files: list[Path] = []
    labels: list[int] = []
    present = set()
    for entry in sorted(root.iterdir()):
        name = _relative(entry, root)
        if entry.name.startswith("."):
            report.ignored.append(name)
        elif entry.is_file():
            report.stray_files.append(name)
        elif entry.name not in CLASSES:
            report.unknown_class_folders.append(name)
        else:
            present.add(entry.name)
            found = []
            for child in sorted(entry.iterdir()):
                if _is_image(child) and not child.name.startswith("."):
                    found.append(child)
                else:
                    report.ignored.append(_relative(child, root))
            if not found:
                report.empty_class_folders.append(name)
            files.extend(found)
            labels.extend([CLASSES.index(entry.name)] * len(found))
    report.missing_classes = [name for name in CLASSES if name not in present]
    return files, labels


def _list_unlabelled(root: Path, report: FolderReport) -> tuple[list[Path], list[int]]:
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            continue
        hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
        if _is_image(path) and not hidden:
            files.append(path)
        else:
            report.ignored.append(_relative(path, root))
    return files, [UNLABELLED] * len(files)


def _read(path: Path, root: Path, report: FolderReport) -> np.ndarray | None:
    name = _relative(path, root)
    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened
            if image.mode != "RGB":
                image = image.convert("RGB")
                report.n_converted += 1
                if len(report.converted_examples) < _EXAMPLES:
                    report.converted_examples.append(f"{name} ({opened.mode})")
            if image.size != _SIZE:
                # Pillow's bilinear filter widens its support when shrinking, so it anti-aliases.
                image = image.resize(_SIZE, Image.Resampling.BILINEAR)
                report.n_resized += 1
                if len(report.resized_examples) < _EXAMPLES:
                    report.resized_examples.append(f"{name} ({opened.size[0]}x{opened.size[1]})")
            return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        report.unreadable.append(name)
        return None


def write_image_folder(imageset: ImageSet, root: Path) -> list[Path]:
    """Write each image as ``root/<class>/<id>.png`` (unlabelled ones as ``root/<id>.png``).

    PNG is lossless, so :func:`load_image_folder` reads back identical pixels and ids.
    """
    root = Path(root).expanduser()
    written = []
    for image, label, image_id in zip(imageset.images, imageset.labels, imageset.ids, strict=True):
        if label == UNLABELLED:
            folder = root
        elif 0 <= label < len(CLASSES):
            folder = root / CLASSES[label]
        else:
            raise DataSourceError(
                f"write_image_folder: image {image_id} of {imageset.source} has label {label}, "
                f"outside 0..{len(CLASSES) - 1} and not {UNLABELLED} (unlabelled)."
            )
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{image_id}.png"
        Image.fromarray(image).save(path)
        written.append(path)
    return written
