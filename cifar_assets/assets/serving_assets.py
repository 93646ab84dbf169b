"""Serving stage: ``triton_deployment``, the registered model's ONNX file as version N of
``cifar10_resnet18`` in Triton (N = the MLflow model version), checked before it gets traffic,
and the check that serving follows the registry. Every move of aliases and traffic goes through
:mod:`cifar_assets.serving.rollout`."""

from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from cifar_assets.artifacts import OnnxModel, RegisteredModel, TritonDeployment
from cifar_assets.assets.metadata import versioned_output
from cifar_assets.data.imageset import Splits
from cifar_assets.resources import MLflowResource, TritonResource, rollout_for

if TYPE_CHECKING:
    from cifar_assets.serving.deployment import Deployment
    from cifar_assets.serving.rollout import RolloutPlan

SERVING_GROUP = "serving"


class DeploymentConfig(dg.Config):
    challenger_share: float = Field(
        default=0.1,
        gt=0,
        lt=0.5,
        description="Router traffic for a challenger (the gate kept the champion); the "
        "champion keeps the rest.",
    )
    staged_rollout: bool = Field(
        default=False,
        description="Roll a challenger out in stages instead of a fixed share: shadow (it "
        "answers mirrored requests that nobody sees), then each canary step, then promotion; "
        "every stage is judged by gates on the captured traffic, a failed gate rolls it back, "
        "and rollout_sensor advances it.",
    )
    shadow_requests: int = Field(
        default=200, ge=0, description="Mirrored requests the shadow stage needs (0: none)."
    )
    canary_steps: list[float] = Field(
        default=[0.05, 0.25, 0.5],
        description="Canary weights of the challenger, in order, each judged before the next.",
    )
    min_requests_per_step: int = Field(
        default=100, ge=1, description="Challenger requests a canary stage needs to be judged."
    )
    max_error_rate: float = Field(default=0.01, ge=0, le=1, description="Gate: error rate.")
    max_p95_latency_ratio: float = Field(
        default=1.5, gt=0, description="Gate: challenger p95 / champion p95."
    )
    min_shadow_agreement: float = Field(
        default=0.8, ge=0, le=1, description="Gate: top-1 agreement with the champion in shadow."
    )
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
    code_version="3",
    description="Version N of cifar10_resnet18 loaded in Triton and checked against ONNX Runtime; "
    "only then does MLflow give it the alias the registry's gate decided (champion or "
    "challenger) and the router the matching traffic. A failed load or check leaves the "
    "aliases, serving versions and weights as they were.",
)
def triton_deployment(
    context: dg.AssetExecutionContext,
    config: DeploymentConfig,
    mlflow: MLflowResource,
    triton: TritonResource,
    registered_model: RegisteredModel,
    onnx_model: OnnxModel,
    cifar10_splits: Splits,
) -> dg.Output[TritonDeployment]:
    from cifar_assets.serving.deployment import deploy_registered

    server = triton.ensure_running(context.log)
    rollout = rollout_for(mlflow, server.config)
    deployed = deploy_registered(
        rollout,
        server.config,
        registered_model,
        *_served_file(context, config, onnx_model),
        cifar10_splits.test.images[: config.check_images],
        max_abs_diff=config.max_abs_diff,
        max_rel_diff=config.max_rel_diff,
        actor=f"dagster run {context.run_id}",
        challenger_share=config.challenger_share,
        plan=_plan(config),
    )
    after = deployed.transition.after
    context.log.info(f"v{deployed.record.version} serves as {deployed.role}: {after['weights']}")
    return versioned_output(deployed.record, metadata=_metadata(deployed, rollout.journal_path))


def _metadata(deployed: "Deployment", journal: Path) -> dict[str, Any]:
    record, after = deployed.record, deployed.transition.after
    return {
        "version": record.version,
        "role": deployed.role,
        "champion": after["champion"] or 0,
        "challenger": after["challenger"] or 0,
        "live_versions": dg.MetadataValue.json(after["live_versions"]),
        "router_weights": dg.MetadataValue.json(after["weights"]),
        **deployed.transition.evidence,
        "served_precision": deployed.precision,
        "served_file": dg.MetadataValue.path(str(deployed.served_file)),
        "stage": after["stage"] or "none",
        "rollout_journal": dg.MetadataValue.path(str(journal)),
        "http_url": dg.MetadataValue.url(
            f"{record.http_url}/v2/models/{record.model_name}/versions/{record.version}"
        ),
        "grpc_url": record.grpc_url,
    }


def _plan(config: DeploymentConfig) -> "RolloutPlan | None":
    from cifar_assets.serving.rollout import RolloutPlan

    if not config.staged_rollout:
        return None
    return RolloutPlan(
        shadow_requests=config.shadow_requests,
        steps=tuple(config.canary_steps),
        min_requests=config.min_requests_per_step,
        max_error_rate=config.max_error_rate,
        max_p95_latency_ratio=config.max_p95_latency_ratio,
        min_shadow_agreement=config.min_shadow_agreement,
    )


def _served_file(
    context: dg.AssetExecutionContext, config: DeploymentConfig, onnx_model: OnnxModel
) -> tuple[Path, str]:
    """The ONNX file to serve and its precision; INT8 only when asked for and kept."""
    int8_path = onnx_model.int8_path if config.use_int8 else None
    if config.use_int8 and not int8_path:
        why = onnx_model.report.get("int8_rejected_because") or (
            "onnx_model made none: its quantize option was off"
        )
        context.log.warning(
            f"use_int8 is set, but version {onnx_model.registered_version} has no INT8 model "
            f"({why}); serving FP32. See the onnx_model asset's int8_* metadata."
        )
    return Path(int8_path or onnx_model.fp32_path), "int8" if int8_path else "fp32"


@dg.asset_check(
    asset=triton_deployment,
    blocking=True,
    description="MLflow decides, serving follows: the version with the most router traffic is "
    "MLflow's champion, every version with weight is live and answers in the running Triton, "
    "and no version without an alias gets traffic.",
)
def serving_follows_registry(mlflow: MLflowResource, triton: TritonResource) -> dg.AssetCheckResult:
    server = triton.server_config()
    rollout = rollout_for(mlflow, server)
    problems = rollout.check(server_ready=rollout.server_ready)
    state = rollout.state()
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or "MLflow, the router and Triton agree.",
        metadata={
            "champion": state.champion or 0,
            "challenger": state.challenger or 0,
            "live_versions": dg.MetadataValue.json(state.live_versions),
            "router_weights": dg.MetadataValue.json(state.to_dict()["weights"]),
            "problems": dg.MetadataValue.json(problems),
        },
    )
