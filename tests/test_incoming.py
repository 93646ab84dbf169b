"""The incoming folder as untrusted input, on real files: no symlink is followed out of its
folder, nothing is unpickled, a bad entry is reported on its own (naming the file and what to do)
without hiding the good ones, and entries skipped on purpose are reported too."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_assets.data.errors import DataSourceError
from cifar_assets.data.imageset import CLASSES, UNLABELLED
from cifar_assets.drift.incoming import (
    Discovery,
    IncomingBatch,
    SkippedEntry,
    discover_batches,
    load_batch,
    load_partition,
)


def save_batch(path: Path, n: int = 4, seed: int = 0, labelled: bool = True) -> np.ndarray:
    images = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    arrays = {"images": images}
    if labelled:
        arrays["labels"] = np.arange(n) % len(CLASSES)
    with path.open("wb") as file:  # a path would get .npz appended unless it ends in .npz
        np.savez(file, **arrays)
    return images


def write_png(path: Path, seed: int = 0, size: int = 32, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def reasons(entries: tuple[SkippedEntry, ...]) -> dict[str, str]:
    return {entry.path.name: entry.reason for entry in entries}


@pytest.fixture
def incoming(tmp_path: Path) -> Path:
    folder = tmp_path / "incoming"
    folder.mkdir()
    return folder


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the incoming one, holding a valid batch file and a valid image folder."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    save_batch(folder / "secret.npz")
    write_png(folder / "images" / "a.png")
    return folder


def test_symlinks_out_of_the_folder_are_refused_and_the_rest_is_found(
    incoming: Path, outside: Path
) -> None:
    save_batch(incoming / "good.npz")
    (incoming / "to_file.npz").symlink_to(outside / "secret.npz")
    (incoming / "to_folder").symlink_to(outside / "images")
    (incoming / "relative.npz").symlink_to(Path("..") / "elsewhere" / "secret.npz")
    (incoming / "to_itself").symlink_to(incoming)
    (incoming / "dangling.npz").symlink_to(incoming / "gone.npz")
    (incoming / "loop_a.npz").symlink_to(incoming / "loop_b.npz")
    (incoming / "loop_b.npz").symlink_to(incoming / "loop_a.npz")

    found = discover_batches(incoming)

    assert [batch.batch_id for batch in found.batches] == ["good"]
    rejected = reasons(found.rejected)
    assert set(rejected) == {
        "to_file.npz",
        "to_folder",
        "relative.npz",
        "to_itself",
        "dangling.npz",
        "loop_a.npz",
        "loop_b.npz",
    }
    for name in ("to_file.npz", "to_folder", "relative.npz"):
        assert rejected[name].startswith(f"{incoming / name} is a symlink to {outside}")
        assert f"outside its folder {incoming}" in rejected[name]
        assert "Copy the data into the folder instead, or remove the link." in rejected[name]
    assert f"{incoming / 'to_itself'} is a symlink to {incoming}, outside" in rejected["to_itself"]
    assert rejected["dangling.npz"].startswith(
        f"{incoming / 'dangling.npz'} is a broken symlink (to {incoming / 'gone.npz'}); remove it"
    )
    assert rejected["loop_a.npz"].startswith(f"{incoming / 'loop_a.npz'} cannot be resolved")
    assert {entry.batch_id for entry in found.rejected if entry.path.name == "to_file.npz"} == {
        "to_file"
    }


def test_a_symlink_inside_an_image_folder_that_leaves_it_refuses_that_batch(
    incoming: Path, outside: Path
) -> None:
    for name, target in (
        ("file_link", outside / "images" / "a.png"),
        ("folder_link", outside / "images"),
        ("sibling_link", incoming / "good"),  # inside the incoming folder, outside its batch
    ):
        write_png(incoming / name / "cat" / "1.png")
        (incoming / name / "cat" / "linked").symlink_to(target)
    write_png(incoming / "good" / "1.png")

    found = discover_batches(incoming)

    assert [batch.batch_id for batch in found.batches] == ["good"]
    rejected = reasons(found.rejected)
    assert set(rejected) == {"file_link", "folder_link", "sibling_link"}
    assert rejected["file_link"].startswith(
        f"{incoming / 'file_link' / 'cat' / 'linked'} is a symlink to {outside / 'images' / 'a.png'}"
        f", outside its folder {incoming / 'file_link'}"
    )
    assert f"outside its folder {incoming / 'sibling_link'};" in rejected["sibling_link"]
    # Loading re-checks: a batch listed earlier is refused once a link appears in it.
    with pytest.raises(DataSourceError, match=r"cat/linked is a symlink to .*, outside its folder"):
        load_batch(IncomingBatch("folder_link", incoming / "folder_link", "image_folder"))


def test_symlinks_that_stay_inside_their_folder_are_followed(incoming: Path) -> None:
    images = save_batch(incoming / "2026-01-05.npz")
    (incoming / "latest.npz").symlink_to("2026-01-05.npz")
    write_png(incoming / "day" / "cat" / "1.png", seed=1)
    (incoming / "day" / "cat" / "again.png").symlink_to(incoming / "day" / "cat" / "1.png")
    (incoming / "day_alias").symlink_to("day")

    found = discover_batches(incoming)

    assert [batch.batch_id for batch in found.batches] == [
        "2026-01-05",
        "day",
        "day_alias",
        "latest",
    ]
    assert found.rejected == ()
    by_id = {batch.batch_id: batch for batch in found.batches}
    np.testing.assert_array_equal(load_batch(by_id["latest"]).images, images)
    day = load_batch(by_id["day_alias"])
    assert len(day) == 2 and (day.labels == CLASSES.index("cat")).all()
    assert day.source == "incoming:day_alias"


def test_a_batch_that_becomes_a_symlink_out_is_refused_at_load(
    incoming: Path, outside: Path
) -> None:
    save_batch(incoming / "monday.npz")
    (batch,) = discover_batches(incoming).batches
    (incoming / "monday.npz").unlink()
    (incoming / "monday.npz").symlink_to(outside / "secret.npz")

    with pytest.raises(DataSourceError) as raised:
        load_batch(batch)
    assert str(raised.value).startswith(
        f"{incoming / 'monday.npz'} is a symlink to {outside / 'secret.npz'}, outside its folder"
    )
    with pytest.raises(DataSourceError) as raised:
        load_partition("monday", incoming, incoming / "capture")
    assert str(raised.value).startswith(
        f"Batch 'monday' cannot be read: {incoming / 'monday.npz'} is a symlink to"
    )


def test_two_names_for_one_batch_id_reject_both_and_keep_the_others(incoming: Path) -> None:
    save_batch(incoming / "dup.npz", seed=1)
    save_batch(incoming / "dup.NPZ", seed=2)
    good = save_batch(incoming / "good.npz", seed=3)

    found = discover_batches(incoming)

    assert [batch.batch_id for batch in found.batches] == ["good"]
    np.testing.assert_array_equal(load_batch(found.batches[0]).images, good)
    rejected = reasons(found.rejected)
    assert rejected == {
        "dup.NPZ": f"{incoming / 'dup.NPZ'} and {incoming / 'dup.npz'} would both be batch 'dup', "
        "so neither is registered; rename or remove one so every batch has its own name.",
        "dup.npz": f"{incoming / 'dup.npz'} and {incoming / 'dup.NPZ'} would both be batch 'dup', "
        "so neither is registered; rename or remove one so every batch has its own name.",
    }
    assert {entry.batch_id for entry in found.rejected} == {"dup"}
    with pytest.raises(DataSourceError, match=r"Batch 'dup' cannot be read: .*dup\.NPZ and"):
        load_partition("dup", incoming, incoming / "capture")


def test_three_names_for_one_id_are_all_named(incoming: Path) -> None:
    save_batch(incoming / "x.npz")
    save_batch(incoming / "x.Npz")
    write_png(incoming / "x" / "1.png")

    rejected = reasons(discover_batches(incoming).rejected)

    assert rejected["x"] == (
        f"{incoming / 'x'} and {incoming / 'x.Npz'}, {incoming / 'x.npz'} would all be batch 'x', "
        "so none is registered; rename or remove all but one so every batch has its own name."
    )


def test_random_bytes_are_not_a_zip_archive_and_never_pickled_data(incoming: Path) -> None:
    (incoming / "noise.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    (incoming / "empty.npz").write_bytes(b"")
    # A pickle is what numpy.load would try to read a non-zip file as.
    (incoming / "dumped.npz").write_bytes(pickle.dumps({"images": [1, 2, 3]}))
    save_batch(incoming / "good.npz")

    found = discover_batches(incoming)

    assert [batch.batch_id for batch in found.batches] == ["good"]
    rejected = reasons(found.rejected)
    assert set(rejected) == {"noise.npz", "empty.npz", "dumped.npz"}
    for name, reason in rejected.items():
        assert reason.startswith(
            f"Batch file {incoming / name} is not a readable .npz (zip) archive (File is not a "
            "zip file); every .npz is a zip of .npy arrays. If it is still being copied"
        )
        assert "Save it again with numpy.savez(" in reason
        assert "pickle" not in reason
    with pytest.raises(
        DataSourceError, match=r"noise\.npz is not a readable \.npz \(zip\) archive"
    ):
        load_batch(IncomingBatch("noise", incoming / "noise.npz", "npz"))


def test_object_arrays_are_refused_without_unpickling(incoming: Path, tmp_path: Path) -> None:
    # Unpickling either array would create this folder: it must never appear.
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.mkdir, (str(marker),))

    payload = np.empty(1, dtype=object)
    payload[0] = Payload()
    np.savez(incoming / "objects.npz", images=payload)
    images = np.zeros((2, 32, 32, 3), np.uint8)
    np.savez(incoming / "extra.npz", images=images, meta=payload)

    found = discover_batches(incoming)

    assert found.batches == ()
    rejected = reasons(found.rejected)
    assert rejected["objects.npz"].startswith(
        f"Batch file {incoming / 'objects.npz'}: array 'images' holds Python objects (dtype "
        "object), which only unpickling could read, and unpickling runs code, so the file is refused."
    )
    assert rejected["extra.npz"].startswith(
        f"Batch file {incoming / 'extra.npz'}: array 'meta' holds Python objects"
    )
    for name in ("objects", "extra"):
        with pytest.raises(DataSourceError, match="holds Python objects"):
            load_batch(IncomingBatch(name, incoming / f"{name}.npz", "npz"))
    assert not marker.exists()


def test_npz_contents_are_checked_from_the_headers_at_discovery(incoming: Path) -> None:
    np.savez(incoming / "floats.npz", images=np.zeros((2, 32, 32, 3), np.float32))
    np.savez(incoming / "nothing.npz", images=np.zeros((0, 32, 32, 3), np.uint8))
    np.savez(incoming / "short_labels.npz", images=np.zeros((3, 32, 32, 3), np.uint8), labels=[1])
    np.savez(incoming / "pixels.npz", pixels=np.zeros((2, 32, 32, 3), np.uint8))

    rejected = reasons(discover_batches(incoming).rejected)

    assert rejected == {
        "floats.npz": f"Batch file {incoming / 'floats.npz'}: 'images' is float32 (2, 32, 32, 3), "
        "expected uint8 (N, 32, 32, 3); convert to 8-bit 32x32 RGB (0..255) before saving.",
        "nothing.npz": f"Batch file {incoming / 'nothing.npz'} holds no images; remove it or fill it.",
        "short_labels.npz": f"Batch file {incoming / 'short_labels.npz'}: 'labels' is int64 (1,), "
        "expected integers of shape (3,), one per image.",
        "pixels.npz": f"Batch file {incoming / 'pixels.npz'} has arrays ['pixels'] but no "
        "'images'; save the pixels as images=uint8 array (N, 32, 32, 3).",
    }


def test_hidden_half_written_and_other_entries_are_reported_as_ignored(incoming: Path) -> None:
    save_batch(incoming / ".hidden.npz")
    save_batch(incoming / "monday.npz.tmp.npz")
    (incoming / "copy.part").write_bytes(b"\0" * 10)
    (incoming / "notes.txt").write_text("not a batch")
    (incoming / ".staging").mkdir()
    (incoming / "empty").mkdir()
    save_batch(incoming / "good.npz")

    found = discover_batches(incoming)

    assert [batch.batch_id for batch in found.batches] == ["good"]
    assert found.rejected == ()
    ignored = reasons(found.ignored)
    assert set(ignored) == {
        ".hidden.npz",
        "monday.npz.tmp.npz",
        "copy.part",
        "notes.txt",
        ".staging",
        "empty",
    }
    assert ignored[".hidden.npz"] == (
        f"{incoming / '.hidden.npz'} is hidden (its name starts with '.'), so it is skipped on "
        "purpose: write a batch under a dot-name and rename it when complete. Rename it without "
        "the dot to have it checked."
    )
    assert ignored["monday.npz.tmp.npz"] == (
        f"{incoming / 'monday.npz.tmp.npz'} is still being written (its name ends in .tmp.npz), "
        "so it is skipped until it is renamed to its final name. Remove it if the writer died."
    )
    assert "(its name ends in .part)" in ignored["copy.part"]
    assert ignored["notes.txt"].startswith(f"{incoming / 'notes.txt'} is not a batch:")
    assert ignored["empty"].startswith(
        f"{incoming / 'empty'} is an empty folder; it is registered as batch 'empty' once it "
        "holds images."
    )


def test_absent_empty_and_imageless_folders(incoming: Path) -> None:
    assert discover_batches(incoming.parent / "absent") == Discovery()
    assert discover_batches(incoming) == Discovery()
    (incoming / "docs").mkdir()
    (incoming / "docs" / "readme.txt").write_text("no images here")

    (rejected,) = discover_batches(incoming).rejected

    assert rejected.reason == (
        f"Batch folder {incoming / 'docs'} holds no image (.jpeg, .jpg, .png); put the images in "
        "it, or remove it."
    )


def test_image_folder_with_mixed_formats_and_unequal_classes(incoming: Path) -> None:
    batch = incoming / "2026-02-01 cam 2"
    write_png(batch / "cat" / "rgb.png", seed=1)
    write_png(batch / "cat" / "grey.png", seed=2, mode="L")
    write_png(batch / "cat" / "alpha.PNG", seed=3, mode="RGBA")
    write_png(batch / "cat" / "large.png", seed=4, size=48)
    write_png(batch / "dog" / "photo.jpg", seed=5)
    write_png(batch / "ship" / "photo.JPEG", seed=6)
    write_png(batch / "ship" / ".hidden.png", seed=7)

    (found,) = discover_batches(incoming).batches
    loaded = load_batch(found)

    assert found.kind == "image_folder" and found.batch_id.startswith("2026-02-01-cam-2-")
    assert loaded.images.shape == (6, 32, 32, 3) and loaded.images.dtype == np.uint8
    counts = np.bincount(loaded.labels, minlength=len(CLASSES))
    assert {CLASSES[i]: int(n) for i, n in enumerate(counts) if n} == {
        "cat": 4,
        "dog": 1,
        "ship": 1,
    }
    assert loaded.source == f"incoming:{found.batch_id}"


def test_unlabelled_image_folder_and_mixed_class_folders(incoming: Path) -> None:
    write_png(incoming / "flat" / "a.png")
    write_png(incoming / "flat" / "nested" / "b.jpg")
    write_png(incoming / "mixed" / "cat" / "a.png")
    write_png(incoming / "mixed" / "kitten" / "b.png")

    found = discover_batches(incoming)

    assert [batch.batch_id for batch in found.batches] == ["flat"]
    flat = load_batch(found.batches[0])
    assert len(flat) == 2 and (flat.labels == UNLABELLED).all()
    assert reasons(found.rejected)["mixed"].startswith(
        f"Batch folder {incoming / 'mixed'} mixes class folders with other folders ['kitten']"
    )


def test_the_incoming_folder_itself_may_be_a_symlink(tmp_path: Path, incoming: Path) -> None:
    save_batch(incoming / "good.npz")
    (tmp_path / "link").symlink_to(incoming)

    (batch,) = discover_batches(tmp_path / "link").batches

    assert batch.path == tmp_path / "link" / "good.npz"
    assert len(load_batch(batch)) == 4
