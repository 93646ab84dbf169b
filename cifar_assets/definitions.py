"""The cifar_assets code location: every asset, check, job, schedule, sensor and resource."""

import dagster as dg

from cifar_assets.assets import (
    data_assets,
    export_assets,
    feature_assets,
    monitoring_assets,
    registry_assets,
    serving_assets,
    training_assets,
    validation_assets,
)
from cifar_assets.checks import DATA_CHECKS
from cifar_assets.jobs import (
    data_job,
    drift_check_job,
    main_job,
    promotion_job,
    retraining_job,
    rollback_job,
    rollout_job,
)
from cifar_assets.resources import LocalStorageIOManager, MLflowResource, TritonResource
from cifar_assets.schedules import daily_drift_schedule
from cifar_assets.sensors import drift_retraining_sensor, incoming_batch_sensor, rollout_sensor

defs = dg.Definitions(
    assets=[
        # data
        data_assets.cifar10_raw,
        data_assets.cifar10_splits,
        validation_assets.validation_report,
        feature_assets.image_features,
        # training
        training_assets.trained_model,
        training_assets.model_evaluation,
        registry_assets.registered_model,
        export_assets.onnx_model,
        # serving
        serving_assets.triton_deployment,
        # monitoring
        monitoring_assets.drift_baseline,
        monitoring_assets.incoming_batch,
        monitoring_assets.drift_report,
        monitoring_assets.ab_test_report,
    ],
    asset_checks=[*DATA_CHECKS, serving_assets.serving_follows_registry],
    jobs=[
        data_job,
        main_job,
        drift_check_job,
        retraining_job,
        promotion_job,
        rollback_job,
        rollout_job,
    ],
    schedules=[daily_drift_schedule],
    sensors=[incoming_batch_sensor, drift_retraining_sensor, rollout_sensor],
    resources={
        "io_manager": LocalStorageIOManager(),
        "mlflow": MLflowResource(),
        "triton": TritonResource(),
    },
)
