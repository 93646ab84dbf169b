"""ONNX export, parity with PyTorch, static INT8 quantization and the ONNX Runtime benchmark, on a
briefly trained model run by the real onnxruntime.

The model (ImageNet stem, 100 steps of 16 synthetic images) reaches about 0.3 test accuracy;
measured on it, INT8 accuracy stayed within 0.5 points of FP32 with 95-98% top-1 agreement.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cifar_assets.data.imageset import ImageSet
from cifar_assets.data.synthetic import generate_synthetic
from cifar_assets.ml.evaluation import predict_logits
from cifar_assets.ml.inference_bench import benchmark_onnx
from cifar_assets.ml.onnx_export import (
    ParityError,
    ParityReport,
    check_parity,
    export_onnx,
    ort_session,
    require_parity,
    run_onnx,
)
from cifar_assets.ml.quantization import compare_int8, quantize_int8
from cifar_assets.ml.training import TrainConfig, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data() -> tuple[ImageSet, ImageSet]:
    return generate_synthetic(800, seed=0), generate_synthetic(400, seed=1)


@pytest.fixture(scope="module")
def model(
    data: tuple[ImageSet, ImageSet], tmp_path_factory: pytest.TempPathFactory
) -> torch.nn.Module:
    config = TrainConfig(epochs=2, batch_size=16, lr=0.02, stem="imagenet", num_threads=2)
    return train(data[0], None, config, tmp_path_factory.mktemp("checkpoints")).model


@pytest.fixture(scope="module")
def fp32_path(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_export_declares_a_dynamic_batch(fp32_path: Path) -> None:
    graph = onnx.load(str(fp32_path)).graph
    (graph_input,) = graph.input
    (graph_output,) = graph.output
    assert graph_input.name == "input" and graph_output.name == "logits"
    input_dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    output_dims = [d.dim_param or d.dim_value for d in graph_output.type.tensor_type.shape.dim]
    assert isinstance(input_dims[0], str) and input_dims[1:] == [3, 32, 32]
    assert output_dims == [input_dims[0], 10]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert not list(fp32_path.parent.glob("*.data"))  # one self-contained file


def test_parity_with_pytorch(
    model: torch.nn.Module, fp32_path: Path, data: tuple[ImageSet, ImageSet]
) -> None:
    report = check_parity(model, fp32_path, data[1].images[:200])

    assert report.n == 200
    assert report.top1_agreement >= 0.999
    assert report.max_abs_diff < 1e-4
    require_parity(report)


def test_any_batch_size_runs(
    model: torch.nn.Module, fp32_path: Path, data: tuple[ImageSet, ImageSet]
) -> None:
    images = data[1].images[:72]
    reference = predict_logits(model, images)
    session = ort_session(fp32_path)
    for batch_size in (1, 7, 64):
        logits = run_onnx(session, images, batch_size=batch_size)
        assert logits.shape == (72, 10)
        np.testing.assert_allclose(logits, reference, atol=1e-4)


def test_require_parity_names_the_gap() -> None:
    with pytest.raises(ParityError, match=r"agreement 0\.9500 \(required >= 0\.999\).*0\.25"):
        require_parity(ParityReport(top1_agreement=0.95, max_abs_diff=0.25, n=400))
    with pytest.raises(ParityError, match=r"allowed <= 0\.001"):
        require_parity(ParityReport(top1_agreement=1.0, max_abs_diff=0.01, n=400))


def test_export_refuses_what_it_cannot_do(model: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"opset 17 is not supported.*Use opset >= 18"):
        export_onnx(model, tmp_path / "old.onnx", opset=17)
    with pytest.raises(FileNotFoundError, match="Export it first with export_onnx"):
        ort_session(tmp_path / "missing.onnx")


def test_int8_keeps_accuracy_and_shrinks_the_file(
    fp32_path: Path, data: tuple[ImageSet, ImageSet], tmp_path: Path
) -> None:
    train_set, test_set = data
    int8_path = quantize_int8(fp32_path, tmp_path / "model.int8.onnx", train_set.images[:256])

    report = compare_int8(fp32_path, int8_path, test_set.images, test_set.labels)

    assert report.fp32_accuracy >= 0.2  # the model learned something worth keeping
    assert abs(report.accuracy_delta_points) <= 3.0
    assert report.top1_agreement >= 0.9
    assert report.int8_size_bytes == int8_path.stat().st_size
    assert report.size_ratio < 0.3  # 8-bit weights: about a quarter of the FP32 file
    fp32_speed = benchmark_onnx(fp32_path, batch_size=64, n_batches=4, warmup=1, threads=2)
    int8_speed = benchmark_onnx(int8_path, batch_size=64, n_batches=4, warmup=1, threads=2)
    for speed in (fp32_speed, int8_speed):
        assert set(speed) == {"images_per_s", "p50_ms", "p95_ms", "p99_ms"}
        assert 0 < speed["p50_ms"] <= speed["p95_ms"] <= speed["p99_ms"]
        assert speed["images_per_s"] > 0
    print(
        f"\nINT8 vs FP32 (ImageNet stem, batch 64, 2 threads): "
        f"{int8_speed['images_per_s']:.0f} vs {fp32_speed['images_per_s']:.0f} images/s = "
        f"{int8_speed['images_per_s'] / fp32_speed['images_per_s']:.2f}x; accuracy "
        f"{report.int8_accuracy:.3f} vs {report.fp32_accuracy:.3f}; size ratio "
        f"{report.size_ratio:.3f}"
    )


def test_quantization_input_checks(fp32_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Calibration images must be uint8"):
        quantize_int8(fp32_path, tmp_path / "q.onnx", np.zeros((4, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="Unknown calibration method 'entropy'"):
        quantize_int8(
            fp32_path,
            tmp_path / "q.onnx",
            np.zeros((4, 32, 32, 3), np.uint8),
            method="entropy",  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="batch_size >= 1"):
        benchmark_onnx(fp32_path, batch_size=0, n_batches=1, warmup=0)
