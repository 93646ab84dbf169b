"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Each writer writes a temporary file beside the target (same folder, so the rename stays on one
file system), then renames it over the target with ``os.replace``. The temporary name starts with
a dot and holds ``.tmp`` before the target's suffix (``.batch.<random>.tmp.npz``), so folder
scanners (the drift inbox, the capture reader) skip it while writers that insist on a suffix
(``np.savez``) accept it; the random part means two processes writing the same target never share
a temporary file. A failed write removes its temporary files and leaves the target as it was.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def temporary_path(target: Path) -> Path:
    """A fresh hidden name beside ``target`` for its next version, with the same suffix."""
    return target.with_name(f".{target.stem}.{uuid.uuid4().hex}.tmp{target.suffix}")


def replace_atomic(target: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary)`` to produce the new file, then rename it over ``target``.

    ``write`` gets a path with no file yet and must create it (``np.savez``, ``pq.write_table``,
    ``Path.write_bytes``...). The parent folder is created if needed. Returns ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(target)
    try:
        write(temporary)
        if not temporary.is_file():
            raise FileNotFoundError(
                f"replace_atomic({target}): the writer created no file at {temporary}; it must "
                "write to the exact path it is given (no added suffix)."
            )
        os.replace(temporary, target)
    finally:
        # the exact name, and whatever a writer made of it by appending a suffix
        for leftover in target.parent.glob(f"{temporary.name}*"):
            leftover.unlink(missing_ok=True)
    return target


def write_text_atomic(target: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    return replace_atomic(target, lambda path: path.write_text(text, encoding="utf-8"))


def write_json_atomic(target: Path, value: Any) -> Path:
    """Write ``value`` as indented JSON with sorted keys and a final newline, atomically."""
    return write_text_atomic(target, json.dumps(value, indent=2, sort_keys=True) + "\n")
