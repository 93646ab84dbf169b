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
    from cifar_assets.ml import tracking
    from cifar_assets.ml.registration import register_candidate

    registered = register_candidate(
        mlflow.registry(),
        trained_model,
        model_evaluation,
        dagster_run_id=context.run_id,
        gate_metric=config.gate_metric if config.promote_automatically else None,
        margin=config.promotion_margin,
    )
    context.log.info(f"Version {registered.version}: {registered.decision_reason}")
    run_url = tracking.run_url(mlflow.uri(), trained_model.mlflow_run_id)
    return versioned_output(
        registered,
        metadata={
            "model_name": registered.name,
            "version": registered.version,
            "role": "champion" if registered.is_champion else "challenger",
            "decision": registered.decision_reason,
            "mlflow_run": dg.MetadataValue.url(run_url),
        },
    )
