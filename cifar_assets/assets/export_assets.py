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


def _limits(config: ExportConfig) -> dict[str, float]:
    limits = {
        "parity_min_top1_agreement": config.parity_min_top1_agreement,
        "parity_atol": config.parity_atol,
        "parity_rtol": config.parity_rtol,
    }
    if config.quantize:
        limits |= {
            "int8_tolerance_points": config.int8_tolerance_points,
            "int8_min_top1_agreement": config.int8_min_top1_agreement,
        }
    return limits


@dg.asset(
    group_name=TRAINING_GROUP,
    kinds={"onnx", "mlflow"},
    owners=["team:ml-platform"],
    code_version="3",
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
    from cifar_assets.ml.model import load_model
    from cifar_assets.ml.onnx_export import check_parity, export_onnx, require_parity
    from cifar_assets.ml.quantization import compare_int8, int8_verdict, quantize_int8

    limits = _limits(config)
    try:
        # Before the gates, so that a failed export also shows the limits it failed against.
        tracking.log_params(
            mlflow.uri(), trained_model.mlflow_run_id, {f"onnx_{k}": v for k, v in limits.items()}
        )
    except ValueError as exc:
        context.log.warning(
            f"{exc} The limits of this export are in the onnx_model asset's metadata instead."
        )

    model = load_model(Path(trained_model.model_dir))
    out_dir = Path(trained_model.model_dir) / "onnx"
    fp32 = export_onnx(model, out_dir / "model.onnx")
    held_out = cifar10_splits.validation.images[: config.parity_images]
    parity = check_parity(model, fp32, held_out)
    context.log.info(
        f"Parity: top-1 agreement {parity.top1_agreement:.4f}, max |diff| "
        f"{parity.max_abs_diff:.2e}, max |logit| {parity.max_abs_logit:.3g}"
    )
    allowed_abs_diff = require_parity(
        parity,
        min_agreement=config.parity_min_top1_agreement,
        atol=config.parity_atol,
        rtol=config.parity_rtol,
    )
    report: dict[str, object] = {
        "top1_agreement": parity.top1_agreement,
        "max_abs_diff": parity.max_abs_diff,
        "max_abs_logit": parity.max_abs_logit,
        "allowed_abs_diff": allowed_abs_diff,
    }
    int8_path: Path | None = None
    int8_rejected_because = ""
    if config.quantize:
        candidate = quantize_int8(
            fp32,
            out_dir / "model.int8.onnx",
            cifar10_splits.train.images[: config.calibration_images],
        )
        test = cifar10_splits.test
        quant = compare_int8(fp32, candidate, test.images, test.labels)
        report |= {f"int8_{k}": v for k, v in vars(quant).items()}
        verdict = int8_verdict(
            quant,
            max_accuracy_loss_points=config.int8_tolerance_points,
            min_top1_agreement=config.int8_min_top1_agreement,
        )
        if verdict.keep:
            int8_path = candidate
            context.log.info(verdict.message(candidate))
        else:
            # A rejected INT8 model is a normal outcome, not a failure: FP32 is still exported
            # and served, and no INT8 file is left for anything to pick up by mistake.
            context.log.warning(verdict.message(candidate))
            int8_rejected_because = "; ".join(verdict.reasons)
            report["int8_rejected_because"] = int8_rejected_because
            candidate.unlink()
    registry.log_onnx_artifacts(
        mlflow.uri(), trained_model.mlflow_run_id, [p for p in (fp32, int8_path) if p]
    )
    return versioned_output(
        OnnxModel(
            fp32_path=str(fp32),
            int8_path=str(int8_path) if int8_path else None,
            registered_version=registered_model.version,
            report=report,
        ),
        metadata={
            "fp32_path": dg.MetadataValue.path(str(fp32)),
            "int8_kept": int8_path is not None,
            **{k: v for k, v in report.items() if isinstance(v, int | float | str)},
            **{f"limit_{k}": v for k, v in limits.items()},
        },
    )
