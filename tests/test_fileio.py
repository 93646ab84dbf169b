"""cifar_assets.fileio: a write replaces the whole file or leaves the old one, and no temporary
file stays behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cifar_assets.fileio import replace_atomic, write_json_atomic, write_text_atomic


def test_writes_replace_the_file_and_leave_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "new" / "state.json"
    write_json_atomic(target, {"b": 1, "a": [1, 2]})
    assert target.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    write_text_atomic(target, "second")
    assert target.read_text() == "second"
    assert [path.name for path in target.parent.iterdir()] == ["state.json"]


def test_a_failing_writer_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "weights.json"
    target.write_text(json.dumps({"weights": {"1": 1.0}}))

    def half_written(path: Path) -> None:
        path.write_text('{"weights": {"2"')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomic(target, half_written)
    assert json.loads(target.read_text()) == {"weights": {"1": 1.0}}
    assert [path.name for path in tmp_path.iterdir()] == ["weights.json"]


def test_a_writer_that_writes_elsewhere_is_an_error(tmp_path: Path) -> None:
    target = tmp_path / "arrays"
    # np.savez appends ".npz" to a name without it, so nothing lands at the given path.
    with pytest.raises(FileNotFoundError, match="exact path"):
        replace_atomic(target, lambda path: np.savez(path, x=np.zeros(2)))
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    replace_atomic(tmp_path / "arrays.npz", lambda path: np.savez(path, x=np.ones(2)))
    with np.load(tmp_path / "arrays.npz") as data:
        np.testing.assert_array_equal(data["x"], np.ones(2))
