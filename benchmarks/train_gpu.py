"""GPU training benchmark for the device machine: ResNet18 (CIFAR stem) at CIFAR-10 scale.

Measures the project's training loop on 50,000 synthetic 32x32 images (CIFAR-10 cannot be
downloaded there) with bf16 autocast + channels_last on and off, and torch.compile on and off,
then times a full 20-epoch run. Prints one JSON object; run it as

    PYTHONPATH=. python3 benchmarks/train_gpu.py --out results/train_gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory


def measure(train_set, test_set, epochs: int, **overrides) -> dict:  # type: ignore[no-untyped-def]
    import torch

    from cifar_assets.ml.evaluation import evaluate, predict_logits
    from cifar_assets.ml.training import TrainConfig, train

    config = TrainConfig(epochs=epochs, device="cuda", **overrides)
    with TemporaryDirectory() as checkpoints:
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = train(train_set, None, config, Path(checkpoints))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    per_epoch = [m.images_per_s for m in result.history]
    logits = predict_logits(result.model.cuda(), test_set.images, device="cuda")
    return {
        "config": {"epochs": epochs, **overrides},
        "wall_seconds": round(seconds, 2),
        "images_per_s_per_epoch": [round(v, 1) for v in per_epoch],
        # the first epoch holds compilation and cuDNN autotuning; later epochs are steady state
        "steady_images_per_s": round(statistics.median(per_epoch[1:] or per_epoch), 1),
        "test_accuracy": round(float(evaluate(logits, test_set.labels).accuracy), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--probe-epochs", type=int, default=3)
    parser.add_argument("--full-epochs", type=int, default=20)
    args = parser.parse_args()

    import torch

    from cifar_assets.data.splits import stratified_split
    from cifar_assets.data.synthetic import generate_synthetic

    started = time.perf_counter()
    pool = generate_synthetic(60_000, seed=0)
    generation_s = time.perf_counter() - started
    splits = stratified_split(pool, validation_fraction=0.0, test_fraction=1 / 6, seed=0)
    train_set, test_set = splits.train, splits.test

    results: dict = {
        "machine": {
            "gpu": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "data": {
            "train": len(train_set),
            "test": len(test_set),
            "generation_s": round(generation_s, 2),
        },
        "probes": [],
    }
    for mixed in (False, True):
        for compiled in (False, True):
            probe = measure(
                train_set, test_set, args.probe_epochs, mixed_precision=mixed, compile=compiled
            )
            print(json.dumps(probe), flush=True)
            results["probes"].append(probe)
    best = max(results["probes"], key=lambda p: p["steady_images_per_s"])["config"]
    results["full_run"] = measure(
        train_set,
        test_set,
        args.full_epochs,
        mixed_precision=best["mixed_precision"],
        compile=best["compile"],
    )
    print(json.dumps(results["full_run"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
