"""Jobs: the data job (data, validation, features) and the main job (the whole chain)."""

from __future__ import annotations

import dagster as dg

DATA_ASSETS = ["cifar10_raw", "cifar10_splits", "validation_report", "image_features"]

data_job = dg.define_asset_job(
    name="data_job",
    selection=dg.AssetSelection.assets(*DATA_ASSETS),
    description="Load, split, validate and featurize the data set.",
)

main_job = dg.define_asset_job(
    name="main_job",
    selection=dg.AssetSelection.groups("data", "training", "serving"),
    description="The whole chain: data, validation, features, training, evaluation, "
    "registration, ONNX export and deployment to Triton.",
)
