"""Fixtures for the serving tests: two tiny ONNX models and a real tritonserver on free ports.

Each server is the library's ``launcher.start_scratch_server`` (the benchmarks start theirs the
same way): a temporary copy of the committed model repository (configs and labels only), its own
state and capture folders and free ports, and versions 1 and 2 (ResNet18 with the ImageNet stem,
two seeds). Test modules import the fixture functions (``*_fixture``); pytest knows them by the
names ``onnx_models`` and ``triton_server``, one server per test module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cifar_assets.serving import launcher
from cifar_assets.serving.launcher import TritonConfig, TritonServer

PROJECT_ROOT = Path(__file__).resolve().parent.parent
COMMITTED_REPO = PROJECT_ROOT / "triton_repo"
# The library's helpers, under the names the tests have always imported from here.
free_ports = launcher.free_ports


def copy_repository(target: Path) -> Path:
    """The committed repository without generated version folders."""
    return launcher.copy_repository(target, COMMITTED_REPO)


def export_tiny_model(path: Path, seed: int) -> Path:
    import torch

    from cifar_assets.ml.model import Architecture, build_resnet18

    torch.set_num_threads(2)
    torch.manual_seed(seed)
    model = build_resnet18(Architecture(stem="imagenet")).eval()
    try:
        from cifar_assets.ml.onnx_export import export_onnx
    except ImportError:
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 32, 32),),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    else:
        export_onnx(model, path)
    return path


@pytest.fixture(scope="session", name="onnx_models")
def onnx_models_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """version -> ONNX file: two differently seeded untrained models."""
    folder = tmp_path_factory.mktemp("onnx")
    return {seed: export_tiny_model(folder / f"model_seed{seed}.onnx", seed) for seed in (1, 2)}


@dataclass
class ServingEnv:
    server: TritonServer
    config: TritonConfig
    onnx: dict[int, Path]

    @property
    def http_url(self) -> str:
        return self.config.http_url

    @property
    def grpc_url(self) -> str:
        return self.config.grpc_url

    @property
    def repo(self) -> Path:
        return self.config.repo

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    @property
    def capture_dir(self) -> Path:
        return self.config.capture_dir


def start_serving(base: Path, onnx: dict[int, Path], sample_rate: float) -> ServingEnv:
    """A started server with versions 1 and 2 live and weights {1: 0.9, 2: 0.1}."""
    server = launcher.start_scratch_server(
        base,
        onnx,
        sample_rate=sample_rate,
        weights={1: 0.9, 2: 0.1},
        source_repo=COMMITTED_REPO,
    )
    return ServingEnv(server=server, config=server.config, onnx=onnx)


@pytest.fixture(scope="module", name="triton_server")
def triton_server_fixture(
    tmp_path_factory: pytest.TempPathFactory, onnx_models: dict[int, Path]
) -> Iterator[ServingEnv]:
    env = start_serving(tmp_path_factory.mktemp("serving"), onnx_models, sample_rate=0.5)
    yield env
    env.server.stop()


def ort_logits(onnx_path: Path, batch: np.ndarray) -> np.ndarray:
    """The reference: ONNX Runtime in this process on the same file and float input."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"input": batch})[0])
