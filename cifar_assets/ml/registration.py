"""The registration stage behind the ``registered_model`` asset: the trained model becomes a new
registry version, and the gate's decision (champion or challenger) is recorded on it.

No alias moves here: ``triton_deployment`` gives the version the alias the gate decided once
Triton serves it, so MLflow never names a version that cannot serve."""

from __future__ import annotations

from pathlib import Path

from cifar_assets.artifacts import ModelEvaluation, RegisteredModel, TrainedModel
from cifar_assets.ml.registry import Registry

HELD_FOR_AB_TEST = "retraining run: stays challenger until the A/B test decides"


def register_candidate(
    models: Registry,
    trained: TrainedModel,
    evaluation: ModelEvaluation,
    *,
    dagster_run_id: str,
    gate_metric: str | None,
    margin: float = 0.0,
) -> RegisteredModel:
    """Register ``trained`` with ``evaluation``'s metrics and decide its role: with a
    ``gate_metric`` the gate compares it with the champion (re-measured on the same test split);
    without one it stays challenger until the A/B test decides."""
    version = models.register(
        trained.mlflow_run_id,
        Path(trained.model_dir),
        evaluation.metrics,
        trained.data_version,
        description=f"ResNet18 ({trained.stem} stem), {trained.epochs} epochs, "
        f"Dagster run {dagster_run_id}",
        tags={"dagster_run_id": dagster_run_id},
        alias=None,
    ).version
    if gate_metric is not None:
        decision = models.gate(
            version,
            gate_metric,
            margin,
            champion_metrics=evaluation.champion_metrics,
            apply=False,
        )
    else:
        decision = models.hold_as_challenger(version, HELD_FOR_AB_TEST)
    return RegisteredModel(
        name=models.name,
        version=version,
        mlflow_run_id=trained.mlflow_run_id,
        is_champion=decision.promote,
        decision_reason=decision.reason,
        metrics=evaluation.metrics,
    )
