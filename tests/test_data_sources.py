"""The three data sources: synthetic images, CIFAR-10 through torchvision, and image folders."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_assets.data import cifar10
from cifar_assets.data.errors import DataSourceError
from cifar_assets.data.image_folder import load_image_folder, write_image_folder
from cifar_assets.data.imageset import CLASSES, UNLABELLED, ImageSet
from cifar_assets.data.synthetic import generate_synthetic

# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_is_deterministic_balanced_and_canonical() -> None:
    first = generate_synthetic(300, seed=5)
    again = generate_synthetic(300, seed=5)
    other = generate_synthetic(300, seed=6)
    assert first.images.shape == (300, 32, 32, 3)
    assert first.images.dtype == np.uint8
    assert first.source == "synthetic"
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.labels, again.labels)
    np.testing.assert_array_equal(first.ids, again.ids)
    assert not np.array_equal(first.images, other.images)
    assert set(first.ids.tolist()).isdisjoint(other.ids.tolist())
    assert set(first.class_counts().values()) == {30}
    assert set(generate_synthetic(105, seed=0).class_counts().values()) == {10, 11}
    # Images are not flat: every image has real pixel variation.
    assert first.images.reshape(300, -1).std(axis=1).min() > 10


@pytest.mark.parametrize("n", [0, -5, 2.5, True])
def test_synthetic_rejects_a_bad_count(n: object) -> None:
    with pytest.raises(DataSourceError, match="not a positive whole number"):
        generate_synthetic(n)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def learnability_data() -> tuple[ImageSet, ImageSet]:
    data = generate_synthetic(3000, seed=1)
    return data.subset(np.arange(2000)), data.subset(np.arange(2000, 3000))


def linear_accuracy(train: ImageSet, test: ImageSet) -> float:
    """Best test accuracy of one-vs-all ridge regression on raw pixels over a grid of penalties."""
    x_train = train.images.reshape(len(train), -1).astype(np.float64) / 255.0
    x_test = test.images.reshape(len(test), -1).astype(np.float64) / 255.0
    mean = x_train.mean(axis=0)
    x_train, x_test = x_train - mean, x_test - mean
    targets = np.eye(len(CLASSES))[train.labels] * 2.0 - 1.0
    # The dual form solves a 2,000 x 2,000 system instead of a 3,072 x 3,072 one.
    gram = x_train @ x_train.T
    cross = x_test @ x_train.T
    best = 0.0
    for penalty in (1.0, 10.0, 100.0, 1000.0):
        weights = np.linalg.solve(gram + penalty * np.eye(len(gram)), targets)
        best = max(best, float(((cross @ weights).argmax(axis=1) == test.labels).mean()))
    return best


def test_linear_classifier_on_raw_pixels_stays_low(
    learnability_data: tuple[ImageSet, ImageSet],
) -> None:
    accuracy = linear_accuracy(*learnability_data)
    print(f"ridge one-vs-all on raw pixels, 2,000 train / 1,000 test: {accuracy:.3f}")
    # Colours and scenes carry some signal (as on real CIFAR-10, where linear models reach
    # about 40%); silhouettes and textures need convolutions.
    assert 0.2 < accuracy < 0.55


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    import torch

    # On two shared, busy cores two OpenMP threads ran this test 2-8x slower (spin-waiting).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
def test_small_cnn_learns_what_the_linear_classifier_cannot(
    learnability_data: tuple[ImageSet, ImageSet], one_torch_thread: None
) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    train, test = learnability_data

    def to_tensor(imageset: ImageSet) -> torch.Tensor:
        pixels = torch.from_numpy(imageset.images).permute(0, 3, 1, 2).float() / 255.0
        return (pixels - 0.5) / 0.25

    def block(channels_in: int, channels_out: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )

    model = nn.Sequential(
        block(3, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    model.append(nn.Linear(64, len(CLASSES)))
    x_train, y_train = to_tensor(train), torch.from_numpy(train.labels)
    epochs, batch = 5, 64
    steps = epochs * (len(train) // batch)
    optimiser = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=4e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for step in range(len(train) // batch):
            index = order[step * batch : (step + 1) * batch]
            images = x_train[index]
            # Mirror half the batch: every class appears facing both ways anyway.
            mirrored = torch.rand(len(index), generator=generator) < 0.5
            images = torch.where(mirrored[:, None, None, None], images.flip(3), images)
            loss = nn.functional.cross_entropy(model(images), y_train[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        predicted = model(to_tensor(test)).argmax(dim=1).numpy()
    cnn = float((predicted == test.labels).mean())
    linear = linear_accuracy(train, test)
    print(f"small CNN {cnn:.3f} vs linear {linear:.3f} ({time.perf_counter() - started:.1f} s)")
    assert cnn > linear + 0.15
    assert cnn > 0.5


# ---------------------------------------------------------------------------------------------
# CIFAR-10


@pytest.fixture
def unreachable_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import CIFAR10

    # Port 9 (discard) on loopback refuses at once, so the test never waits on a real network.
    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")


def test_offline_download_says_where_to_put_the_archive(
    tmp_path: Path, unreachable_url: None
) -> None:
    data_dir = tmp_path / "data"
    with pytest.raises(DataSourceError) as caught:
        cifar10.load_cifar10(data_dir)
    message = str(caught.value)
    assert str(data_dir.resolve() / "cifar-10-python.tar.gz") in message
    assert "c58f30108f718f92721af3b95e74349a" in message
    assert '"synthetic"' in message and '"image_folder"' in message
    assert "127.0.0.1:9" in message
    # A failed download leaves nothing that could pass for the archive next time.
    assert not (data_dir / "cifar-10-python.tar.gz").exists()


def test_without_download_the_error_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="download=False") as caught:
        cifar10.load_cifar10(tmp_path, download=False)
    assert str(tmp_path.resolve() / "cifar-10-python.tar.gz") in str(caught.value)


def test_corrupted_archive_is_reported_and_never_extracted(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(np.random.default_rng(0).bytes(4096))
    actual = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(DataSourceError) as caught:
        cifar10.load_cifar10(tmp_path)
    message = str(caught.value)
    assert f"md5 is {actual}, expected c58f30108f718f92721af3b95e74349a" in message
    assert "not extracted" in message
    assert not (tmp_path / "cifar-10-batches-py").exists()
    assert archive.exists(), "the user's file is theirs to delete"


class _Payload:
    """A pickle that, if ever loaded, creates a marker folder: proof of code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_batch_files_failing_their_checksum_are_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"):
        (folder / name).write_bytes(pickle.dumps(_Payload(marker)))
    for name in ("test_batch", "batches.meta"):
        (folder / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(DataSourceError, match="is not in"):
        cifar10.load_cifar10(tmp_path, download=False)
    assert not marker.exists()
    # Even a file that passed its checksum is read by an unpickler that builds only arrays.
    with pytest.raises(DataSourceError, match=r"refusing to load posix\.mkdir"):
        cifar10._read_batch(folder / "data_batch_1")
    assert not marker.exists()


def fake_batch(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, count)
    # CIFAR-10 stores each image as 1,024 red, then green, then blue bytes (CHW, row-major).
    entry = {
        "batch_label": "fake",
        "labels": labels.tolist(),
        "data": images.transpose(0, 3, 1, 2).reshape(count, 3072),
        "filenames": [f"img_{i}.png" for i in range(count)],
    }
    return images, labels, entry


def build_fake_archive(tmp_path: Path) -> tuple[Path, dict[str, str], np.ndarray, np.ndarray]:
    """A well-formed archive in CIFAR-10's layout with its own (not the real) checksums."""
    rng = np.random.default_rng(0)
    files: dict[str, bytes] = {}
    train_images, test_images = [], None
    for index in range(1, 6):
        images, _, entry = fake_batch(4, rng)
        train_images.append(images)
        files[f"data_batch_{index}"] = pickle.dumps(entry, protocol=2)
    test_images, _, entry = fake_batch(3, rng)
    files["test_batch"] = pickle.dumps(entry, protocol=2)
    files["batches.meta"] = pickle.dumps({"label_names": list(CLASSES)}, protocol=2)
    archive = tmp_path / "source" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    md5s = {name: hashlib.md5(payload).hexdigest() for name, payload in files.items()}
    md5s["archive"] = hashlib.md5(archive.read_bytes()).hexdigest()
    return archive, md5s, np.concatenate(train_images), test_images


def test_verified_archive_is_extracted_and_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.datasets import CIFAR10

    archive, md5s, train_images, test_images = build_fake_archive(tmp_path)
    # Point the verifier at the fake archive's checksums; the verifying code stays the same.
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", md5s["archive"])
    monkeypatch.setattr(
        CIFAR10, "train_list", [[f"data_batch_{i}", md5s[f"data_batch_{i}"]] for i in range(1, 6)]
    )
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5s["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5s["batches.meta"]})
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "cifar-10-python.tar.gz").write_bytes(archive.read_bytes())

    train, test = cifar10.load_cifar10(data_dir, download=False)
    assert (len(train), len(test)) == (20, 3)
    assert train.source == test.source == "cifar10"
    np.testing.assert_array_equal(train.images, train_images)
    np.testing.assert_array_equal(test.images, test_images)

    # A tampered extracted batch is noticed and replaced from the verified archive.
    (data_dir / "cifar-10-batches-py" / "test_batch").write_bytes(b"tampered")
    _, again = cifar10.load_cifar10(data_dir, download=False)
    np.testing.assert_array_equal(again.images, test_images)


# ---------------------------------------------------------------------------------------------
# image folders


def save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Pillow's PNG writer ignores the JPEG quality setting.
    Image.fromarray(pixels).save(path, quality=95)


@pytest.fixture
def messy_folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    pixels = {
        "airplane": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
        "cat": np.full((32, 32, 3), (200, 120, 40), dtype=np.uint8),
        "dog": np.full((48, 64, 3), (10, 200, 30), dtype=np.uint8),
        "frog": np.tile(np.arange(32, dtype=np.uint8)[None, :] * 8, (32, 1)),
    }
    save(root / "airplane" / "a.png", pixels["airplane"])
    save(root / "cat" / "b.JPG", pixels["cat"])
    save(root / "dog" / "big.png", pixels["dog"])
    save(root / "frog" / "gray.png", pixels["frog"])
    (root / "ship").mkdir()
    (root / "ship" / "broken.png").write_bytes(rng.bytes(300))
    save(root / "unicorn" / "x.png", pixels["airplane"])
    (root / "truck").mkdir()
    (root / "README.txt").write_text("notes")
    (root / "cat" / "notes.txt").write_text("notes")
    return root, pixels


def test_failing_policy_names_every_offending_path(messy_folder: tuple[Path, dict]) -> None:
    root, _ = messy_folder
    with pytest.raises(DataSourceError) as caught:
        load_image_folder(root)
    message = str(caught.value)
    resolved = root.resolve()
    assert f"unreadable image: {resolved / 'ship' / 'broken.png'}" in message
    assert f"unknown class folder: {resolved / 'unicorn'}" in message
    assert f"empty class folder: {resolved / 'truck'}" in message
    assert "3 problem(s)" in message
    assert 'on_error="skip"' in message


def test_skipping_policy_loads_the_rest_and_reports_everything(
    messy_folder: tuple[Path, dict],
) -> None:
    root, pixels = messy_folder
    imageset, report = load_image_folder(root, on_error="skip")
    assert imageset.source == f"image_folder:{root.resolve()}"
    assert imageset.labels.tolist() == [0, 3, 5, 6]  # airplane, cat, dog, frog: sorted order
    assert imageset.images.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(imageset.images[0], pixels["airplane"])
    assert np.abs(imageset.images[1].astype(int) - (200, 120, 40)).max() <= 3  # JPEG
    np.testing.assert_array_equal(imageset.images[2], np.full((32, 32, 3), (10, 200, 30)))
    gray = imageset.images[3]
    np.testing.assert_array_equal(gray[..., 0], pixels["frog"])
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()

    resolved = root.resolve()
    assert imageset.origins.tolist() == [
        str(resolved / "airplane" / "a.png"),
        str(resolved / "cat" / "b.JPG"),
        str(resolved / "dog" / "big.png"),
        str(resolved / "frog" / "gray.png"),
    ]
    assert report.n_images == 4
    assert report.unreadable == ["ship/broken.png"]
    assert report.unknown_class_folders == ["unicorn"]
    assert report.empty_class_folders == ["truck"]
    assert report.stray_files == ["README.txt"]
    assert report.ignored == ["cat/notes.txt"]
    assert report.n_resized == 1 and report.resized_examples == ["dog/big.png (64x48)"]
    assert report.n_converted == 1 and report.converted_examples == ["frog/gray.png (L)"]
    assert report.missing_classes == ["automobile", "bird", "deer", "horse"]
    assert report.counts == {
        **dict.fromkeys(CLASSES, 0),
        "airplane": 1,
        "cat": 1,
        "dog": 1,
        "frog": 1,
    }
    assert json.loads(json.dumps(report.to_dict()))["unreadable"] == ["ship/broken.png"]


def test_missing_root_or_no_images_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="does not exist") as caught:
        load_image_folder(tmp_path / "nowhere")
    assert str((tmp_path / "nowhere").resolve()) in str(caught.value)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataSourceError, match="holds no readable images"):
        load_image_folder(tmp_path, on_error="skip")
    with pytest.raises(DataSourceError, match="is not one of"):
        load_image_folder(tmp_path, on_error="ignore")  # type: ignore[arg-type]
    save(tmp_path / "loose.png", np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(DataSourceError, match=r"1 image\(s\) sit directly in the folder"):
        load_image_folder(tmp_path, on_error="skip")


def test_unlabelled_folder_is_read_recursively(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    save(tmp_path / "b.png", images[1])
    save(tmp_path / "a.PNG", images[0])
    save(tmp_path / "day2" / "c.png", images[2])
    (tmp_path / "day2" / "log.csv").write_text("x")
    imageset, report = load_image_folder(tmp_path, labelled=False)
    assert imageset.labels.tolist() == [UNLABELLED] * 3
    np.testing.assert_array_equal(imageset.images, images)
    assert report.ignored == ["day2/log.csv"]
    assert report.counts == {}
    root = tmp_path.resolve()
    assert imageset.origins.tolist() == [
        str(root / "a.PNG"),
        str(root / "b.png"),
        str(root / "day2" / "c.png"),
    ]


def test_written_folder_reads_back_identical_pixels(tmp_path: Path) -> None:
    original = generate_synthetic(40, seed=3)
    written = write_image_folder(original, tmp_path / "out")
    assert len(written) == 40
    assert all(path.parent.name in CLASSES for path in written)
    loaded, report = load_image_folder(tmp_path / "out")
    assert report.problems == [] and report.n_resized == 0
    position = {image_id: i for i, image_id in enumerate(original.ids.tolist())}
    assert set(loaded.ids.tolist()) == set(position)
    for image, label, image_id, origin in zip(
        loaded.images, loaded.labels, loaded.ids, loaded.origins, strict=True
    ):
        np.testing.assert_array_equal(image, original.images[position[image_id]])
        assert label == original.labels[position[image_id]]
        assert origin == str((tmp_path / "out" / CLASSES[label] / f"{image_id}.png").resolve())
    assert original.origins[0] == "synthetic index 0"
