"""Drift detection: how often ``check_batch`` flags corrupted batches, how often it flags clean
ones, and how long one check takes.

The detectors see what production sees: 512-d embeddings and softmax outputs of a ResNet18
(ImageNet stem, randomly initialised; ``cifar_assets.ml.embeddings``) and the feature-store
features (``compute_features``). A baseline is fitted (``fit_baseline``) on clean synthetic
images; batches are drawn from pools whose embeddings, probabilities and features are computed
once per image: a clean pool for the no-drift trials and the check timings, and one pool per
corruption and severity (the same source images, corrupted with
``cifar_assets.data.corruptions.corrupt``). Detection trials use disjoint batches of each
corrupted pool.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from common import THREADS, Goal, Template, fmt, log, main, median, section_facts, table

STEM: Literal["imagenet"] = "imagenet"
P_VAL = 0.05
SIZES = (200, 500, 1000)
SEVERITIES = (1, 3, 5)


def model_outputs(model: Any, images: Any) -> tuple[Any, Any]:
    """(embeddings, softmax probabilities) from one forward pass: the probabilities are the
    final layer applied to the embeddings, exactly what ``predict_proba`` computes."""
    import numpy as np
    import torch

    from cifar_assets.ml.embeddings import embed

    embeddings = embed(model, images, batch_size=500)
    with torch.inference_mode():
        logits = model.fc(torch.from_numpy(embeddings)).numpy()
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return embeddings, (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


class Pool:
    """Embeddings, probabilities and features of a set of images, each computed once, when a
    batch first reaches it (``ensure``)."""

    def __init__(self, model: Any, imageset: Any) -> None:
        import numpy as np
        import pandas as pd

        self.model, self.imageset = model, imageset
        self.embeddings = np.empty((0, 512), np.float32)
        self.probabilities = np.empty((0, 10), np.float32)
        self.features = pd.DataFrame()

    def __len__(self) -> int:
        return len(self.embeddings)

    def ensure(self, count: int) -> None:
        import numpy as np
        import pandas as pd

        from cifar_assets.data.features import compute_features

        if count <= len(self):
            return
        part = self.imageset.subset(np.arange(len(self), count))
        embeddings, probabilities = model_outputs(self.model, part.images)
        self.embeddings = np.concatenate([self.embeddings, embeddings])
        self.probabilities = np.concatenate([self.probabilities, probabilities])
        self.features = pd.concat([self.features, compute_features(part)], ignore_index=True)

    def check(self, baseline: Any, rows: Any) -> tuple[Any, float]:
        from cifar_assets.drift.report import check_batch

        self.ensure(int(max(rows)) + 1)
        began = time.perf_counter()
        report = check_batch(
            baseline,
            self.embeddings[rows],
            self.probabilities[rows],
            self.features.iloc[rows].reset_index(drop=True),
        )
        return report, time.perf_counter() - began


def run(quick: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    from cifar_assets.data.corruptions import CORRUPTIONS, corrupt
    from cifar_assets.data.imageset import ImageSet
    from cifar_assets.data.synthetic import generate_synthetic
    from cifar_assets.drift.baseline import fit_baseline
    from cifar_assets.ml.model import Architecture, build_resnet18

    torch.set_num_threads(THREADS)
    n_reference, n_clean, n_corrupted = (300, 600, 200) if quick else (1000, 2000, 1000)
    fp_trials, fp_size = (4, 100) if quick else (50, 200)
    sizes = (50, 100) if quick else SIZES
    timing_checks = 1 if quick else 3
    corruptions = ("gaussian_noise", "brightness") if quick else tuple(CORRUPTIONS)
    severities = (1, 5) if quick else SEVERITIES

    torch.manual_seed(0)
    model = build_resnet18(Architecture(stem=STEM)).eval()
    images = generate_synthetic(n_reference + n_clean + n_corrupted, seed=2)
    source = images.subset(np.arange(n_reference + n_clean, len(images)))

    began = time.perf_counter()
    reference = Pool(model, images.subset(np.arange(n_reference)))
    reference.ensure(n_reference)
    clean = Pool(model, images.subset(np.arange(n_reference, n_reference + n_clean)))
    clean.ensure(n_clean)
    corrupted: dict[tuple[str, int], Pool] = {}
    for name in corruptions:
        for severity in severities:
            pixels = corrupt(source.images, name, severity, seed=severity)
            corrupted[name, severity] = Pool(
                model, ImageSet.from_arrays(pixels, source.labels, source=f"{name}-{severity}")
            )
    clean_seconds = time.perf_counter() - began
    log(f"reference and clean pools embedded and featurized in {clean_seconds:.0f} s")

    began = time.perf_counter()
    baseline = fit_baseline(
        reference.embeddings,
        reference.probabilities,
        reference.features,
        model_version=0,
        p_val=P_VAL,
    )
    fit_seconds = time.perf_counter() - began  # includes alibi-detect's import (about 10 s)

    rng = np.random.default_rng(0)
    check_seconds: dict[int, list[float]] = {size: [] for size in sizes}
    false_alarms, fp_details = 0, []
    for trial in range(fp_trials):
        rows = rng.choice(n_clean, size=fp_size, replace=False)
        report, seconds = clean.check(baseline, rows)
        check_seconds.setdefault(fp_size, []).append(seconds)
        false_alarms += int(report.drift)
        fp_details.append({"drift": report.drift, "p": report.combined_p_value})
        if (trial + 1) % 10 == 0:
            log(f"no-drift trials {trial + 1}/{fp_trials}: {false_alarms} flagged")

    began = time.perf_counter()
    detection: dict[str, dict[str, dict[str, Any]]] = {}
    for (name, severity), pool in corrupted.items():
        cells: dict[str, Any] = {}
        for size in sizes:
            # Two batches at the smallest size, one at each larger size (the suite's time).
            trials = min(2, n_corrupted // size) if size == sizes[0] else 1
            flagged, p_values = 0, []
            for trial in range(trials):
                report, seconds = pool.check(baseline, np.arange(trial * size, (trial + 1) * size))
                check_seconds[size].append(seconds)
                flagged += int(report.drift)
                p_values.append(
                    {r.name: round(r.p_value, 4) for r in report.results if r.kind != "model"}
                )
            cells[str(size)] = {
                "trials": trials,
                "flagged": flagged,
                "rate": flagged / trials,
                "p_values": p_values,
            }
        detection.setdefault(name, {})[str(severity)] = cells
        log(
            f"{name} severity {severity}: "
            + ", ".join(
                f"{size}: {cell['flagged']}/{cell['trials']}" for size, cell in cells.items()
            )
        )
    detection_seconds = time.perf_counter() - began

    # Sizes the trials above measured fewer than timing_checks times get timed on clean batches.
    timing_flags: dict[int, int] = {}
    for size in sizes:
        while len(check_seconds[size]) < timing_checks:
            report, seconds = clean.check(baseline, rng.choice(n_clean, size=size, replace=False))
            check_seconds[size].append(seconds)
            timing_flags[size] = timing_flags.get(size, 0) + int(report.drift)
    log("check times: " + ", ".join(f"{s}: {median(v):.2f} s" for s, v in check_seconds.items()))
    embedded = n_reference + n_clean + sum(len(pool) for pool in corrupted.values())
    return {
        "parameters": {
            "stem": STEM,
            "model": "ResNet18, randomly initialised (seed 0)",
            "p_val": P_VAL,
            "reference_images": n_reference,
            "clean_pool_images": n_clean,
            "corrupted_pool_images": n_corrupted,
            "batch_sizes": list(sizes),
            "severities": list(severities),
            "corruptions": list(corruptions),
            "no_drift_trials": fp_trials,
            "no_drift_batch_size": fp_size,
            "timing_checks_per_size": timing_checks,
            "threads": THREADS,
        },
        "clean_pool_seconds": clean_seconds,
        "detection_seconds": detection_seconds,
        "embedded_images": embedded,
        "fit_seconds": fit_seconds,
        "false_positives": {
            "trials": fp_trials,
            "flagged": false_alarms,
            "rate": false_alarms / fp_trials,
            "details": fp_details,
        },
        "timing_check_flags": {str(k): v for k, v in timing_flags.items()},
        "detection": detection,
        "check_seconds": {
            str(size): {"n": len(values), "median": median(values), "values": values}
            for size, values in check_seconds.items()
        },
    }


DETECTOR_NAMES = {"mmd_embeddings": "MMD", "ks_softmax": "softmax", "ks_features": "features"}


def _cell(cell: dict[str, Any]) -> str:
    return f"{100 * cell['rate']:.0f}% ({cell['flagged']}/{cell['trials']})"


def _firing(cell: dict[str, Any], threshold: float) -> str:
    """How many of the cell's trials each data-drift detector flagged on its own."""
    counts = {
        label: sum(trial.get(name, 1.0) < threshold for trial in cell["p_values"])
        for name, label in DETECTOR_NAMES.items()
    }
    return ", ".join(f"{label} {count}" for label, count in counts.items())


def _fired(section: dict[str, Any], threshold: float) -> tuple[str, int, dict[str, int]]:
    """Which detector carries the verdict, counted over the smallest batch size's cells: that
    size, its trials, and the trials in which each detector fired."""
    first = str(section["parameters"]["batch_sizes"][0])
    cells = [cell for by_severity in section["detection"].values() for cell in by_severity.values()]
    first_cells = [cell[first] for cell in cells]
    trials = sum(cell["trials"] for cell in first_cells)
    fired = {
        label: sum(
            trial.get(name, 1.0) < threshold for cell in first_cells for trial in cell["p_values"]
        )
        for name, label in DETECTOR_NAMES.items()
    }
    return first, trials, fired


def _trials_per_size(section: dict[str, Any]) -> dict[str, int]:
    """Detection trials per batch size, as run (the same for every corruption and severity)."""
    first_corruption = next(iter(section["detection"].values()))
    cells = next(iter(first_corruption.values()))
    return {size: int(cell["trials"]) for size, cell in cells.items()}


def render(section: dict[str, Any], sections: dict[str, Any]) -> list[str]:
    template = Template("drift")
    parameters = section["parameters"]
    sizes = [str(size) for size in parameters["batch_sizes"]]
    threshold = parameters["p_val"] / 3
    rows = []
    for name, by_severity in section["detection"].items():
        for severity, cells in by_severity.items():
            rows.append(
                (
                    name,
                    severity,
                    *(_cell(cells[size]) for size in sizes),
                    _firing(cells[sizes[0]], threshold),
                )
            )
    fp = section["false_positives"]
    timing_rows = [
        (size, figures["n"], fmt(figures["median"], 2), fmt(max(figures["values"]), 2))
        for size, figures in section["check_seconds"].items()
        if figures["n"]
    ]
    first, trials, fired = _fired(section, threshold)
    batches_per_image = (
        fp["trials"] * parameters["no_drift_batch_size"] / parameters["clean_pool_images"]
    )
    return template.lines(
        "section",
        p_val=str(parameters["p_val"]),
        model=parameters["model"],
        stem=parameters["stem"],
        reference_images=f"{parameters['reference_images']:,}",
        corrupted_pool_images=f"{parameters['corrupted_pool_images']:,}",
        trials_per_size=", ".join(
            template.text("trials_at_size", count=str(count), size=size)
            for size, count in _trials_per_size(section).items()
        ),
        embedded_images=f"{section['embedded_images']:,}",
        clean_pool_seconds=f"{section['clean_pool_seconds']:.0f}",
        detection_seconds=f"{section['detection_seconds']:.0f}",
        detection_table=table(
            [
                "corruption",
                "severity",
                *(f"n = {size}" for size in sizes),
                f"detectors firing at n = {sizes[0]} (trials)",
            ],
            rows,
        ),
        first_size=first,
        trials=str(trials),
        fired=", ".join(
            template.text("detector_fired", detector=label, count=str(count))
            for label, count in fired.items()
        ),
        threshold=f"{threshold:.4f}",
        fp_flagged=str(fp["flagged"]),
        fp_trials=str(fp["trials"]),
        fp_batch_size=str(parameters["no_drift_batch_size"]),
        fp_percent=f"{100 * fp['rate']:.0f}",
        p_val_percent=f"{100 * parameters['p_val']:.0f}",
        clean_pool_images=f"{parameters['clean_pool_images']:,}",
        batches_per_image=f"{batches_per_image:.1f}",
        timing_table=table(["batch size", "checks", "median s", "max s"], timing_rows),
        timing_checks_per_size=str(parameters["timing_checks_per_size"]),
        timing_check_flags=", ".join(
            template.text("flagged_at_size", count=str(count), size=size)
            for size, count in section["timing_check_flags"].items()
        )
        or template.text("no_top_up"),
        fit_seconds=f"{section['fit_seconds']:.1f}",
        facts=section_facts(section),
    )


def goals(section: dict[str, Any]) -> list[Goal]:
    fp = section["false_positives"]
    p_val = section["parameters"]["p_val"]
    size = str(section["parameters"]["no_drift_batch_size"])
    first = str(section["parameters"]["batch_sizes"][0])
    strongest = str(max(section["parameters"]["severities"]))
    strong_detected = sum(
        by_severity[strongest][first].get("rate", 0.0) == 1.0
        for by_severity in section["detection"].values()
    )
    return [
        Goal(
            f"drift false-alarm rate, clean batches of {size}",
            f"<= {p_val:.2f} (design)",
            f"{fp['rate']:.2f} ({fp['flagged']}/{fp['trials']})",
            fp["rate"] <= p_val,
        ),
        Goal(
            f"drift detection at severity {strongest}, smallest batch",
            "-",
            f"{strong_detected} of {len(section['detection'])} corruptions flagged in every trial "
            f"at n = {section['parameters']['batch_sizes'][0]}",
            None,
        ),
        Goal(
            f"drift check time, batch {size} (median)",
            "-",
            f"{section['check_seconds'][size]['median']:.2f} s",
            None,
        ),
    ]


if __name__ == "__main__":
    main("drift", run)
