"""MLflow "models from code" definition of the registered CIFAR-10 ResNet18 pyfunc model.

registry.log_model passes this file to ``mlflow.pyfunc.log_model(python_model=<path>)``, so MLflow
stores source code plus the safetensors weights and architecture.json instead of a pickled module.
The pyfunc takes uint8 images (N, 32, 32, 3) and returns float32 logits (N, 10). Loading it needs
the cifar_assets package installed, because the network is rebuilt by cifar_assets.ml.model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel, PythonModelContext

MODEL_ARTIFACT = "resnet18"  # key of the artifact directory holding weights and architecture


class CifarResNetPyfunc(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        from cifar_assets.ml.model import load_model

        self.network = load_model(Path(context.artifacts[MODEL_ARTIFACT]))

    def predict(
        self,
        context: PythonModelContext,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> np.ndarray:
        import torch

        from cifar_assets.ml.model import normalise_uint8

        images = np.asarray(model_input)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
            raise ValueError(
                f"Expected uint8 images shaped (N, 32, 32, 3), got {images.dtype} "
                f"{images.shape}; pass raw CIFAR-10 pixels (ImageSet.images), not normalised input."
            )
        with torch.inference_mode():
            logits = self.network(torch.from_numpy(normalise_uint8(images)))
        return logits.numpy()


mlflow.models.set_model(CifarResNetPyfunc())
