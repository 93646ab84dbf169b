"""The deployment stage behind the ``triton_deployment`` asset: the registered version's ONNX file
becomes version N of ``cifar10_resnet18`` in Triton (N = the MLflow model version), is compared
with ONNX Runtime, and only then gets the alias the registry's gate decided and its traffic,
through :class:`cifar_assets.serving.rollout.Rollout`. A failed load or check leaves the aliases,
the serving versions and the weights as they were."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cifar_assets.artifacts import RegisteredModel, TritonDeployment

if TYPE_CHECKING:
    import numpy as np

    from cifar_assets.serving.launcher import TritonConfig
    from cifar_assets.serving.rollout import Role, Rollout, RolloutPlan, Transition


@dataclass(frozen=True)
class Deployment:
    record: TritonDeployment
    role: Role
    transition: Transition
    served_file: Path
    precision: str


def deploy_registered(
    rollout: Rollout,
    server: TritonConfig,
    registered: RegisteredModel,
    served_file: Path,
    precision: str,
    check_images: np.ndarray,
    *,
    max_abs_diff: float,
    max_rel_diff: float,
    actor: str,
    challenger_share: float | None = None,
    plan: RolloutPlan | None = None,
) -> Deployment:
    """Write ``served_file`` as the version's folder, then deploy it in the role the gate gave
    it; the check compares Triton's logits with ONNX Runtime's on ``check_images``."""
    from cifar_assets.serving import repository
    from cifar_assets.serving.verify import compare_with_onnxruntime

    version = registered.version
    origin = {"onnx": str(served_file), "precision": precision}
    repository.write_version(server.repo, served_file, version, origin)
    role: Role = "champion" if registered.is_champion else "challenger"
    transition = rollout.deploy(
        version,
        role,
        lambda: compare_with_onnxruntime(
            server.http_url, version, served_file, check_images, max_abs_diff, max_rel_diff
        ),
        reason=registered.decision_reason,
        actor=actor,
        challenger_share=challenger_share,
        plan=plan,
    )
    record = TritonDeployment(
        model_name=repository.MODEL_NAME,
        version=version,
        live_versions=transition.after["live_versions"],
        http_url=f"http://{server.http_url}",
        grpc_url=server.grpc_url,
    )
    return Deployment(record, role, transition, served_file, precision)
