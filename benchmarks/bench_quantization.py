"""Static INT8 quantization: accuracy lost and speed gained against the FP32 ONNX model.

The goal is read on the project's default model, ResNet18 with the CIFAR stem (TrainConfig's
default, the production recipe): it is trained briefly on synthetic images so that accuracy means
something, exported with ``export_onnx``, quantized with ``quantize_int8`` (QDQ, MinMax
calibration on training images), and both files are scored on a held-out test split with
``compare_int8``. Speed is ``benchmark_onnx`` at batch 64, FP32 and INT8 runs alternating.

The ImageNet stem (the CPU quick-run model of configs/quickstart.yaml) is measured for speed only,
untrained: a CNN's cost does not depend on its weights. For both stems, ONNX Runtime's profiler
splits the convolution time by output resolution, which shows where INT8 pays and where not.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    THREADS,
    Goal,
    Template,
    fmt,
    interleave,
    log,
    main,
    median,
    section_facts,
    table,
)

BATCH_SIZE = 64
LEARNING_RATE = 0.1  # the quickstart's rate for batch 64
CALIBRATION_IMAGES = 512
GOAL_SPEEDUP = 2.0
GOAL_MAX_LOSS_POINTS = 0.5


def train_model(train_set: Any, steps: int) -> tuple[Any, float, float]:
    """(model, seconds, training images/s) of a short CIFAR-stem run."""
    from cifar_assets.ml.training import TrainConfig, train

    config = TrainConfig(
        stem="cifar",
        batch_size=BATCH_SIZE,
        lr=LEARNING_RATE,
        max_steps=steps,
        device="cpu",
        num_threads=THREADS,
    )
    with tempfile.TemporaryDirectory(prefix="bench-quant-train-") as checkpoints:
        result = train(train_set, None, config, Path(checkpoints))
    return result.model, result.seconds, result.images_per_s


def speed(fp32: Path, int8: Path, n_batches: int, repeats: int) -> dict[str, Any]:
    from cifar_assets.ml.inference_bench import benchmark_onnx

    def measure(path: Path) -> float:
        figures = benchmark_onnx(
            path, BATCH_SIZE, n_batches=n_batches, warmup=2, threads=THREADS, repeats=1
        )
        return figures["images_per_s"]

    runs, loads = interleave(
        {"fp32": lambda: measure(fp32), "int8": lambda: measure(int8)}, repeats, log
    )
    ratios = [i / f for f, i in zip(runs["fp32"], runs["int8"], strict=True)]
    fp32_rate, int8_rate = median(runs["fp32"]), median(runs["int8"])
    return {
        "n_batches": n_batches,
        "repeats": repeats,
        "fp32_runs": runs["fp32"],
        "int8_runs": runs["int8"],
        "load_average_per_run": loads,
        "fp32_images_per_s": fp32_rate,
        "int8_images_per_s": int8_rate,
        "speedup": int8_rate / fp32_rate,
        "pair_speedups": ratios,
    }


def conv_ms_by_resolution(path: Path, runs: int) -> dict[str, float]:
    """Median kernel time per batch of 64 of the model's convolutions, summed per output
    resolution ("16x16, 64 ch"), from ONNX Runtime's profiler (Conv in FP32, QLinearConv in
    INT8); ``runs`` profiled batches after 2 untimed ones."""
    import numpy as np
    import onnxruntime as ort

    from cifar_assets.ml.onnx_export import INPUT_NAME

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="bench-quant-profile-") as scratch:
        options.profile_file_prefix = os.path.join(scratch, "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {
            INPUT_NAME: np.random.default_rng(0).standard_normal(
                (BATCH_SIZE, 3, 32, 32), np.float32
            )
        }
        for _ in range(2 + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[str, list[float]] = {}
    resolution: dict[str, str] = {}
    for event in events:
        args = event.get("args", {})
        if (
            event.get("cat") != "Node"
            or not event["name"].endswith("_kernel_time")
            or args.get("op_name") not in ("Conv", "QLinearConv")
        ):
            continue
        [shape] = [next(iter(output.values())) for output in args["output_type_shape"]]
        dims = list(shape[1:])  # C, H, W in FP32 (NCHW); H, W, C in INT8 (NHWC)
        channels = max(dims)  # >= 64, while the spatial sizes are <= 32
        dims.remove(channels)
        height, width = dims
        resolution[event["name"]] = f"{height}x{width}, {channels} ch"
        per_node.setdefault(event["name"], []).append(event["dur"] / 1000.0)
    totals: dict[str, float] = {}
    for name, durations in per_node.items():
        # The first 2 calls of each node are the untimed warm-up.
        key = resolution[name]
        totals[key] = totals.get(key, 0.0) + median(durations[2:])
    return totals


def run(quick: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    from cifar_assets.data.splits import stratified_split
    from cifar_assets.data.synthetic import generate_synthetic
    from cifar_assets.ml.model import Architecture, build_resnet18
    from cifar_assets.ml.onnx_export import export_onnx
    from cifar_assets.ml.quantization import compare_int8, quantize_int8

    torch.set_num_threads(THREADS)
    # 90 steps of 64 with the CIFAR stem take about 4 minutes here (about 23 images/s).
    n_images, steps = (1000, 3) if quick else (12_000, 90)
    cifar_batches, cifar_repeats = (1, 1) if quick else (6, 4)
    imagenet_batches, imagenet_repeats = (2, 1) if quick else (10, 5)
    profile_runs = 1 if quick else 5
    splits = stratified_split(
        generate_synthetic(n_images, seed=1), validation_fraction=0.0, test_fraction=1 / 6, seed=0
    )
    log(f"training the CIFAR stem for {steps} steps on {len(splits.train)} images")
    model, train_seconds, train_rate = train_model(splits.train, steps)
    calibration = splits.train.images[
        np.random.default_rng(0).permutation(len(splits.train))[:CALIBRATION_IMAGES]
    ]
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as scratch:
        folder = Path(scratch)
        fp32, int8 = folder / "cifar_fp32.onnx", folder / "cifar_int8.onnx"
        export_onnx(model, fp32)
        began = time.perf_counter()
        quantize_int8(fp32, int8, calibration)
        quantize_seconds = time.perf_counter() - began
        log(f"quantized in {quantize_seconds:.1f} s; scoring {len(splits.test)} test images")
        report = compare_int8(fp32, int8, splits.test.images, splits.test.labels)
        log(f"accuracy fp32 {report.fp32_accuracy:.4f} int8 {report.int8_accuracy:.4f}")
        log("CIFAR stem speed")
        cifar_speed = speed(fp32, int8, cifar_batches, cifar_repeats)
        profiles = {"cifar": {"fp32": conv_ms_by_resolution(fp32, profile_runs)}}
        profiles["cifar"]["int8"] = conv_ms_by_resolution(int8, profile_runs)

        torch.manual_seed(0)
        imagenet_model = build_resnet18(Architecture(stem="imagenet")).eval()
        imagenet_fp32 = folder / "imagenet_fp32.onnx"
        imagenet_int8 = folder / "imagenet_int8.onnx"
        export_onnx(imagenet_model, imagenet_fp32)
        quantize_int8(imagenet_fp32, imagenet_int8, calibration[:256])
        log("ImageNet stem speed")
        imagenet_speed = speed(imagenet_fp32, imagenet_int8, imagenet_batches, imagenet_repeats)
        profiles["imagenet"] = {
            "fp32": conv_ms_by_resolution(imagenet_fp32, profile_runs),
            "int8": conv_ms_by_resolution(imagenet_int8, profile_runs),
        }
    return {
        "parameters": {
            "threads": THREADS,
            "batch_size": BATCH_SIZE,
            "train_images": len(splits.train),
            "test_images": len(splits.test),
            "train_steps": steps,
            "learning_rate": LEARNING_RATE,
            "calibration_images": len(calibration),
            "calibration_images_imagenet_stem": min(256, len(calibration)),
            "profiled_batches": profile_runs,
        },
        "training": {"seconds": train_seconds, "images_per_s": train_rate},
        "quantize_seconds": quantize_seconds,
        "accuracy": {
            "fp32": report.fp32_accuracy,
            "int8": report.int8_accuracy,
            "delta_points": report.accuracy_delta_points,
            "top1_agreement": report.top1_agreement,
            "fp32_size_bytes": report.fp32_size_bytes,
            "int8_size_bytes": report.int8_size_bytes,
            "size_ratio": report.size_ratio,
        },
        "speed": {"cifar": cifar_speed, "imagenet": imagenet_speed},
        "conv_ms_by_resolution": profiles,
    }


def render(section: dict[str, Any], sections: dict[str, Any]) -> list[str]:
    template = Template("quantization")
    parameters, accuracy = section["parameters"], section["accuracy"]
    n_test = parameters["test_images"]
    speed_rows = []
    for stem, figures in section["speed"].items():
        speed_rows.append(
            (
                f"{stem} stem" + (" (trained, above)" if stem == "cifar" else " (untrained)"),
                f"{figures['n_batches']} x {figures['repeats']}",
                fmt(figures["fp32_images_per_s"]),
                fmt(figures["int8_images_per_s"]),
                f"**{figures['speedup']:.2f}x**",
                ", ".join(f"{r:.2f}" for r in figures["pair_speedups"]),
            )
        )
    profile_rows = []
    for stem, profile in section["conv_ms_by_resolution"].items():
        for resolution, fp32_ms in profile["fp32"].items():
            int8_ms = profile["int8"].get(resolution)
            profile_rows.append(
                (
                    f"{stem} stem",
                    resolution,
                    f"{fp32_ms:.2f}",
                    fmt(int8_ms, 2),
                    f"{fp32_ms / int8_ms:.2f}x" if int8_ms else "-",
                )
            )
        fp32_total, int8_total = sum(profile["fp32"].values()), sum(profile["int8"].values())
        profile_rows.append(
            (
                f"{stem} stem",
                "all convolutions",
                f"{fp32_total:.2f}",
                f"{int8_total:.2f}",
                f"{fp32_total / int8_total:.2f}x",
            )
        )
    passes = accuracy["top1_agreement"] >= 0.97 and accuracy["delta_points"] >= -1
    return template.lines(
        "section",
        train_steps=str(parameters["train_steps"]),
        batch_size=str(parameters["batch_size"]),
        learning_rate=str(parameters["learning_rate"]),
        train_seconds=f"{section['training']['seconds']:.0f}",
        train_images=f"{parameters['train_images']:,}",
        calibration_images=str(parameters["calibration_images"]),
        quantize_seconds=f"{section['quantize_seconds']:.0f}",
        test_images=f"{n_test:,}",
        accuracy_table=table(
            ["", "FP32", "INT8", "difference"],
            [
                (
                    "test accuracy",
                    f"{100 * accuracy['fp32']:.2f}%",
                    f"{100 * accuracy['int8']:.2f}%",
                    f"**{accuracy['delta_points']:+.2f} points**",
                ),
                (
                    "file size",
                    f"{accuracy['fp32_size_bytes'] / 2**20:.1f} MiB",
                    f"{accuracy['int8_size_bytes'] / 2**20:.1f} MiB",
                    f"x{accuracy['size_ratio']:.2f}",
                ),
            ],
        ),
        agreement=f"{100 * accuracy['top1_agreement']:.2f}",
        points_per_image=f"{100 / n_test:.3f}",
        gate=template.text("passes_gate" if passes else "fails_gate"),
        threads=str(parameters["threads"]),
        speed_table=table(
            [
                "model",
                "batches x runs",
                "FP32 images/s",
                "INT8 images/s",
                "speed-up (of medians)",
                "speed-up per pair",
            ],
            speed_rows,
        ),
        profiled_batches=str(parameters["profiled_batches"]),
        profile_table=table(
            ["model", "output", "FP32 ms", "INT8 ms", "INT8 speed-up"], profile_rows
        ),
        findings=_profile_findings(template, section["conv_ms_by_resolution"]),
        facts=section_facts(section),
    )


def _profile_findings(template: Template, profiles: dict[str, Any]) -> list[str]:
    """What the profile shows, read off its figures: the weakest resolution per stem and the
    share of FP32 time spent there."""
    lines = []
    for stem, profile in profiles.items():
        gains = {
            key: fp32 / profile["int8"][key]
            for key, fp32 in profile["fp32"].items()
            if profile["int8"].get(key)
        }
        if not gains:
            continue
        weakest = min(gains, key=lambda key: gains[key])
        best = max(gains, key=lambda key: gains[key])
        share = profile["fp32"][weakest] / sum(profile["fp32"].values())
        lines += template.lines(
            "finding",
            stem=stem,
            best_gain=f"{gains[best]:.2f}",
            best=best,
            weakest_gain=f"{gains[weakest]:.2f}",
            weakest=weakest,
            share=f"{100 * share:.0f}",
        )
    return lines


def goals(section: dict[str, Any]) -> list[Goal]:
    accuracy, cifar = section["accuracy"], section["speed"]["cifar"]
    return [
        Goal(
            "INT8 on a trained model (CIFAR stem): speed-up at batch 64 and accuracy lost",
            f">= {GOAL_SPEEDUP:g}x, <= {GOAL_MAX_LOSS_POINTS} points",
            f"{cifar['speedup']:.2f}x (pairs {min(cifar['pair_speedups']):.2f}-"
            f"{max(cifar['pair_speedups']):.2f}), {accuracy['delta_points']:+.2f} points "
            f"({100 * accuracy['fp32']:.2f}% -> {100 * accuracy['int8']:.2f}%, agreement "
            f"{100 * accuracy['top1_agreement']:.1f}%)",
            cifar["speedup"] >= GOAL_SPEEDUP and accuracy["delta_points"] >= -GOAL_MAX_LOSS_POINTS,
        ),
        Goal(
            "INT8 speed-up at batch 64, imagenet stem (quick CPU model)",
            "-",
            f"{section['speed']['imagenet']['speedup']:.2f}x",
            None,
        ),
    ]


if __name__ == "__main__":
    main("quantization", run)
