"""The ResNet18 training loop: one-cycle SGD on data held on the device, with resumable checkpoints.

Speed comes from the airbench habits: the whole training set lives on the device as one uint8
tensor; each batch is gathered, flipped and translated there by a single index operation and
normalised on the device; on CUDA the network runs in bf16 autocast with channels_last memory,
optionally under torch.compile. The same code runs on CPU and GPU.

Determinism: the weights are initialised under the seed, and the data order and augmentation are
drawn from one seeded CPU ``torch.Generator`` (no numpy or global RNG is used), so a CPU run is
bit-identical run after run, and resuming from a checkpoint reproduces the uninterrupted run
bit for bit. On CUDA the data order and augmentation are still identical, but bit-identical
weights are not guaranteed: cuDNN autotuning (enabled for speed) may pick kernels whose atomic
adds change the summation order, so two GPU runs may differ in the last bits and drift apart.
(On one H200, torch 2.11, a resumed run did match the uninterrupted one bit for bit.)

``images_per_s`` counts the training steps alone (no validation, checkpoint or callback time), so
it can be compared with a bare PyTorch loop over the same model and batch size.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cifar_assets.data.imageset import ImageSet
from cifar_assets.fileio import replace_atomic
from cifar_assets.ml.model import CIFAR_MEAN, CIFAR_STD, Architecture
from cifar_assets.progress import progress_bar

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


def _hp(default: Any, doc: str, *, recipe: bool = True) -> Any:
    """A hyperparameter: its default, its one-line description (shown in the Dagster UI, whose
    TrainingConfig is generated from these fields), and whether it changes the computed weights
    (``recipe``). device, compile, mixed_precision and num_threads change speed (and on CUDA the
    last bits), not the recipe, so a run interrupted on one machine resumes on another."""
    return field(default=default, metadata={"doc": doc, "recipe": recipe})


@dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter of a run. The defaults are a ResNet18 CIFAR-10 recipe for a GPU;
    they were not tuned here (CIFAR-10 cannot be downloaded on the development machines)."""

    # One-cycle ResNet18 recipes reach about 94-95% CIFAR-10 test accuracy in 30-40 epochs; 35
    # sits inside that range instead of the 200 epochs of step-decay recipes.
    epochs: int = _hp(35, "Passes over the training split.")
    # 512 keeps a large GPU busy and is the batch of the fast CIFAR recipes (DAWNBench, airbench).
    batch_size: int = _hp(512, "Images per optimizer step.")
    # Peak learning rate of the one-cycle schedule: the linear scaling rule (Goyal et al. 2017)
    # applied to the classic 0.1 at batch 256.
    lr: float = _hp(0.2, "Peak one-cycle learning rate.")
    # A quarter of the steps warming up linearly, then linear decay: the triangular schedule of
    # the fast CIFAR recipes, which tolerates a high peak rate without early divergence.
    warmup_fraction: float = _hp(0.25, "Share of the steps warming up.")
    # 5e-4 is the standard weight decay for ResNets on CIFAR-10; less overfits 50k images.
    weight_decay: float = _hp(5e-4, "SGD weight decay.")
    # Nesterov SGD with 0.9 momentum generalises better than Adam on CIFAR ResNets.
    momentum: float = _hp(0.9, "SGD momentum.")
    nesterov: bool = _hp(True, "Nesterov momentum.")
    # Label smoothing 0.2 (airbench) improves accuracy and calibration in short schedules.
    label_smoothing: float = _hp(0.2, "Label smoothing of the loss.")
    # Random horizontal flip plus a translation of up to ``translate`` pixels (reflected border):
    # the standard CIFAR augmentation, worth several points of accuracy.
    augment: bool = _hp(True, "Random flip and translate.")
    translate: int = _hp(4, "Largest translation in pixels.")
    # The CIFAR stem keeps 32x32 resolution in the first stage and is the accurate choice; the
    # ImageNet stem is about 5x faster on a CPU and serves quick runs and tests.
    stem: Literal["cifar", "imagenet"] = _hp(
        "cifar", "cifar: accurate; imagenet: about 5x faster on CPU."
    )
    seed: int = _hp(0, "Seed of the weights, data order and augmentation.")
    # "auto" takes CUDA when there is one; forcing "cuda" without one is an error.
    device: Literal["auto", "cpu", "cuda"] = _hp("auto", "Where to train.", recipe=False)
    # Measured on an H200 (CIFAR stem, batch 512, 50k images): eager 50-54k img/s, compiled
    # 63-69k img/s after a 16 s first epoch (eager: 8 s); the compilation outweighs the gain below ~45
    # epochs of that size, so it is off by default.
    compile: bool = _hp(False, "torch.compile (GPU runs).", recipe=False)
    # bf16 autocast + channels_last on CUDA (no effect on CPU); off only to measure what they give.
    mixed_precision: bool = _hp(True, "bf16 autocast + channels_last on CUDA.", recipe=False)
    # Caps the total optimizer steps (the schedule spans the capped count); for tests and smoke runs.
    max_steps: int | None = _hp(None, "Cap on optimizer steps.")
    # CPU threads for the run (torch.set_num_threads), restored afterwards; None keeps torch's.
    num_threads: int | None = _hp(None, "CPU threads for torch.", recipe=False)

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs={self.epochs} must be at least 1")
        if self.batch_size < 2:
            problems.append(f"batch_size={self.batch_size} must be at least 2 (batch norm)")
        if self.lr <= 0:
            problems.append(f"lr={self.lr} must be positive")
        if not 0 < self.warmup_fraction < 1:
            problems.append(f"warmup_fraction={self.warmup_fraction} must lie in (0, 1)")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing={self.label_smoothing} must lie in [0, 1)")
        if not 0 <= self.translate <= 16:
            problems.append(f"translate={self.translate} must lie in 0..16 pixels")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device={self.device!r} must be 'auto', 'cpu' or 'cuda'")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps={self.max_steps} must be at least 1 (or None)")
        if self.num_threads is not None and self.num_threads < 1:
            problems.append(f"num_threads={self.num_threads} must be at least 1 (or None)")
        if problems:
            raise ValueError("Invalid TrainConfig: " + "; ".join(problems) + ".")
        Architecture(stem=self.stem)

    def recipe_hash(self, train_fingerprint: str) -> str:
        """Identifies the weights this config computes from this training set."""
        recipe = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["recipe"]}
        recipe["train_fingerprint"] = train_fingerprint
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EpochMetrics:
    """One completed epoch. train_loss includes label smoothing and train_accuracy is measured on
    augmented batches in train mode; val_loss is the plain cross-entropy in eval mode."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    images_per_s: float
    seconds: float
    eta_seconds: float
    lr: float


@dataclass(frozen=True)
class Progress:
    """A heartbeat within an epoch; train_loss is the running mean of the epoch so far."""

    epoch: int
    step: int
    steps_in_epoch: int
    global_step: int
    total_steps: int
    images_per_s: float
    eta_seconds: float
    train_loss: float
    lr: float


@dataclass
class TrainResult:
    model: torch.nn.Module  # eval mode, on CPU
    architecture: Architecture
    history: list[EpochMetrics]
    images_per_s: float  # training steps of this call only; the last epoch's figure if none ran
    seconds: float  # wall time of this call
    resumed_from_epoch: int  # 0 for a fresh start
    device: str
    completed: bool  # False when stop_after_epochs ended the call before config.epochs
    config_hash: str
    notes: list[str] = field(default_factory=list)
    # Wall seconds of each training step of this call, in order. On a CPU each is that step's
    # cost; on CUDA steps are queued, so only their sum over an epoch is meaningful.
    step_seconds: list[float] = field(default_factory=list)


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "TrainConfig.device is 'cuda' but torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). "
            "Use device='auto' or 'cpu', or run where a GPU and a CUDA build of torch are present."
        )
    return requested


def train(
    train: ImageSet,
    validation: ImageSet | None,
    config: TrainConfig,
    checkpoint_dir: Path,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    progress_interval_s: float = 10.0,
    stop_after_epochs: int | None = None,
) -> TrainResult:
    """Train ResNet18 on ``train``, resuming from ``checkpoint_dir`` when it holds a checkpoint
    of the same recipe and training set.

    Each epoch ends with a checkpoint written atomically, then ``on_epoch``: an exception from the
    callback propagates and the checkpoint of that epoch stays, so the next call resumes after it.
    A checkpoint of another recipe is ignored (with a note in the result) and replaced at the end
    of the first epoch: changing a hyperparameter and training again must just work, and the old
    checkpoint could not be resumed anyway. ``stop_after_epochs`` ends the call once that many
    epochs (counted from the start of training, not of this call) are complete; the schedule
    still spans ``config.epochs``, so a later call continues the same run.
    """
    import torch

    started = time.perf_counter()
    if stop_after_epochs is not None and stop_after_epochs < 1:
        raise ValueError(
            f"stop_after_epochs={stop_after_epochs} must be at least 1, or None to train all "
            f"{config.epochs} epochs."
        )
    _check_imageset(train, "train", config.batch_size)
    if validation is not None:
        _check_imageset(validation, "validation", 1)
    device = resolve_device(config.device)
    is_cuda = device == "cuda"
    architecture = Architecture(stem=config.stem)
    config_hash = config.recipe_hash(train.fingerprint())

    steps_per_epoch = len(train) // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    last_epoch = epochs if stop_after_epochs is None else min(epochs, stop_after_epochs)

    checkpoint_path = checkpoint_dir / CHECKPOINT_FILE
    notes: list[str] = []
    checkpoint = _read_checkpoint(checkpoint_path, config_hash, notes)

    with _torch_settings(config.num_threads, cudnn_benchmark=is_cuda):
        model, optimizer, scheduler, generator = _build_run(config, architecture, total_steps)
        history: list[EpochMetrics] = []
        start_epoch, global_step, trained_seconds = 0, 0, 0.0
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            generator.set_state(checkpoint["generator"])
            history = [EpochMetrics(**entry) for entry in checkpoint["history"]]
            start_epoch = int(checkpoint["epoch"])
            global_step = int(checkpoint["global_step"])
            trained_seconds = float(checkpoint["trained_seconds"])
        model.to(device)
        _move_optimizer_state(optimizer, device)
        fast_cuda = is_cuda and config.mixed_precision
        if fast_cuda:
            model.to(memory_format=torch.channels_last)
        network: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(model) if config.compile else model
        )

        train_images = torch.from_numpy(train.images).to(device)
        train_labels = torch.from_numpy(train.labels).to(device)
        val_data = (
            (torch.from_numpy(validation.images).to(device), torch.from_numpy(validation.labels))
            if validation is not None and len(validation) > 0
            else None
        )
        mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1) * 255
        autocast: Callable[[], Any] = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if fast_cuda else nullcontext
        )

        def normalise(batch_uint8_nhwc: torch.Tensor) -> torch.Tensor:
            # The NHWC -> NCHW permute is already a channels_last layout: no copy on CUDA.
            batch = (batch_uint8_nhwc.permute(0, 3, 1, 2).float() - mean) / std
            if fast_cuda:
                return batch.contiguous(memory_format=torch.channels_last)
            return batch.contiguous()

        call_images, call_seconds = 0, 0.0
        step_seconds: list[float] = []
        # The command-line bar (None when CIFAR_PROGRESS_BAR=0); on_progress feeds the run log.
        bar = progress_bar(total_steps, "training", "step", initial=global_step)
        for epoch in range(start_epoch + 1, last_epoch + 1):
            epoch_steps = min(steps_per_epoch, total_steps - global_step)
            model.train()
            order, rows, cols = _epoch_indices(
                config, generator, len(train), epoch_steps * config.batch_size, device
            )
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            lr = optimizer.param_groups[0]["lr"]
            _synchronize(device)
            epoch_started = last_report = step_ended = time.perf_counter()
            for step in range(1, epoch_steps + 1):
                batch = slice((step - 1) * config.batch_size, step * config.batch_size)
                index = order[batch]
                batch_uint8 = (
                    train_images[index.view(-1, 1, 1), rows[batch], cols[batch]]
                    if rows is not None and cols is not None
                    else train_images[index]
                )
                inputs, targets = normalise(batch_uint8), train_labels[index]
                with autocast():
                    logits = network(inputs)
                    loss = torch.nn.functional.cross_entropy(
                        logits, targets, label_smoothing=config.label_smoothing
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                loss_sum += loss.detach() * len(index)
                correct += (logits.detach().argmax(1) == targets).sum()
                global_step += 1
                if bar is not None:
                    bar.update(1)

                now = time.perf_counter()
                step_seconds.append(now - step_ended)
                step_ended = now
                # Due when the next step would pass the interval: gaps stay under it.
                mean_step = (now - epoch_started) / step
                if on_progress is not None and now - last_report + mean_step >= progress_interval_s:
                    last_report = now
                    rate = step * config.batch_size / (now - epoch_started)
                    on_progress(
                        Progress(
                            epoch=epoch,
                            step=step,
                            steps_in_epoch=epoch_steps,
                            global_step=global_step,
                            total_steps=total_steps,
                            images_per_s=rate,
                            eta_seconds=(total_steps - global_step) * config.batch_size / rate,
                            train_loss=float(loss_sum) / (step * config.batch_size),
                            lr=lr,
                        )
                    )
            _synchronize(device)
            epoch_seconds = time.perf_counter() - epoch_started
            epoch_images = epoch_steps * config.batch_size
            call_images += epoch_images
            call_seconds += epoch_seconds
            trained_seconds += epoch_seconds

            val_loss, val_accuracy = (
                _validate(model, val_data, normalise, autocast, config.batch_size)
                if val_data is not None
                else (None, None)
            )
            metrics = EpochMetrics(
                epoch=epoch,
                train_loss=float(loss_sum) / epoch_images,
                train_accuracy=int(correct) / epoch_images,
                val_loss=val_loss,
                val_accuracy=val_accuracy,
                images_per_s=epoch_images / epoch_seconds,
                seconds=epoch_seconds,
                eta_seconds=(total_steps - global_step) * epoch_seconds / epoch_steps,
                lr=lr,
            )
            history.append(metrics)
            if bar is not None:
                shown = {"epoch": epoch, "loss": f"{metrics.train_loss:.3f}"}
                if val_accuracy is not None:
                    shown["val_acc"] = f"{val_accuracy:.3f}"
                bar.set_postfix(shown)
            _write_checkpoint(
                checkpoint_path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "config_hash": config_hash,
                    "epoch": epoch,
                    "global_step": global_step,
                    "trained_seconds": trained_seconds,
                    "model": _cpu_state(model.state_dict()),
                    "optimizer": _cpu_state(optimizer.state_dict()),
                    "scheduler": scheduler.state_dict(),
                    "generator": generator.get_state(),
                    "history": [asdict(entry) for entry in history],
                },
            )
            if on_epoch is not None:
                on_epoch(metrics)
        if bar is not None:
            bar.close()

        model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    if call_seconds > 0:
        images_per_s = call_images / call_seconds
    else:
        images_per_s = history[-1].images_per_s if history else 0.0
    return TrainResult(
        model=model,
        architecture=architecture,
        history=history,
        images_per_s=images_per_s,
        seconds=time.perf_counter() - started,
        resumed_from_epoch=start_epoch,
        device=device,
        completed=len(history) >= epochs,
        config_hash=config_hash,
        notes=notes,
        step_seconds=step_seconds,
    )


def _check_imageset(imageset: ImageSet, role: str, min_size: int) -> None:
    import numpy as np

    where = f"{role} set {imageset.source!r}"
    if imageset.images.dtype != np.uint8 or imageset.images.shape[1:] != (32, 32, 3):
        raise ValueError(
            f"{where}: images must be uint8 (N, 32, 32, 3), got {imageset.images.dtype} "
            f"{imageset.images.shape}. Build it with ImageSet.from_arrays."
        )
    bad = (imageset.labels < 0) | (imageset.labels >= Architecture().num_classes)
    if bad.any():
        first = str(imageset.ids[np.flatnonzero(bad)[0]])
        raise ValueError(
            f"{where}: {int(bad.sum())} labels lie outside 0..9 (first at id {first}); training "
            "needs labelled images: drop unlabelled (-1) images or label them first."
        )
    if len(imageset) < min_size:
        raise ValueError(
            f"{where} holds {len(imageset)} images, fewer than one batch of {min_size}: "
            "lower TrainConfig.batch_size or provide more images."
        )


@contextmanager
def _torch_settings(num_threads: int | None, cudnn_benchmark: bool) -> Iterator[None]:
    """Apply process-wide torch settings for the run and restore them afterwards."""
    import torch

    threads, benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = benchmark


def _build_run(
    config: TrainConfig, architecture: Architecture, total_steps: int
) -> tuple[torch.nn.Module, torch.optim.SGD, torch.optim.lr_scheduler.OneCycleLR, torch.Generator]:
    import torch

    from cifar_assets.ml.model import build_resnet18

    # fork_rng keeps the caller's global RNG untouched while the seed fixes the initial weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_resnet18(architecture)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    # Built before any optimizer state is loaded: its constructor overwrites the learning rates.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        total_steps=total_steps,
        pct_start=_onecycle_warmup(config.warmup_fraction, total_steps),
        anneal_strategy="linear",
        cycle_momentum=False,
    )
    generator = torch.Generator().manual_seed(config.seed)
    return model, optimizer, scheduler, generator


def _onecycle_warmup(warmup_fraction: float, total_steps: int) -> float:
    """``pct_start`` for OneCycleLR. Its warm-up phase ends at step ``pct_start * total - 1``;
    when that is exactly 0 (say 4 steps at 0.25) the phase has zero length and torch divides by
    zero. Ending it half a step later gives the same schedule: the first step still runs at the
    initial rate and the peak comes next."""
    if abs(warmup_fraction * total_steps - 1.0) < 1e-9:
        return 1.5 / total_steps
    return warmup_fraction


def _epoch_indices(
    config: TrainConfig, generator: torch.Generator, n_images: int, n_used: int, device: str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One epoch's image order and, with augmentation, the row and column indices that flip and
    translate each image in a single gather.

    Flipping mirrors the column index, translating shifts both, and indices falling off the image
    are reflected back (the border airbench uses), so no padded copy is ever made. Everything is
    drawn on the CPU generator, so CPU and GPU see the same data, and moved to the device once
    per epoch: a copy from pageable host memory per step would make the host wait for the GPU
    at every step.
    """
    import torch

    order = torch.randperm(n_images, generator=generator)[:n_used]
    if not config.augment:
        return order.to(device), None, None
    flip = torch.rand(n_used, generator=generator) < 0.5
    shift = torch.randint(-config.translate, config.translate + 1, (2, n_used), generator=generator)
    base = torch.arange(32)
    rows = _reflect(base + shift[0].view(-1, 1), 32)
    cols = _reflect(torch.where(flip.view(-1, 1), 31 - base, base) + shift[1].view(-1, 1), 32)
    return order.to(device), rows.view(-1, 32, 1).to(device), cols.view(-1, 1, 32).to(device)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Mirror indices in -size+1..2*size-2 back into 0..size-1 without repeating the edge."""
    import torch

    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def _validate(
    model: torch.nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    normalise: Callable[[torch.Tensor], torch.Tensor],
    autocast: Callable[[], Any],
    batch_size: int,
) -> tuple[float, float]:
    import torch

    images, labels = data
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            with autocast():
                logits = model(normalise(images[start : start + batch_size])).float().cpu()
            targets = labels[start : start + batch_size]
            loss_sum += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(1) == targets).sum())
    return loss_sum / len(images), correct / len(images)


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _move_optimizer_state(optimizer: torch.optim.Optimizer, device: str) -> None:
    """optimizer.load_state_dict casts state to the parameters' device at load time, which was
    the CPU; the momentum buffers follow the parameters here."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if hasattr(value, "to"):
                state[key] = value.to(device)


def _cpu_state(state: Any) -> Any:
    import torch

    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: _cpu_state(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_cpu_state(value) for value in state)
    return state


def _read_checkpoint(path: Path, config_hash: str, notes: list[str]) -> dict[str, Any] | None:
    import torch

    if not path.is_file():
        return None
    try:
        checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RuntimeError(
            f"Checkpoint {path} cannot be read ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}). Delete it to start training over, or restore it "
            "from a backup."
        ) from error
    if (
        checkpoint.get("format") != CHECKPOINT_FORMAT
        or checkpoint.get("config_hash") != config_hash
    ):
        notes.append(
            f"Ignored checkpoint {path} (recipe {checkpoint.get('config_hash')}, epoch "
            f"{checkpoint.get('epoch')}): it belongs to another config or training set than this "
            f"run's recipe {config_hash}; trained from scratch and replaced it."
        )
        return None
    return checkpoint


def _write_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write next to the target and rename: a crash mid-write leaves the previous checkpoint."""
    import os

    import torch

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())

    replace_atomic(path, write)
