"""ResNet18 for 32x32 images, and its storage as safetensors weights plus a JSON architecture file.

The CIFAR stem (3x3 stride-1 convolution, no max-pool) keeps the 32x32 resolution through the
first stage and reaches the best accuracy; the ImageNet stem (7x7 stride-2 and max-pool) is about
5x faster on a CPU and serves quick runs. No pickled modules are ever written or read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from cifar_assets.fileio import replace_atomic, write_text_atomic

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "model.safetensors"
ARCH_FILE = "architecture.json"

# Per-channel statistics of the CIFAR-10 training set. The network (and its ONNX export) takes
# normalised float NCHW input; normalise_uint8 is the one definition every consumer shares.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def normalise_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 32, 32, 3) pixels -> normalised float32 (N, 3, 32, 32) network input."""
    scaled = images.astype(np.float32) / 255.0
    mean = np.asarray(CIFAR_MEAN, dtype=np.float32)
    std = np.asarray(CIFAR_STD, dtype=np.float32)
    return np.ascontiguousarray(((scaled - mean) / std).transpose(0, 3, 1, 2))


@dataclass(frozen=True)
class Architecture:
    stem: Literal["cifar", "imagenet"] = "cifar"
    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.stem not in ("cifar", "imagenet"):
            raise ValueError(f"Unknown stem {self.stem!r}: use 'cifar' or 'imagenet'.")


def build_resnet18(architecture: Architecture) -> torch.nn.Module:
    """torchvision's resnet18 with the chosen stem, randomly initialised."""
    import torch
    from torchvision.models import resnet18

    model = resnet18(num_classes=architecture.num_classes)
    if architecture.stem == "cifar":
        model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = torch.nn.Identity()
    return model


def save_model(model: torch.nn.Module, architecture: Architecture, directory: Path) -> Path:
    """Write weights and architecture into ``directory``; returns the weights file."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    replace_atomic(directory / WEIGHTS_FILE, lambda path: save_file(state, str(path)))
    write_text_atomic(directory / ARCH_FILE, json.dumps(asdict(architecture), indent=2) + "\n")
    return directory / WEIGHTS_FILE


def load_model(directory: Path) -> torch.nn.Module:
    """Rebuild the model from ``directory`` in eval mode; a missing file is an error, never a
    silently untrained model."""
    from safetensors.torch import load_file

    weights, arch_file = directory / WEIGHTS_FILE, directory / ARCH_FILE
    for required in (weights, arch_file):
        if not required.is_file():
            raise FileNotFoundError(
                f"Model file {required} is missing. Re-materialize the trained_model asset, or "
                f"point to a directory holding {WEIGHTS_FILE} and {ARCH_FILE}."
            )
    architecture = Architecture(**json.loads(arch_file.read_text()))
    model = build_resnet18(architecture)
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def load_architecture(directory: Path) -> Architecture:
    return Architecture(**json.loads((directory / ARCH_FILE).read_text()))
