"""Validation stage: ``validation_report``, the per-image statistics table the blocking checks in
:mod:`cifar_assets.checks` read."""

import dagster as dg
import pandas as pd

from cifar_assets.assets.data_assets import DATA_GROUP
from cifar_assets.assets.metadata import versioned_output
from cifar_assets.data.imageset import Splits


@dg.asset(
    group_name=DATA_GROUP,
    kinds={"pandas", "pandera"},
    owners=["team:ml-platform"],
    code_version="1",
    description="Per-image statistics (channel means and stds, brightness, contrast, constant "
    "flag, exact and perceptual hashes) validated by blocking checks.",
)
def validation_report(
    context: dg.AssetExecutionContext, cifar10_splits: Splits
) -> dg.Output[pd.DataFrame]:
    from cifar_assets.data.statistics import image_statistics

    stats = image_statistics(cifar10_splits)
    context.log.info(f"Computed statistics for {len(stats)} images")
    summary = stats.groupby("split")[["brightness", "contrast"]].mean().round(2)
    return versioned_output(
        stats,
        metadata={
            "rows": len(stats),
            "constant_images": int(stats["is_constant"].sum()),
            "mean_brightness_by_split": dg.MetadataValue.json(
                {str(k): float(v) for k, v in summary["brightness"].items()}
            ),
            "mean_contrast_by_split": dg.MetadataValue.json(
                {str(k): float(v) for k, v in summary["contrast"].items()}
            ),
        },
    )
