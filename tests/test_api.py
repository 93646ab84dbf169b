"""The notebook API's ONNX helpers (export, quantize, benchmark) on a small real model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cifar_assets import api
from cifar_assets.ml.model import Architecture, build_resnet18
from cifar_assets.ml.onnx_export import ort_session, run_onnx


def test_export_quantize_and_benchmark_through_the_api(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_resnet18(Architecture(stem="imagenet")).eval()
    images = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)

    fp32 = api.export_onnx(model, tmp_path / "model.onnx")
    int8 = api.quantize(fp32, tmp_path / "model.int8.onnx", images)
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size
    fp32_logits = run_onnx(ort_session(fp32), images)
    int8_logits = run_onnx(ort_session(int8), images)
    assert fp32_logits.shape == int8_logits.shape == (32, 10)

    figures = api.benchmark(fp32, batch_size=8, n_batches=3, warmup=1, threads=1)
    assert figures["images_per_s"] > 0
    assert figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]
