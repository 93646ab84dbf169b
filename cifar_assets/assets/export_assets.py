"""Export stage: ``onnx_model``, FP32 ONNX with a parity check, and a static INT8 model kept
only within its accuracy and agreement limits; both logged to the registered version's MLflow run."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from cifar_assets.artifacts import OnnxModel, RegisteredModel, TrainedModel
from cifar_assets.assets.metadata import versioned_output
from cifar_assets.assets.training_assets import TRAINING_GROUP
from cifar_assets.data.imageset import Splits
from cifar_assets.ml.onnx_export import PARITY_ATOL, PARITY_MIN_AGREEMENT, PARITY_RTOL
from cifar_assets.ml.quantization import INT8_MAX_ACCURACY_LOSS_POINTS, INT8_MIN_TOP1_AGREEMENT
from cifar_assets.resources import MLflowResource
from cifar_assets.settings import get_settings


class ExportConfig(dg.Config):
    parity_images: int = Field(default=256, description="Held-out images for the parity check.")
    parity_min_top1_agreement: float = Field(
        default=PARITY_MIN_AGREEMENT,
        ge=0,
        le=1,
        description="Fail the export when ONNX and PyTorch agree on fewer images than this.",
    )
    parity_atol: float = Field(
        default=PARITY_ATOL,
        ge=0,
        le=1,
        description="Logit difference always allowed between ONNX and PyTorch (the floor).",
    )
    parity_rtol: float = Field(
        default=PARITY_RTOL,
        ge=0,
        le=1,
        description="Allowed logit difference as a share of the largest |logit|; the limit is "
        "max(parity_atol, parity_rtol * max |logit|).",
    )
    quantize: bool = Field(default=True, description="Also build a static INT8 model.")
    calibration_images: int = Field(default=256, description="Training images for calibration.")
    int8_tolerance_points: float = Field(
        default=INT8_MAX_ACCURACY_LOSS_POINTS,
        ge=0,
        description="Keep INT8 only if it loses at most this many accuracy points.",
    )
    int8_min_top1_agreement: float = Field(
        default=INT8_MIN_TOP1_AGREEMENT,
        ge=0,
        le=1,
        description="Keep INT8 only if it predicts the FP32 class on at least this share of the "
        "test images.",
    )


@dg.asset(
    group_name=TRAINING_GROUP,
    kinds={"onnx", "mlflow"},
    owners=["team:ml-platform"],
    code_version="4",
    description="ONNX export (dynamic batch) checked against PyTorch, plus a static QDQ INT8 model "
    "kept only within its accuracy and agreement limits.",
)
def onnx_model(
    context: dg.AssetExecutionContext,
    config: ExportConfig,
    mlflow: MLflowResource,
    trained_model: TrainedModel,
    registered_model: RegisteredModel,
    cifar10_splits: Splits,
) -> dg.Output[OnnxModel]:
    from cifar_assets.ml import registry, tracking
    from cifar_assets.ml.export import ExportLimits, export_checked

    limits = ExportLimits(**config.model_dump())
    run_id = trained_model.mlflow_run_id
    try:
        # Before the gates, so that a failed export also shows the limits it failed against.
        params = {f"onnx_{k}": v for k, v in limits.as_params().items()}
        tracking.log_params(mlflow.uri(), run_id, params)
    except ValueError as exc:
        context.log.warning(f"{exc} The limits of this export are in the asset's metadata instead.")
    exported = export_checked(
        Path(trained_model.model_dir),
        cifar10_splits,
        get_settings().asset_files("onnx_model", run_id),
        limits,
        log=context.log.info,
        warn=context.log.warning,
    )
    files = [p for p in (exported.fp32_path, exported.int8_path) if p]
    registry.log_onnx_artifacts(mlflow.uri(), run_id, files)
    report = exported.report
    return versioned_output(
        OnnxModel(
            fp32_path=str(exported.fp32_path),
            int8_path=str(exported.int8_path) if exported.int8_path else None,
            registered_version=registered_model.version,
            report=report,
        ),
        metadata={
            "fp32_path": dg.MetadataValue.path(str(exported.fp32_path)),
            "int8_kept": exported.int8_path is not None,
            **{k: v for k, v in report.items() if isinstance(v, int | float | str)},
            **{f"limit_{k}": v for k, v in limits.as_params().items()},
        },
    )
