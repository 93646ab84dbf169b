"""The training loop on the CPU: it learns, resumes bit-identically, augments correctly, and
names what is wrong when it is misused.

ResNet18 with the ImageNet stem (about 108 training images/s on 2 cores); the learning bar was
measured on the synthetic data: 200 steps of 16 images reached 0.33-0.35 test accuracy over
seeds (chance 0.10), with the first epoch's mean loss about 2.8 and the last one's about 2.05.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_assets.data.imageset import ImageSet
from cifar_assets.data.synthetic import generate_synthetic
from cifar_assets.ml.evaluation import predict_logits
from cifar_assets.ml.training import (
    CHECKPOINT_FILE,
    EpochMetrics,
    Progress,
    TrainConfig,
    _epoch_indices,
    train,
)

pytestmark = pytest.mark.slow

QUICK = TrainConfig(epochs=2, batch_size=16, lr=0.02, stem="imagenet", num_threads=2, seed=3)


@pytest.fixture(scope="module")
def small_train() -> ImageSet:
    return generate_synthetic(64, seed=5)


def assert_same_weights(first: torch.nn.Module, second: torch.nn.Module) -> None:
    mine, theirs = first.state_dict(), second.state_dict()
    assert mine.keys() == theirs.keys()
    different = [name for name in mine if not torch.equal(mine[name], theirs[name])]
    assert different == []


def test_training_learns_synthetic_data(tmp_path: Path) -> None:
    train_set, test_set = generate_synthetic(800, seed=0), generate_synthetic(400, seed=1)
    config = TrainConfig(
        epochs=5, batch_size=16, lr=0.02, stem="imagenet", num_threads=2, max_steps=190
    )
    epochs: list[EpochMetrics] = []
    beats: list[Progress] = []

    result = train(
        train_set,
        test_set,
        config,
        tmp_path,
        on_epoch=epochs.append,
        on_progress=beats.append,
        progress_interval_s=0.0,
    )

    # 50 steps per epoch, capped at 190: four epochs, the last one 40 steps long.
    assert [entry.epoch for entry in result.history] == [1, 2, 3, 4]
    assert epochs == result.history
    assert [beat.global_step for beat in beats] == list(range(1, 191))
    assert {beat.total_steps for beat in beats} == {190}
    assert beats[-1].steps_in_epoch == 40 and beats[-1].eta_seconds == 0.0
    first, last = result.history[0], result.history[-1]
    assert last.train_loss < 0.85 * first.train_loss
    assert first.val_loss is not None and last.val_loss is not None
    assert last.val_loss < first.val_loss
    assert last.eta_seconds == 0.0 and first.eta_seconds > 0.0
    assert last.lr < 0.001 < first.lr  # one-cycle: annealed to near zero
    accuracy = float(
        (predict_logits(result.model, test_set.images).argmax(1) == test_set.labels).mean()
    )
    assert accuracy >= 0.25
    # Validation normalises with torch, predict_logits with numpy: a near-tie may flip.
    assert last.val_accuracy == pytest.approx(accuracy, abs=0.01)
    assert result.completed and result.resumed_from_epoch == 0 and result.device == "cpu"
    assert not result.model.training
    assert next(result.model.parameters()).device.type == "cpu"
    assert result.images_per_s > 0 and result.seconds >= sum(e.seconds for e in result.history)
    # One duration per step; an epoch's add up to its timed span (less the last callback).
    assert len(result.step_seconds) == 190 and min(result.step_seconds) > 0
    assert sum(result.step_seconds[:50]) == pytest.approx(first.seconds, rel=0.02)
    print(f"\ntest accuracy {accuracy:.3f}, {result.images_per_s:.0f} training images/s")


def test_interrupted_run_resumes_bit_identically(small_train: ImageSet, tmp_path: Path) -> None:
    uninterrupted = train(small_train, None, QUICK, tmp_path / "straight")

    def crash_after_first_epoch(metrics: EpochMetrics) -> None:
        if metrics.epoch == 1:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(small_train, None, QUICK, tmp_path / "crashed", on_epoch=crash_after_first_epoch)
    saved = torch.load(tmp_path / "crashed" / CHECKPOINT_FILE, weights_only=True)
    assert saved["epoch"] == 1

    resumed = train(small_train, None, QUICK, tmp_path / "crashed")

    assert resumed.resumed_from_epoch == 1 and resumed.completed and resumed.notes == []
    assert_same_weights(uninterrupted.model, resumed.model)
    assert [e.train_loss for e in resumed.history] == [e.train_loss for e in uninterrupted.history]


def test_stop_after_epochs_then_continue(small_train: ImageSet, tmp_path: Path) -> None:
    uninterrupted = train(small_train, None, QUICK, tmp_path / "straight")

    first_half = train(small_train, None, QUICK, tmp_path / "halves", stop_after_epochs=1)
    second_half = train(small_train, None, QUICK, tmp_path / "halves")
    again = train(small_train, None, QUICK, tmp_path / "halves")

    assert not first_half.completed and len(first_half.history) == 1
    assert second_half.completed and second_half.resumed_from_epoch == 1
    assert_same_weights(uninterrupted.model, second_half.model)
    # A finished checkpoint is a finished run: nothing is trained again.
    assert again.resumed_from_epoch == 2 and again.history == second_half.history
    assert_same_weights(uninterrupted.model, again.model)


def test_checkpoint_of_another_recipe_is_ignored_and_replaced(
    small_train: ImageSet, tmp_path: Path
) -> None:
    train(small_train, None, QUICK, tmp_path, stop_after_epochs=1)
    other = replace(QUICK, lr=0.03)

    result = train(small_train, None, other, tmp_path, stop_after_epochs=1)

    assert result.resumed_from_epoch == 0
    assert len(result.notes) == 1 and "another config or training set" in result.notes[0]
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert saved["config_hash"] == result.config_hash


def test_seed_and_data_define_the_run(small_train: ImageSet, tmp_path: Path) -> None:
    base = train(small_train, None, QUICK, tmp_path / "a", stop_after_epochs=1)
    same = train(small_train, None, QUICK, tmp_path / "b", stop_after_epochs=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reseeded = train(
            small_train, None, replace(QUICK, seed=4), tmp_path / "c", stop_after_epochs=1
        )
        assert torch.get_num_threads() == 1  # the run's num_threads=2 was undone
    finally:
        torch.set_num_threads(threads)
    assert_same_weights(base.model, same.model)
    assert not torch.equal(
        base.model.state_dict()["fc.weight"], reseeded.model.state_dict()["fc.weight"]
    )
    assert QUICK.recipe_hash("data-a") != QUICK.recipe_hash("data-b")
    # Speed settings are not part of the recipe: a run resumes on another device.
    faster = replace(QUICK, device="cpu", num_threads=1, compile=True)
    assert faster.recipe_hash("data-a") == QUICK.recipe_hash("data-a")


def test_augmentation_is_a_flip_plus_reflected_translation() -> None:
    images = torch.from_numpy(generate_synthetic(24, seed=9).images)
    config = TrainConfig(batch_size=8, translate=2)
    generator = torch.Generator().manual_seed(0)

    order, rows, cols = _epoch_indices(config, generator, len(images), 24, "cpu")
    assert rows is not None and cols is not None
    augmented = images[order.view(-1, 1, 1), rows, cols].numpy()

    matches = []
    for source, result in zip(order.tolist(), augmented, strict=True):
        padded = {
            flip: np.pad(
                images[source].numpy()[:, ::-1] if flip else images[source].numpy(),
                ((2, 2), (2, 2), (0, 0)),
                mode="reflect",
            )
            for flip in (False, True)
        }
        found = [
            (flip, dy, dx)
            for flip in (False, True)
            for dy in range(5)
            for dx in range(5)
            if np.array_equal(padded[flip][dy : dy + 32, dx : dx + 32], result)
        ]
        assert found, f"augmented image of source {source} is no flip/translate of it"
        matches.append(found[0])
    assert sorted(order.tolist()) == list(range(24))
    assert {flip for flip, _, _ in matches} == {False, True}
    assert len({(dy, dx) for _, dy, dx in matches}) >= 8


def test_misuse_names_the_problem(small_train: ImageSet, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fewer than one batch of 512"):
        train(small_train, None, TrainConfig(stem="imagenet"), tmp_path)
    unlabelled = ImageSet(small_train.images, np.full(64, -1), small_train.ids, "inbox")
    with pytest.raises(ValueError, match=r"'inbox'.*64 labels lie outside 0\.\.9"):
        train(unlabelled, None, QUICK, tmp_path)
    with pytest.raises(ValueError, match="stop_after_epochs=0 must be at least 1"):
        train(small_train, None, QUICK, tmp_path, stop_after_epochs=0)
    with pytest.raises(ValueError, match=r"epochs=0 must be at least 1.*lr=-1"):
        TrainConfig(epochs=0, lr=-1)
    with pytest.raises(ValueError, match="Unknown stem"):
        TrainConfig(stem="vit")  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device is 'cuda' but torch sees no CUDA"):
            train(small_train, None, replace(QUICK, device="cuda"), tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"cannot be read.*Delete it"):
        train(small_train, None, QUICK, tmp_path)


def test_warmup_of_exactly_one_step_trains_with_a_bar(
    small_train: ImageSet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """4 steps at warmup 0.25: torch's OneCycleLR alone divides by zero on this schedule. The
    command line shows a bar of the steps."""
    result = train(small_train, None, replace(QUICK, epochs=1), tmp_path)

    assert result.completed and len(result.history) == 1
    assert np.isfinite(result.history[0].train_loss)
    assert "training:   0%" in capsys.readouterr().err
