"""The check a version passes before it gets traffic: Triton's answers against ONNX Runtime's on
the same file and images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class VerificationError(RuntimeError):
    """Triton's answers for a version differ from ONNX Runtime's beyond the allowed limit."""


def compare_with_onnxruntime(
    triton_url: str,
    version: int,
    onnx_path: Path,
    images: np.ndarray,
    max_abs_diff: float,
    max_rel_diff: float,
) -> dict[str, Any]:
    """Send ``images`` to version ``version`` in Triton and run ``onnx_path`` in ONNX Runtime;
    raise VerificationError when the logits differ by more than
    max(max_abs_diff, max_rel_diff * max |logit|). Returns the figures as evidence."""
    from cifar_assets.ml.onnx_export import ort_session, run_onnx
    from cifar_assets.serving.client import infer

    served = infer(images, url=triton_url, protocol="http", version=version)
    expected = run_onnx(ort_session(onnx_path), images)
    difference = float(np.abs(served - expected).max())
    # Same file, same runtime: only float rounding may differ, and it scales with the logits.
    allowed = max(max_abs_diff, max_rel_diff * float(np.abs(expected).max()))
    if not difference <= allowed:
        raise VerificationError(
            f"Triton version {version} differs from ONNX Runtime on {len(images)} test images "
            f"by up to {difference:.2e} (allowed {allowed:.2e} = max(max_abs_diff, "
            "max_rel_diff * max |logit|)); it gets no traffic. The server log "
            "(var/triton/tritonserver.log) shows what the version loaded."
        )
    return {
        "check_images": len(images),
        "max_abs_diff_vs_onnxruntime": difference,
        "allowed_abs_diff": allowed,
    }
