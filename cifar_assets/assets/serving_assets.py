"""Serving stage: ``triton_deployment``, the registered model's ONNX file as version N of
``cifar10_resnet18`` in Triton (N = the MLflow model version), checked before it gets traffic."""

from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from cifar_assets.artifacts import OnnxModel, TritonDeployment
from cifar_assets.data.imageset import Splits
from cifar_assets.resources import TritonResource

SERVING_GROUP = "serving"


class DeploymentConfig(dg.Config):
    role: Literal["champion", "challenger"] = Field(
        default="champion",
        description="champion: the new version takes all traffic once it passes the check; "
        "challenger: it serves beside the champion with challenger_share of the router's traffic.",
    )
    challenger_share: float = Field(default=0.1, description="Router traffic for a challenger.")
    use_int8: bool = Field(
        default=False,
        description="Serve the INT8 model when onnx_model kept one; when its gate rejected INT8 "
        "(or quantize was off) FP32 is served, with a warning and served_precision=fp32.",
    )
    check_images: int = Field(
        default=64, ge=1, description="Test images compared with ONNX Runtime."
    )
    max_abs_diff: float = Field(
        default=1e-3,
        ge=0,
        description="Floor of the allowed logit difference between Triton and ONNX Runtime.",
    )
    max_rel_diff: float = Field(
        default=1e-4,
        ge=0,
        description="Allowed logit difference as a share of the largest |logit| on the check "
        "images; the limit is max(max_abs_diff, max_rel_diff * max |logit|).",
    )


@dg.asset(
    group_name=SERVING_GROUP,
    kinds={"triton", "onnx"},
    owners=["team:ml-platform"],
    code_version="2",
    description="Version N of cifar10_resnet18 loaded in Triton, checked against ONNX Runtime, "
    "then given its share of the cifar10_ab router's traffic. A failed load or check leaves the "
    "serving versions and weights as they were.",
)
def triton_deployment(
    context: dg.AssetExecutionContext,
    config: DeploymentConfig,
    triton: TritonResource,
    onnx_model: OnnxModel,
    cifar10_splits: Splits,
) -> dg.Output[TritonDeployment]:
    import numpy as np

    from cifar_assets.ml.onnx_export import ort_session, run_onnx
    from cifar_assets.serving import repository
    from cifar_assets.serving.client import infer

    server = triton.ensure_running(context.log)
    repo, state_dir = server.config.repo, server.config.state_dir
    version = onnx_model.registered_version
    int8_path = onnx_model.int8_path if config.use_int8 else None
    precision = "int8" if int8_path else "fp32"
    if config.use_int8 and precision == "fp32":
        why = onnx_model.report.get("int8_rejected_because") or (
            "onnx_model made none: its quantize option was off"
        )
        context.log.warning(
            f"use_int8 is set, but version {version} has no INT8 model ({why}); serving FP32. "
            "See the onnx_model asset's int8_* metadata."
        )
    onnx_path = Path(int8_path or onnx_model.fp32_path)
    repository.write_version(
        repo,
        onnx_path,
        version,
        {"onnx": str(onnx_path), "role": config.role, "precision": precision},
    )
    previous_live = repository.read_live_versions(state_dir)
    previous_weights = repository.read_ab_weights(state_dir)
    url = server.config.http_url
    try:
        repository.set_live_versions(
            url, sorted({*previous_live, version}), repo=repo, state_dir=state_dir
        )
        images = cifar10_splits.test.images[: config.check_images]
        served = infer(images, url=url, protocol="http", version=version)
        expected = run_onnx(ort_session(onnx_path), images)
        difference = float(np.abs(served - expected).max())
        # Same file, same runtime: only float rounding may differ, and it scales with the logits.
        allowed = max(config.max_abs_diff, config.max_rel_diff * float(np.abs(expected).max()))
        if difference > allowed:
            raise dg.Failure(
                f"Triton version {version} differs from ONNX Runtime on {len(images)} test images "
                f"by up to {difference:.2e} (allowed {allowed:.2e} = max(max_abs_diff, "
                "max_rel_diff * max |logit|)); it gets no traffic. The server log "
                "(var/triton/tritonserver.log) shows what the version loaded."
            )
    except Exception:
        # Back to exactly what served before: the new version never received router traffic.
        if previous_live:
            repository.set_live_versions(url, previous_live, repo=repo, state_dir=state_dir)
        raise
    context.log.info(f"Version {version} matches ONNX Runtime (max |diff| {difference:.2e})")

    champion = (
        max(previous_weights, key=lambda v: previous_weights[v]) if previous_weights else None
    )
    if config.role == "challenger" and champion is not None and champion != version:
        weights = {champion: 1.0 - config.challenger_share, version: config.challenger_share}
        live = sorted({champion, version})
    else:
        weights, live = {version: 1.0}, [version]
    repository.set_ab_weights(weights, state_dir=state_dir)
    # Versions that lost their traffic leave only after the weights moved away from them.
    repository.set_live_versions(url, live, repo=repo, state_dir=state_dir)
    deployment = TritonDeployment(
        model_name=repository.MODEL_NAME,
        version=version,
        live_versions=live,
        http_url=f"http://{url}",
        grpc_url=server.config.grpc_url,
    )
    return dg.Output(
        deployment,
        metadata={
            "version": version,
            "role": config.role,
            "live_versions": dg.MetadataValue.json(live),
            "router_weights": dg.MetadataValue.json({str(v): w for v, w in weights.items()}),
            "max_abs_diff_vs_onnxruntime": difference,
            "allowed_abs_diff": allowed,
            "served_precision": precision,
            "served_file": dg.MetadataValue.path(str(onnx_path)),
            "http_url": dg.MetadataValue.url(
                f"http://{url}/v2/models/{repository.MODEL_NAME}/versions/{version}"
            ),
            "grpc_url": server.config.grpc_url,
        },
    )
