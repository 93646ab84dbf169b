"""Training stage: ``trained_model`` (one MLflow run per training) and ``model_evaluation``."""

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

import dagster as dg
from pydantic import Field, create_model

from cifar_assets.artifacts import ModelEvaluation, TrainedModel
from cifar_assets.assets.metadata import image, input_version_tags, table, versioned_output
from cifar_assets.assets.validation_assets import validation_report
from cifar_assets.data.imageset import Splits
from cifar_assets.ml.training import TrainConfig
from cifar_assets.resources import MLflowResource
from cifar_assets.settings import get_settings

TRAINING_GROUP = "training"


def _dagster_config(source: type) -> type[dg.Config]:
    """The Dagster config class of a hyperparameter dataclass: the same fields, types, defaults
    and descriptions, so a new hyperparameter is one edit in TrainConfig."""
    hints = get_type_hints(source)
    fields_ = {
        f.name: (hints[f.name], Field(default=f.default, description=f.metadata["doc"]))
        for f in dataclasses.fields(source)
    }
    return create_model(  # type: ignore[call-overload]
        "TrainingConfig",
        __base__=dg.Config,
        __doc__="Hyperparameters; the defaults are a GPU recipe for the full CIFAR-10 "
        "(see cifar_assets.ml.training.TrainConfig).",
        __module__=__name__,
        **fields_,
    )


if TYPE_CHECKING:  # to the type checker it is a Config; Dagster reads the generated fields
    TrainingConfig = dg.Config
else:
    TrainingConfig = _dagster_config(TrainConfig)


def _run_tags(context: dg.AssetExecutionContext) -> dict[str, str]:
    return {
        "dagster_run_id": context.run_id,
        "dagster_asset_key": context.asset_key.to_user_string(),
        "dagster_job": context.job_name or "",
    }


@dg.asset(
    group_name=TRAINING_GROUP,
    kinds={"pytorch", "mlflow"},
    owners=["team:ml-platform"],
    code_version="1",
    deps=[validation_report],
    description="ResNet18 trained on the train split (safetensors weights + architecture), with "
    "one MLflow run holding its parameters, per-epoch metrics and curves.",
)
def trained_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    mlflow: MLflowResource,
    cifar10_splits: Splits,
) -> dg.Output[TrainedModel]:
    from cifar_assets.ml import tracking
    from cifar_assets.ml.training_run import train_tracked

    # A training killed with SIGKILL (even under `dagster job execute`, without the daemon) left
    # its MLflow run RUNNING: end it now, with the reason.
    mlflow.end_orphaned_runs(context.instance, context.log)
    train_config = TrainConfig(**config.model_dump())
    data_version = cifar10_splits.fingerprint()
    started = time.monotonic()
    run = train_tracked(
        cifar10_splits,
        train_config,
        tracking_uri=mlflow.uri(),
        experiment=mlflow.experiment(),
        run_name=f"train-{context.run_id[:8]}",
        tags=_run_tags(context)
        | {"data_version": data_version}
        | input_version_tags(cifar10_splits=cifar10_splits),
        artifact_location=mlflow.artifact_location(),
        work_root=get_settings().asset_files("trained_model"),
        model_folder=f"run-{context.run_id[:8]}",
        log=context.log.info,
    )
    last, result = run.last_epoch, run.result
    return versioned_output(
        run.record(train_config, data_version),
        metadata={
            "mlflow_run": dg.MetadataValue.url(tracking.run_url(mlflow.uri(), run.mlflow_run_id)),
            "mlflow_run_id": run.mlflow_run_id,
            "model_dir": dg.MetadataValue.path(str(run.model_dir)),
            "val_accuracy": last.val_accuracy if last and last.val_accuracy is not None else 0.0,
            "train_loss": last.train_loss if last else 0.0,
            "images_per_s": round(result.images_per_s, 1),
            "device": result.device,
            "seconds": round(time.monotonic() - started, 1),
            "resumed_from_epoch": result.resumed_from_epoch,
            "training_curves": image(run.curves_png, "training curves"),
        },
    )


@dg.asset(
    group_name=TRAINING_GROUP,
    kinds={"pytorch", "mlflow"},
    owners=["team:ml-platform"],
    code_version="1",
    description="Test-split accuracy, macro F1, per-class precision/recall, confusion matrix, "
    "ECE and top-k, compared with the current champion on the same split.",
)
def model_evaluation(
    context: dg.AssetExecutionContext,
    mlflow: MLflowResource,
    trained_model: TrainedModel,
    cifar10_splits: Splits,
) -> dg.Output[ModelEvaluation]:
    import pandas as pd

    from cifar_assets.ml.evaluation import evaluate_against_champion

    run_id = trained_model.mlflow_run_id
    result = evaluate_against_champion(
        Path(trained_model.model_dir),
        cifar10_splits.test.images,
        cifar10_splits.test.labels,
        get_settings().asset_files("model_evaluation", run_id),
        models=mlflow.registry(),
        run_id=run_id,
        log=context.log.info,
    )
    metrics = {k: float(v) for k, v in result.evaluation.scalars().items()}
    metadata: dict[str, Any] = {
        **metrics,
        "per_class": table(pd.DataFrame(result.per_class_rows())),
        "confusion_matrix": image(result.confusion_png, "confusion matrix"),
        "per_class_accuracy": image(result.per_class_png, "per-class accuracy"),
    }
    champion = result.champion_evaluation
    if champion is not None:
        metadata["champion_version"] = result.champion_version or 0
        metadata["vs_champion"] = table(pd.DataFrame(result.vs_champion_rows()))
    return versioned_output(
        ModelEvaluation(
            mlflow_run_id=run_id,
            metrics=metrics,
            champion_version=result.champion_version if champion is not None else None,
            champion_metrics=champion.scalars() if champion is not None else None,
        ),
        metadata=metadata,
    )
