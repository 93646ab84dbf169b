"""FLOPs of the ResNet18 per image (both stems) and the machine's measured fp32 matmul peak, so
that the training and inference throughputs of the other sections read as a share of the limit.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass (it counts a
multiply-add as two FLOPs, and only convolutions and matrix products: batch norm, ReLU and pooling
add well under 1%). A training step costs about three forward passes (forward, and a backward
that computes gradients for both activations and weights). The peak is a large fp32 matmul in
torch on the benchmark's thread count: the best this CPU does with the same math library.
"""

from __future__ import annotations

import time
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
    set_torch_threads,
    table,
)

TRAINING_FACTOR = 3  # forward + backward (activation and weight gradients)


def forward_flops(stem: str) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cifar_assets.ml.model import Architecture, build_resnet18

    model = build_resnet18(Architecture(stem=stem)).eval()  # type: ignore[arg-type]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 32, 32))
    return int(counter.get_total_flops())


def matmul_runs(size: int, repeats: int) -> tuple[list[float], list[float]]:
    """FLOP/s of fp32 (size x size) @ (size x size) products in torch and, alternating with it,
    in ONNX Runtime (a one-node MatMul graph: its own MLAS kernels), each after a warm-up."""
    import numpy as np
    import onnxruntime
    import torch
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    spec = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in "ABC"]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "mm", spec[:2], spec[2:]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feed = {"A": a, "B": b}

    def timed(product: Any) -> float:
        began = time.perf_counter()
        product()
        return 2 * size**3 / (time.perf_counter() - began)

    torch.mm(ta, tb)
    session.run(None, feed)
    runs, _ = interleave(
        {
            "torch": lambda: timed(lambda: torch.mm(ta, tb)),
            "onnxruntime": lambda: timed(lambda: session.run(None, feed)),
        },
        repeats,
    )
    return runs["torch"], runs["onnxruntime"]


def run(quick: bool) -> dict[str, Any]:
    set_torch_threads()
    flops = {stem: forward_flops(stem) for stem in ("imagenet", "cifar")}
    log(f"forward FLOPs per image: {flops}")
    size, repeats = (1024, 3) if quick else (4096, 7)
    rates, ort_rates = matmul_runs(size, repeats)
    log(
        f"matmul {size}: torch median {median(rates) / 1e9:.1f} GFLOP/s, ONNX Runtime "
        f"{median(ort_rates) / 1e9:.1f}"
    )
    return {
        "parameters": {"threads": THREADS, "matmul_size": size, "matmul_repeats": repeats},
        "forward_flops_per_image": flops,
        "training_flops_per_image": {k: TRAINING_FACTOR * v for k, v in flops.items()},
        "matmul_flops_per_s": rates,
        "peak_flops_per_s": median(rates),
        "best_flops_per_s": max(rates),
        "ort_matmul_flops_per_s": ort_rates,
        "ort_matmul_median_flops_per_s": median(ort_rates),
    }


def utilisation(sections: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """(what, images/s, achieved FLOP/s, share of peak) for the figures other sections measured."""
    flops = sections.get("flops")
    if flops is None:
        return []
    peak = flops["peak_flops_per_s"]
    forward = flops["forward_flops_per_image"]
    rows = []
    training = sections.get("training")
    if training is not None:
        for stem, figures in training["figures"].items():
            rate = figures["project_images_per_s"]
            achieved = rate * TRAINING_FACTOR * forward[stem]
            rows.append((f"training, {stem} stem, project loop", rate, achieved, achieved / peak))
    quantization = sections.get("quantization")
    if quantization is not None:
        for stem, speed in quantization["speed"].items():
            for precision in ("fp32", "int8"):
                rate = speed[f"{precision}_images_per_s"]
                achieved = rate * forward[stem]
                what = f"ONNX Runtime {precision.upper()}, {stem} stem, batch 64, {THREADS} threads"
                if precision == "int8":
                    what += " (FP32-equivalent FLOPs)"
                rows.append((what, rate, achieved, achieved / peak))
    serving = sections.get("serving")
    if serving is not None:
        for precision in ("fp32", "int8"):
            direct = serving["direct_ort"].get(precision, {}).get("32")
            if direct:
                rate = direct["images_per_s"]
                achieved = rate * forward["imagenet"]
                rows.append(
                    (
                        f"ONNX Runtime {precision.upper()}, imagenet stem, batch 32, 1 thread "
                        "(serving baseline)",
                        rate,
                        achieved,
                        achieved / peak,
                    )
                )
    return rows


def render(section: dict[str, Any], sections: dict[str, Any]) -> list[str]:
    template = Template("flops")
    flops = section["forward_flops_per_image"]
    rates = section["matmul_flops_per_s"]
    machine = section["machine"]
    zen3_scale = ""
    if (
        machine.get("cpu_mhz")
        and machine["cpu_model"].startswith("AMD EPYC")
        and "avx512f" not in machine["simd_flags"]
    ):
        # Zen 3: two 256-bit FMAs per cycle per core, 32 fp32 FLOP per cycle.
        zen3_scale = template.text(
            "zen3_scale",
            cores=str(machine["usable_cpus"]),
            ghz=f"{machine['cpu_mhz'] / 1000:.2f}",
            gflops=f"{32 * machine['usable_cpus'] * machine['cpu_mhz'] / 1000:.0f}",
        )
    rows = utilisation(sections)
    return template.lines(
        "section",
        flops_table=table(
            ["model", "forward FLOPs / image", "training FLOPs / image (3x)"],
            [
                (f"ResNet18, {stem} stem, 32x32", f"{v / 1e6:,.1f} M", f"{3 * v / 1e6:,.1f} M")
                for stem, v in flops.items()
            ],
        ),
        matmul_size=str(section["parameters"]["matmul_size"]),
        threads=str(section["parameters"]["threads"]),
        repeats=str(len(rates)),
        peak=f"{section['peak_flops_per_s'] / 1e9:.1f}",
        best=f"{section['best_flops_per_s'] / 1e9:.1f}",
        worst=f"{min(rates) / 1e9:.1f}",
        ort_peak=f"{section['ort_matmul_median_flops_per_s'] / 1e9:.1f}",
        zen3_scale=zen3_scale,
        utilisation=template.lines(
            "utilisation",
            table=table(
                ["workload", "images/s", "achieved GFLOP/s", "share of peak"],
                [(w, fmt(r), fmt(a / 1e9, 2), f"{100 * s:.0f}%") for w, r, a, s in rows],
            ),
        )
        if rows
        else [],
        facts=section_facts(section),
    )


def goals(section: dict[str, Any]) -> list[Goal]:
    return [
        Goal(
            "fp32 matmul peak (2 threads)",
            "-",
            f"{section['peak_flops_per_s'] / 1e9:.1f} GFLOP/s",
            None,
        )
    ]


if __name__ == "__main__":
    main("flops", run)
