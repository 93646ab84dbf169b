"""Monitoring stage: ``drift_baseline`` (detectors fitted on held-out data), ``incoming_batch``
(one dynamic partition per batch of production data) and ``drift_report`` (per batch)."""

from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from cifar_assets.artifacts import (
    ABTestSummary,
    DriftBaselineRef,
    DriftVerdict,
    FeatureTable,
    RegisteredModel,
    TrainedModel,
    TritonDeployment,
)
from cifar_assets.assets.metadata import image, input_version_tags, table, versioned_output
from cifar_assets.data.imageset import ImageSet, Splits
from cifar_assets.resources import MLflowResource, TritonResource, rollout_for
from cifar_assets.settings import get_settings

if TYPE_CHECKING:
    from cifar_assets.drift.check import DriftCheck
    from cifar_assets.serving.ab_test import ABTestRun

MONITORING_GROUP = "monitoring"
INCOMING_PARTITIONS = "incoming_batches"
incoming_batches = dg.DynamicPartitionsDefinition(name=INCOMING_PARTITIONS)


class DriftBaselineConfig(dg.Config):
    p_val: float = Field(default=0.05, description="Significance level of every drift test.")
    n_permutations: int = Field(default=100, description="MMD permutation test size.")
    reference_images: int = Field(default=1000, description="Validation images used as reference.")


@dg.asset(
    group_name=MONITORING_GROUP,
    kinds={"pytorch", "alibi-detect"},
    owners=["team:ml-platform"],
    code_version="1",
    description="Drift detectors (MMD on embeddings, KS on softmax, uncertainty, per-feature KS) "
    "fitted on the validation split for each registered version, stored by version: drift "
    "reports use the champion's.",
)
def drift_baseline(
    context: dg.AssetExecutionContext,
    config: DriftBaselineConfig,
    trained_model: TrainedModel,
    registered_model: RegisteredModel,
    cifar10_splits: Splits,
    image_features: FeatureTable,
) -> dg.Output[DriftBaselineRef]:
    from cifar_assets.data.features import FeatureStore
    from cifar_assets.drift.baseline import MODEL_FILE, baseline_dir, fit_baseline
    from cifar_assets.ml.embeddings import embed, predict_proba
    from cifar_assets.ml.model import load_model
    from cifar_assets.serving.repository import write_json_atomic

    reference = cifar10_splits.validation.subset(slice(0, config.reference_images))  # type: ignore[arg-type]
    model = load_model(Path(trained_model.model_dir))
    context.log.info(f"Embedding {len(reference)} validation images for the drift reference")
    store = Path(image_features.path)
    features = FeatureStore(store.parent).read(list(reference.ids), name=store.stem)
    baseline = fit_baseline(
        embed(model, reference.images, log=context.log.info),
        predict_proba(model, reference.images, log=context.log.info),
        features,
        reference.labels,
        model_version=registered_model.version,
        p_val=config.p_val,
        n_permutations=config.n_permutations,
    )
    directory = baseline_dir(get_settings().storage_dir, registered_model.version)
    baseline.save(directory)
    write_json_atomic(
        directory / MODEL_FILE,
        {"model_version": registered_model.version, "model_dir": trained_model.model_dir},
    )
    return versioned_output(
        DriftBaselineRef(str(directory), registered_model.version, trained_model.model_dir),
        metadata={
            "path": dg.MetadataValue.path(str(directory)),
            "model_version": registered_model.version,
            "reference_images": len(reference),
            "reference_accuracy": baseline.reference_accuracy or 0.0,
            "p_val": config.p_val,
        },
    )


@dg.asset(
    group_name=MONITORING_GROUP,
    partitions_def=incoming_batches,
    kinds={"numpy"},
    owners=["team:ml-platform"],
    code_version="1",
    description="One batch of production data: a file or folder dropped into CIFAR_INCOMING_DIR, "
    "or the images the A/B router captured in a time window (partition 'capture-...').",
)
def incoming_batch(context: dg.AssetExecutionContext) -> dg.Output[ImageSet]:
    from cifar_assets.drift.incoming import load_partition

    settings = get_settings()
    batch = load_partition(context.partition_key, settings.incoming_dir, settings.capture_dir)
    labelled = int((batch.labels >= 0).sum())
    return versioned_output(
        batch,
        metadata={"images": len(batch), "labelled": labelled, "source": batch.source},
    )


@dg.asset(
    group_name=MONITORING_GROUP,
    partitions_def=incoming_batches,
    kinds={"alibi-detect"},
    owners=["team:ml-platform"],
    code_version="2",
    deps=[drift_baseline],
    description="Drift verdict for one batch against the detectors of MLflow's champion (the "
    "drift_baseline fitted for that version): every detector's p-value, distance and "
    "threshold, the moved features, and accuracy against the baseline when the batch has labels.",
)
def drift_report(
    context: dg.AssetExecutionContext,
    mlflow: MLflowResource,
    incoming_batch: ImageSet,
) -> dg.Output[DriftVerdict]:
    from cifar_assets.drift.check import NoDetectorsError, check_incoming_batch
    from cifar_assets.ml import tracking

    mlflow.end_orphaned_runs(context.instance, context.log)
    batch = context.partition_key
    settings = get_settings()
    try:
        check = check_incoming_batch(
            incoming_batch,
            batch,
            models=mlflow.registry(),
            storage_dir=settings.storage_dir,
            out_dir=settings.asset_files("drift_report", batch),
            run_tags={"dagster_run_id": context.run_id}
            | input_version_tags(incoming_batch=incoming_batch),
            artifact_location=mlflow.artifact_location(),
            log=context.log.info,
        )
    except NoDetectorsError as error:
        raise dg.Failure(str(error)) from error
    report = check.report
    verdict = DriftVerdict(
        batch, report.drift, report.score, check.labelled, report.model_version, report.to_dict()
    )
    run_url = tracking.run_url(mlflow.uri(), check.mlflow_run_id)
    return versioned_output(verdict, metadata=_drift_metadata(check, run_url))


def _drift_metadata(check: "DriftCheck", run_url: str) -> dict[str, Any]:
    import pandas as pd

    report = check.report
    metadata: dict[str, Any] = {
        "drift": report.drift,
        "data_drift": report.data_drift,
        "model_drift": report.model_drift,
        "score": report.score,
        "images": report.n,
        "moved_features": dg.MetadataValue.json(report.moved_features),
        "detectors": table(pd.DataFrame(check.detector_rows())),
        "batch_accuracy": report.batch_accuracy if report.batch_accuracy is not None else -1.0,
        "labelled": check.labelled,
        "model_version": report.model_version,
        "drift_overview": image(check.overview_png, "drift overview"),
        "mlflow_run": dg.MetadataValue.url(run_url),
    }
    if check.moved_features_png is not None:
        metadata["moved_feature_distributions"] = image(check.moved_features_png, "moved features")
    return metadata


class ABTestConfig(dg.Config):
    alpha: float = Field(default=0.05, description="Significance level of the sequential test.")
    min_effect: float = Field(
        default=0.02, description="Accuracy difference the fixed-horizon sample size targets."
    )
    apply_rollout: bool = Field(
        default=False,
        description="While a staged rollout runs, carry out its stage's verdict through the "
        "rollout: advance to the next stage (the last promotes) or roll the challenger back. "
        "rollout_sensor sets this; a materialization from the UI only reports.",
    )


@dg.asset(
    group_name=MONITORING_GROUP,
    kinds={"triton", "scipy"},
    owners=["team:ml-platform"],
    code_version="2",
    description="The running A/B test from captured traffic and feedback: per-version requests, "
    "accuracy with confidence intervals, latency p50/p95, a sample-ratio-mismatch check, an "
    "always-valid sequential test, and a decision (promote, keep_testing, rollback); during a "
    "staged rollout, also the stage's gates and verdict (advance, hold, rollback).",
)
def ab_test_report(
    context: dg.AssetExecutionContext,
    config: ABTestConfig,
    triton: TritonResource,
    mlflow: MLflowResource,
    triton_deployment: TritonDeployment,
) -> dg.Output[ABTestSummary]:
    from cifar_assets.ml import tracking
    from cifar_assets.serving.ab_test import NoABTestError, log_ab_run, run_ab_test

    mlflow.end_orphaned_runs(context.instance, context.log)
    server = triton.server_config()
    try:
        run = run_ab_test(
            rollout_for(mlflow, server),
            server.capture_dir,
            get_settings().asset_files("ab_test_report"),
            alpha=config.alpha,
            min_effect=config.min_effect,
            apply_rollout=config.apply_rollout,
            actor=f"dagster run {context.run_id}",
            log=context.log.info,
        )
    except NoABTestError as error:
        raise dg.Failure(str(error)) from error
    metadata = _ab_metadata(run)
    run_id = log_ab_run(
        run,
        tracking_uri=mlflow.uri(),
        model_name=mlflow.registered_model_name(),
        params={"alpha": config.alpha, "min_effect": config.min_effect},
        tags={"dagster_run_id": context.run_id}
        | input_version_tags(triton_deployment=triton_deployment),
        artifact_location=mlflow.artifact_location(),
    )
    metadata["mlflow_run"] = dg.MetadataValue.url(tracking.run_url(mlflow.uri(), run_id))
    return versioned_output(run.summary, metadata=metadata)


def _ab_metadata(run: "ABTestRun") -> dict[str, Any]:
    """The report's figures and, during a staged rollout, the stage's gates and verdict."""
    import pandas as pd

    metadata: dict[str, Any] = {}
    if run.report is not None:
        report = run.report
        metadata |= {
            "decision": report.decision,
            "reason": report.reason,
            "control": report.control,
            "treatment": report.treatment,
            "srm_p_value": report.srm.p_value,
            "sequential_p_value": report.accuracy_test.p_value,
            "fixed_horizon_n_per_arm": report.fixed_horizon_n_per_arm,
            "per_version": table(
                pd.DataFrame([{"version": v, **vars(s)} for v, s in report.versions.items()])
            ),
            "ab_results": image(run.results_png, "A/B results") if run.results_png else "",
        }
    if run.judgement is not None:
        judgement = run.judgement
        metadata |= {
            "stage": judgement.stage,
            "stage_action": judgement.action,
            "stage_reason": judgement.reason,
            "stage_evidence": dg.MetadataValue.json(judgement.evidence),
        }
        if run.shadow_png is not None:
            metadata["shadow_evidence"] = image(run.shadow_png, "shadow evidence")
        if judgement.gates:
            metadata["gates"] = table(pd.DataFrame([vars(gate) for gate in judgement.gates]))
        if run.transition is not None:
            metadata["transition"] = run.transition
    return metadata
