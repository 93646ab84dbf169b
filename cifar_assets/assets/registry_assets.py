"""Registry stage: ``registered_model``, a version of ``cifar10-resnet18`` in the MLflow registry,
alias ``challenger``, promoted to ``champion`` only through the gate."""

import dagster as dg
from pydantic import Field

from cifar_assets.artifacts import ModelEvaluation, RegisteredModel, TrainedModel
from cifar_assets.assets.metadata import versioned_output
from cifar_assets.assets.training_assets import TRAINING_GROUP
from cifar_assets.resources import MLflowResource


class RegistrationConfig(dg.Config):
    promote_automatically: bool = Field(
        default=True,
        description="Let the gate make the new version champion; retraining runs turn this off "
        "so a challenger earns promotion through the A/B test instead.",
    )
    gate_metric: str = Field(default="accuracy", description="Test metric the gate compares.")
    promotion_margin: float = Field(
        default=0.005,
        description="How much the new model must beat the champion by (absolute, e.g. 0.005 = "
        "half a point of accuracy) to become champion automatically.",
    )


@dg.asset(
    group_name=TRAINING_GROUP,
    kinds={"mlflow"},
    owners=["team:ml-platform"],
    code_version="1",
    description="The trained model as a new MLflow registry version, with the gate's decision: "
    "champion when there is none or when it beats the champion by the configured margin, "
    "challenger otherwise. The alias itself moves when triton_deployment has checked the "
    "version in Triton, so MLflow never names a version that cannot serve.",
)
def registered_model(
    context: dg.AssetExecutionContext,
    config: RegistrationConfig,
    mlflow: MLflowResource,
    trained_model: TrainedModel,
    model_evaluation: ModelEvaluation,
) -> dg.Output[RegisteredModel]:
    from pathlib import Path

    from cifar_assets.ml import tracking

    models = mlflow.registry()
    version = models.register(
        run_id=trained_model.mlflow_run_id,
        model_dir=Path(trained_model.model_dir),
        metrics=model_evaluation.metrics,
        data_version=trained_model.data_version,
        description=f"ResNet18 ({trained_model.stem} stem), {trained_model.epochs} epochs, "
        f"Dagster run {context.run_id}",
        tags={"dagster_run_id": context.run_id},
        alias=None,
    )
    if config.promote_automatically:
        # The champion was re-evaluated on this run's test split: the gate compares like with like.
        decision = models.gate(
            version.version,
            metric=config.gate_metric,
            margin=config.promotion_margin,
            champion_metrics=model_evaluation.champion_metrics,
            apply=False,
        )
    else:
        decision = models.hold_as_challenger(
            version.version, reason="retraining run: stays challenger until the A/B test decides"
        )
    context.log.info(f"Version {version.version}: {decision.reason}")
    return versioned_output(
        RegisteredModel(
            name=models.name,
            version=int(version.version),
            mlflow_run_id=trained_model.mlflow_run_id,
            is_champion=decision.promote,
            decision_reason=decision.reason,
            metrics=model_evaluation.metrics,
        ),
        metadata={
            "model_name": models.name,
            "version": int(version.version),
            "role": "champion" if decision.promote else "challenger",
            "decision": decision.reason,
            "mlflow_run": dg.MetadataValue.url(
                tracking.run_url(mlflow.uri(), trained_model.mlflow_run_id)
            ),
        },
    )
