"""One tracked training: the MLflow run, its parameters, per-epoch metrics and curves, the saved
model and its artifacts. What the ``trained_model`` asset runs, callable without Dagster.

The checkpoint folder is keyed by the recipe and the training data (``work_root/<recipe hash>``),
so a retry of a failed or killed run resumes from its last epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cifar_assets.artifacts import TrainedModel
from cifar_assets.data.imageset import Splits
from cifar_assets.ml.training import EpochMetrics, Progress, TrainConfig, TrainResult


@dataclass(frozen=True, eq=False)
class TrackedTraining:
    result: TrainResult
    model_dir: Path
    curves_png: Path
    mlflow_run_id: str

    @property
    def last_epoch(self) -> EpochMetrics | None:
        return self.result.history[-1] if self.result.history else None

    def record(self, config: TrainConfig, data_version: str) -> TrainedModel:
        """What the trained_model asset hands downstream."""
        last = self.last_epoch
        return TrainedModel(
            model_dir=str(self.model_dir),
            stem=config.stem,
            mlflow_run_id=self.mlflow_run_id,
            data_version=data_version,
            epochs=config.epochs,
            final_val_accuracy=last.val_accuracy if last else None,
            images_per_s=self.result.images_per_s,
            device=self.result.device,
        )


def _epoch_line(metrics: EpochMetrics, epochs: int) -> str:
    return (
        f"epoch {metrics.epoch}/{epochs}: loss {metrics.train_loss:.4f}, train acc "
        f"{metrics.train_accuracy:.3f}, val acc {metrics.val_accuracy}, "
        f"{metrics.images_per_s:.0f} img/s, {metrics.eta_seconds:.0f} s left"
    )


def _progress_line(progress: Progress) -> str:
    return (
        f"epoch {progress.epoch} step {progress.step}/{progress.steps_in_epoch} "
        f"(total {progress.global_step}/{progress.total_steps}): loss "
        f"{progress.train_loss:.4f}, {progress.images_per_s:.0f} img/s, "
        f"{progress.eta_seconds:.0f} s left"
    )


def train_tracked(
    splits: Splits,
    config: TrainConfig,
    *,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    artifact_location: str | None,
    work_root: Path,
    model_folder: str,
    log: Callable[[str], None] = print,
) -> TrackedTraining:
    """Train on ``splits.train`` (validating on ``splits.validation``) inside one MLflow run that
    gets ``tags``, every hyperparameter, per-epoch metrics, the training curves and the model;
    the model is saved to ``work_root/<recipe hash>/<model_folder>``."""
    from cifar_assets.ml import tracking
    from cifar_assets.ml.evaluation import training_curves_png
    from cifar_assets.ml.model import save_model
    from cifar_assets.ml.training import train

    data_version = splits.fingerprint()
    work_dir = work_root / config.recipe_hash(splits.train.fingerprint())
    with tracking.tracking_run(
        tracking_uri, experiment, run_name, dict(tags), artifact_location
    ) as run_id:
        params: dict[str, Any] = asdict(config) | {
            "data_version": data_version,
            "train_images": len(splits.train),
        }
        tracking.log_params(tracking_uri, run_id, params)

        def on_epoch(metrics: EpochMetrics) -> None:
            values = {k: v for k, v in vars(metrics).items() if isinstance(v, float | int)}
            tracking.log_epoch_metrics(tracking_uri, run_id, metrics.epoch, values)
            log(_epoch_line(metrics, config.epochs))

        result = train(
            splits.train,
            splits.validation,
            config,
            checkpoint_dir=work_dir / "checkpoints",
            on_epoch=on_epoch,
            on_progress=lambda progress: log(_progress_line(progress)),
        )
        for note in result.notes:
            log(note)
        model_dir = work_dir / model_folder
        save_model(result.model, result.architecture, model_dir)
        curves = training_curves_png(result.history, model_dir / "training_curves.png")
        tracking.log_artifact(tracking_uri, run_id, curves, "plots")
        tracking.log_artifact(tracking_uri, run_id, model_dir, "model")
    return TrackedTraining(result, model_dir, curves, run_id)
