"""The ``onnx_model`` stage without Dagster: export to ONNX, gate on parity with PyTorch, and
quantize to INT8 where the INT8 model stays within its accuracy and agreement limits.

The files go to their own folder (``out_dir``), never into the trained model's. A rejected INT8
model is a normal outcome, not a failure: FP32 is still exported and served, and no INT8 file is
left behind for anything to pick up by mistake.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar_assets.data.imageset import Splits
from cifar_assets.ml.onnx_export import PARITY_ATOL, PARITY_MIN_AGREEMENT, PARITY_RTOL
from cifar_assets.ml.quantization import INT8_MAX_ACCURACY_LOSS_POINTS, INT8_MIN_TOP1_AGREEMENT


@dataclass(frozen=True)
class ExportLimits:
    parity_images: int = 256
    parity_min_top1_agreement: float = PARITY_MIN_AGREEMENT
    parity_atol: float = PARITY_ATOL
    parity_rtol: float = PARITY_RTOL
    quantize: bool = True
    calibration_images: int = 256
    int8_tolerance_points: float = INT8_MAX_ACCURACY_LOSS_POINTS
    int8_min_top1_agreement: float = INT8_MIN_TOP1_AGREEMENT

    def as_params(self) -> dict[str, float]:
        """The limits this export is judged against (MLflow params ``onnx_<name>``)."""
        limits = {
            "parity_min_top1_agreement": self.parity_min_top1_agreement,
            "parity_atol": self.parity_atol,
            "parity_rtol": self.parity_rtol,
        }
        if self.quantize:
            limits |= {
                "int8_tolerance_points": self.int8_tolerance_points,
                "int8_min_top1_agreement": self.int8_min_top1_agreement,
            }
        return limits


@dataclass(frozen=True)
class ExportResult:
    fp32_path: Path
    int8_path: Path | None
    report: dict[str, Any] = field(default_factory=dict)


def export_checked(
    model_dir: Path,
    splits: Splits,
    out_dir: Path,
    limits: ExportLimits,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
) -> ExportResult:
    """Export the model in ``model_dir`` to ``out_dir/model.onnx``; raise a ParityError when the
    ONNX model disagrees with PyTorch beyond ``limits`` on validation images; then (when asked)
    quantize with training images and keep ``model.int8.onnx`` only within the INT8 limits on
    the test split. The report holds every figure either gate looked at."""
    from cifar_assets.ml.model import load_model
    from cifar_assets.ml.onnx_export import check_parity, export_onnx, require_parity
    from cifar_assets.ml.quantization import compare_int8, int8_verdict, quantize_int8

    model = load_model(model_dir)
    fp32 = export_onnx(model, out_dir / "model.onnx")
    parity = check_parity(model, fp32, splits.validation.images[: limits.parity_images])
    log(
        f"Parity: top-1 agreement {parity.top1_agreement:.4f}, max |diff| "
        f"{parity.max_abs_diff:.2e}, max |logit| {parity.max_abs_logit:.3g}"
    )
    allowed_abs_diff = require_parity(
        parity,
        min_agreement=limits.parity_min_top1_agreement,
        atol=limits.parity_atol,
        rtol=limits.parity_rtol,
    )
    report: dict[str, Any] = {
        "top1_agreement": parity.top1_agreement,
        "max_abs_diff": parity.max_abs_diff,
        "max_abs_logit": parity.max_abs_logit,
        "allowed_abs_diff": allowed_abs_diff,
    }
    if not limits.quantize:
        return ExportResult(fp32, None, report)
    candidate = quantize_int8(
        fp32, out_dir / "model.int8.onnx", splits.train.images[: limits.calibration_images]
    )
    quant = compare_int8(fp32, candidate, splits.test.images, splits.test.labels)
    report |= {f"int8_{k}": v for k, v in vars(quant).items()}
    verdict = int8_verdict(
        quant,
        max_accuracy_loss_points=limits.int8_tolerance_points,
        min_top1_agreement=limits.int8_min_top1_agreement,
    )
    if verdict.keep:
        log(verdict.message(candidate))
        return ExportResult(fp32, candidate, report)
    warn(verdict.message(candidate))
    report["int8_rejected_because"] = "; ".join(verdict.reasons)
    candidate.unlink()
    return ExportResult(fp32, None, report)
