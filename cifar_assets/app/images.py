"""Uploaded files and random test images, as the 32x32 RGB pixels the model takes.

An upload is converted by the project's image-folder reader (``load_image_folder`` on a one-file
folder), so the app sees exactly what a dropped production batch would; what the reader did
(converted the colour mode, resized) becomes a note for the person who uploaded it. Before that,
the file's header is checked: empty, too large in bytes or pixels, or not a PNG/JPEG, and the
file is refused with a message that says what to do.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cifar_assets.data.errors import DataSourceError
from cifar_assets.data.image_folder import IMAGE_SUFFIXES, load_image_folder
from cifar_assets.data.imageset import CLASSES, IMAGE_SHAPE

MAX_UPLOAD_MB = 25  # also the Streamlit upload limit (cifar-app passes it to the server)
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1024 * 1024
# A small compressed file can declare a huge canvas; refuse before decoding it (50 MP is a
# large camera photo, about 150 MB as RGB).
MAX_PIXELS = 50_000_000
_FORMATS = {"PNG", "JPEG"}


class ImageFileError(ValueError):
    """A file that cannot be used as an image; the message is meant for the person uploading."""


@dataclass(frozen=True)
class PreparedImage:
    name: str
    pixels: np.ndarray  # (32, 32, 3) uint8
    notes: list[str] = field(default_factory=list)  # what the conversion changed
    drawn_as: str | None = None  # the class a synthetic test image was drawn as


def prepare_upload(name: str, data: bytes) -> PreparedImage:
    """The upload ``name`` with bytes ``data`` as 32x32 RGB; ImageFileError says what is wrong."""
    suffix = Path(name).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ImageFileError(
            f"{name} is not a PNG or JPEG file (its name ends in {suffix or 'nothing'!r}). "
            "Choose a .png, .jpg or .jpeg image."
        )
    if not data:
        raise ImageFileError(f"{name} is empty (0 bytes). Choose the image again, or another one.")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ImageFileError(
            f"{name} is {len(data) / 1024 / 1024:.0f} MB; the limit is {MAX_UPLOAD_MB} MB. "
            "Save a smaller copy (the model looks at 32x32 pixels anyway) and upload that."
        )
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
            image_format, mode = header.format, header.mode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ImageFileError(
            f"{name} is not an image that can be read (the file's content is not PNG or JPEG, "
            "or it is damaged). Open it in an image viewer, save it as PNG, and upload that."
        ) from None
    if image_format not in _FORMATS:
        raise ImageFileError(
            f"{name} is a {image_format} image; only PNG and JPEG are accepted. Save it as PNG "
            "and upload that."
        )
    if width * height > MAX_PIXELS:
        raise ImageFileError(
            f"{name} is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels); the "
            f"limit is {MAX_PIXELS / 1e6:.0f}. Save a smaller copy and upload that."
        )
    with tempfile.TemporaryDirectory(prefix="cifar-app-") as folder:
        (Path(folder) / f"upload{suffix}").write_bytes(data)
        try:
            imageset, report = load_image_folder(Path(folder), on_error="fail", labelled=False)
        except DataSourceError:
            raise ImageFileError(
                f"{name} could not be decoded although its header looks like {image_format} "
                "(the file is probably cut short). Save it again and upload the new copy."
            ) from None
    notes = []
    if report.n_converted:
        notes.append(f"converted from {mode} to RGB")
    if report.n_resized:
        notes.append(f"resized from {width}x{height} to {IMAGE_SHAPE[1]}x{IMAGE_SHAPE[0]}")
    return PreparedImage(name=name, pixels=imageset.images[0], notes=notes)


def random_test_images(count: int, seed: int) -> list[PreparedImage]:
    """``count`` synthetic CIFAR-10 look-alikes, each with the class it was drawn as."""
    from cifar_assets.data.synthetic import generate_synthetic

    images = generate_synthetic(count, seed=seed)
    return [
        PreparedImage(
            name=f"test image {seed}-{index + 1}",
            pixels=pixels,
            drawn_as=CLASSES[int(label)],
        )
        for index, (pixels, label) in enumerate(zip(images.images, images.labels, strict=True))
    ]
