"""Export stage: ``onnx_model``, FP32 ONNX with a parity check, and a static INT8 model kept
only within the accuracy tolerance; both logged to the registered version's MLflow run."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from cifar_assets.artifacts import OnnxModel, RegisteredModel, TrainedModel
from cifar_assets.assets.training_assets import TRAINING_GROUP
from cifar_assets.data.imageset import Splits
from cifar_assets.resources import MLflowResource


class ExportConfig(dg.Config):
    parity_images: int = Field(default=256, description="Held-out images for the parity check.")
    min_top1_agreement: float = Field(default=0.999, description="Fail below this agreement.")
    quantize: bool = Field(default=True, description="Also build a static INT8 model.")
    calibration_images: int = Field(default=256, description="Training images for calibration.")
    int8_tolerance_points: float = Field(
        default=1.0, description="Keep INT8 only if it loses at most this many accuracy points."
    )


@dg.asset(
    group_name=TRAINING_GROUP,
    kinds={"onnx", "mlflow"},
    owners=["team:ml-platform"],
    code_version="1",
    description="ONNX export (dynamic batch) checked against PyTorch, plus a static QDQ INT8 model.",
)
def onnx_model(
    context: dg.AssetExecutionContext,
    config: ExportConfig,
    mlflow: MLflowResource,
    trained_model: TrainedModel,
    registered_model: RegisteredModel,
    cifar10_splits: Splits,
) -> dg.Output[OnnxModel]:
    from cifar_assets.ml import registry
    from cifar_assets.ml.model import load_model
    from cifar_assets.ml.onnx_export import check_parity, export_onnx, require_parity
    from cifar_assets.ml.quantization import compare_int8, quantize_int8

    model = load_model(Path(trained_model.model_dir))
    out_dir = Path(trained_model.model_dir) / "onnx"
    fp32 = export_onnx(model, out_dir / "model.onnx")
    held_out = cifar10_splits.validation.images[: config.parity_images]
    parity = check_parity(model, fp32, held_out)
    context.log.info(
        f"Parity: top-1 agreement {parity.top1_agreement:.4f}, max |diff| {parity.max_abs_diff:.2e}"
    )
    require_parity(parity, min_agreement=config.min_top1_agreement)
    report: dict[str, object] = {
        "top1_agreement": parity.top1_agreement,
        "max_abs_diff": parity.max_abs_diff,
    }
    int8_path: Path | None = None
    if config.quantize:
        candidate = quantize_int8(
            fp32,
            out_dir / "model.int8.onnx",
            cifar10_splits.train.images[: config.calibration_images],
        )
        test = cifar10_splits.test
        quant = compare_int8(fp32, candidate, test.images, test.labels)
        report |= {f"int8_{k}": v for k, v in vars(quant).items()}
        lost_points = -quant.accuracy_delta_points
        if lost_points <= config.int8_tolerance_points:
            int8_path = candidate
        else:
            context.log.warning(
                f"INT8 lost {lost_points:.2f} points (tolerance "
                f"{config.int8_tolerance_points}); keeping FP32 only."
            )
            candidate.unlink()
    registry.log_onnx_artifacts(
        mlflow.uri(), trained_model.mlflow_run_id, [p for p in (fp32, int8_path) if p]
    )
    return dg.Output(
        OnnxModel(
            fp32_path=str(fp32),
            int8_path=str(int8_path) if int8_path else None,
            registered_version=registered_model.version,
            report=report,
        ),
        metadata={
            "fp32_path": dg.MetadataValue.path(str(fp32)),
            "int8_kept": int8_path is not None,
            **{k: v for k, v in report.items() if isinstance(v, int | float)},
        },
    )
