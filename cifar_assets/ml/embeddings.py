"""Penultimate-layer embeddings and class probabilities of the ResNet18, for drift detection and
analysis: the 512-dimensional average-pooled features that the final linear layer reads."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from cifar_assets.ml.evaluation import batched_forward, predict_logits, softmax

if TYPE_CHECKING:
    import torch

EMBEDDING_DIM = 512


def embed(
    model: torch.nn.Module,
    images: np.ndarray,
    batch_size: int = 256,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> np.ndarray:
    """float32 (N, 512) features: the network's forward pass without its final ``fc`` layer."""
    return batched_forward(
        model, images, batch_size, device, forward=_features, log=log, what="embeddings"
    )


def predict_proba(
    model: torch.nn.Module,
    images: np.ndarray,
    batch_size: int = 256,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> np.ndarray:
    """float32 (N, classes) softmax probabilities."""
    return softmax(predict_logits(model, images, batch_size, device, log=log)).astype(np.float32)


def _features(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """torchvision's ResNet.forward up to the flatten after average pooling, without ``fc``."""
    import torch

    layers = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")
    for name in layers:
        if not hasattr(model, name):
            raise TypeError(
                f"embed expects a torchvision ResNet (from cifar_assets.ml.model); "
                f"{type(model).__name__} has no {name!r} layer."
            )
        batch = getattr(model, name)(batch)
    return torch.flatten(batch, 1)
