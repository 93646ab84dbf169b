"""The cifar_assets code location: every asset, check, job, schedule, sensor and resource."""

from __future__ import annotations

import dagster as dg

from cifar_assets.assets import data_assets, feature_assets, validation_assets
from cifar_assets.checks import DATA_CHECKS
from cifar_assets.jobs import data_job, main_job
from cifar_assets.resources import LocalStorageIOManager, MLflowResource, TritonResource

defs = dg.Definitions(
    assets=[
        data_assets.cifar10_raw,
        data_assets.cifar10_splits,
        validation_assets.validation_report,
        feature_assets.image_features,
    ],
    asset_checks=DATA_CHECKS,
    jobs=[data_job, main_job],
    resources={
        "io_manager": LocalStorageIOManager(),
        "mlflow": MLflowResource(),
        "triton": TritonResource(),
    },
)
