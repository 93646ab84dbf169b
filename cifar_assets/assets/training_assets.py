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
from cifar_assets.ml.training import EpochMetrics, Progress, TrainConfig
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


def _ended_status(context: dg.AssetExecutionContext, run_id: str) -> str | None:
    run = context.instance.get_run_by_id(run_id)
    return run.status.value if run is not None and run.is_finished else None


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
    from cifar_assets.ml.evaluation import training_curves_png
    from cifar_assets.ml.model import save_model
    from cifar_assets.ml.training import train

    settings = get_settings()
    # A training killed with SIGKILL (even under `dagster job execute`, without the daemon) left
    # its MLflow run RUNNING: end it now, with the reason.
    for mlflow_run, reason in tracking.end_runs_of_ended_dagster_runs(
        mlflow.uri(), mlflow.experiment(), lambda run_id: _ended_status(context, run_id)
    ).items():
        context.log.warning(f"MLflow run {mlflow_run} marked FAILED: {reason}")
    train_config = TrainConfig(**config.model_dump())
    data_version = cifar10_splits.fingerprint()
    # The checkpoint folder is keyed by recipe and data, so a retry of a failed run resumes it.
    recipe = train_config.recipe_hash(cifar10_splits.train.fingerprint())
    work_dir = settings.storage_dir / "trained_model" / recipe
    with tracking.tracking_run(
        mlflow.uri(),
        mlflow.experiment(),
        run_name=f"train-{context.run_id[:8]}",
        tags=_run_tags(context)
        | {"data_version": data_version}
        | input_version_tags(cifar10_splits=cifar10_splits),
        artifact_location=mlflow.artifact_location(),
    ) as run_id:
        tracking.log_params(
            mlflow.uri(),
            run_id,
            config.model_dump()
            | {"data_version": data_version, "train_images": len(cifar10_splits.train)},
        )

        def on_epoch(metrics: EpochMetrics) -> None:
            values = {k: v for k, v in vars(metrics).items() if isinstance(v, float | int)}
            tracking.log_epoch_metrics(mlflow.uri(), run_id, metrics.epoch, values)
            context.log.info(
                f"epoch {metrics.epoch}/{train_config.epochs}: loss {metrics.train_loss:.4f}, "
                f"train acc {metrics.train_accuracy:.3f}, val acc {metrics.val_accuracy}, "
                f"{metrics.images_per_s:.0f} img/s, {metrics.eta_seconds:.0f} s left"
            )

        def on_progress(progress: Progress) -> None:
            context.log.info(
                f"epoch {progress.epoch} step {progress.step}/{progress.steps_in_epoch} "
                f"(total {progress.global_step}/{progress.total_steps}): loss "
                f"{progress.train_loss:.4f}, {progress.images_per_s:.0f} img/s, "
                f"{progress.eta_seconds:.0f} s left"
            )

        started = time.monotonic()
        result = train(
            cifar10_splits.train,
            cifar10_splits.validation,
            train_config,
            checkpoint_dir=work_dir / "checkpoints",
            on_epoch=on_epoch,
            on_progress=on_progress,
        )
        for note in result.notes:
            context.log.info(note)
        model_dir = work_dir / f"run-{context.run_id[:8]}"
        save_model(result.model, result.architecture, model_dir)
        curves = training_curves_png(result.history, model_dir / "training_curves.png")
        tracking.log_artifact(mlflow.uri(), run_id, curves, "plots")
        tracking.log_artifact(mlflow.uri(), run_id, model_dir, "model")
    last = result.history[-1] if result.history else None
    artifact = TrainedModel(
        model_dir=str(model_dir),
        stem=train_config.stem,
        mlflow_run_id=run_id,
        data_version=data_version,
        epochs=train_config.epochs,
        final_val_accuracy=last.val_accuracy if last else None,
        images_per_s=result.images_per_s,
        device=result.device,
    )
    return versioned_output(
        artifact,
        metadata={
            "mlflow_run": dg.MetadataValue.url(tracking.run_url(mlflow.uri(), run_id)),
            "mlflow_run_id": run_id,
            "model_dir": dg.MetadataValue.path(str(model_dir)),
            "val_accuracy": last.val_accuracy if last and last.val_accuracy is not None else 0.0,
            "train_loss": last.train_loss if last else 0.0,
            "images_per_s": round(result.images_per_s, 1),
            "device": result.device,
            "seconds": round(time.monotonic() - started, 1),
            "resumed_from_epoch": result.resumed_from_epoch,
            "training_curves": image(curves, "training curves"),
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

    from cifar_assets.ml import registry, tracking
    from cifar_assets.ml.evaluation import (
        compare,
        confusion_matrix_png,
        evaluate,
        per_class_accuracy_png,
        predict_logits,
    )
    from cifar_assets.ml.model import load_model

    test = cifar10_splits.test
    model = load_model(Path(trained_model.model_dir))
    evaluation = evaluate(predict_logits(model, test.images, log=context.log.info), test.labels)
    plots = Path(trained_model.model_dir) / "evaluation"
    plots.mkdir(exist_ok=True)
    confusion = confusion_matrix_png(evaluation, plots / "confusion_matrix.png")
    per_class = per_class_accuracy_png(evaluation, plots / "per_class_accuracy.png")
    metrics = evaluation.scalars()
    run_id = trained_model.mlflow_run_id
    tracking.log_epoch_metrics(
        mlflow.uri(), run_id, 0, {f"test_{k}": v for k, v in metrics.items()}
    )
    for plot in (confusion, per_class):
        tracking.log_artifact(mlflow.uri(), run_id, plot, "plots")

    try:
        champion = registry.get_champion(mlflow.uri(), name=mlflow.registered_model_name())
    except registry.RegistryLookupError:  # nothing registered yet: the first model
        champion = None
    champion_metrics = None
    metadata: dict[str, Any] = {
        **{k: float(v) for k, v in metrics.items()},
        "per_class": table(
            pd.DataFrame(
                {
                    "class": evaluation.class_names,
                    "precision": evaluation.precision.round(4),
                    "recall": evaluation.recall.round(4),
                    "f1": evaluation.f1.round(4),
                    "support": evaluation.support,
                }
            )
        ),
        "confusion_matrix": image(confusion, "confusion matrix"),
        "per_class_accuracy": image(per_class, "per-class accuracy"),
    }
    if champion is not None:
        champion_model = registry.load_model_version(
            mlflow.uri(), champion.version, name=mlflow.registered_model_name()
        )
        champion_eval = evaluate(
            predict_logits(champion_model, test.images, log=context.log.info), test.labels
        )
        champion_metrics = champion_eval.scalars()
        difference = compare(evaluation, champion_eval)
        metadata["champion_version"] = str(champion.version)
        metadata["vs_champion"] = table(
            pd.DataFrame([{"metric": name, **values} for name, values in difference.items()]).round(
                4
            )
        )
        delta = difference["accuracy"]["delta"]
        context.log.info(f"Accuracy against champion v{champion.version}: {delta:+.4f}")
    return versioned_output(
        ModelEvaluation(
            mlflow_run_id=trained_model.mlflow_run_id,
            metrics={k: float(v) for k, v in metrics.items()},
            champion_version=str(champion.version) if champion else None,
            champion_metrics=champion_metrics,
        ),
        metadata=metadata,
    )
