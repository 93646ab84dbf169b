"""Monitoring stage: ``drift_baseline`` (detectors fitted on held-out data), ``incoming_batch``
(one dynamic partition per batch of production data) and ``drift_report`` (per batch)."""

from pathlib import Path
from typing import Any

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
        model_version=str(registered_model.version),
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
        DriftBaselineRef(str(directory), str(registered_model.version), trained_model.model_dir),
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
    import json

    import pandas as pd

    from cifar_assets.data.features import compute_features
    from cifar_assets.drift.baseline import (
        MODEL_FILE,
        BaselineVersionError,
        DriftBaseline,
        baseline_dir,
    )
    from cifar_assets.drift.report import (
        check_batch,
        drift_overview_png,
        feature_distribution_png,
    )
    from cifar_assets.ml import registry, tracking
    from cifar_assets.ml.embeddings import embed, predict_proba
    from cifar_assets.ml.model import load_model

    log = context.log.info
    champion = registry.aliases(mlflow.uri(), mlflow.registered_model_name()).get(registry.CHAMPION)
    if champion is None:
        raise dg.Failure(
            f"{mlflow.registered_model_name()} has no champion in {mlflow.uri()}, so there are "
            "no detectors to check this batch with: run main_job first."
        )
    directory = baseline_dir(get_settings().storage_dir, champion)
    try:
        baseline = DriftBaseline.load(directory, expected_model_version=str(champion))
        model_dir = json.loads((directory / MODEL_FILE).read_text())["model_dir"]
    except (FileNotFoundError, BaselineVersionError) as error:
        raise dg.Failure(
            f"No usable drift baseline for champion v{champion} under {directory} ({error}). "
            "Materialize drift_baseline for that version (main_job or retraining_job does)."
        ) from error
    log(f"Checking against champion v{champion}'s detectors ({directory})")
    model = load_model(Path(model_dir))
    features = compute_features(incoming_batch, log=log)
    labels = incoming_batch.labels if (incoming_batch.labels >= 0).any() else None
    probabilities = predict_proba(model, incoming_batch.images, log=log)
    report = check_batch(
        baseline,
        embed(model, incoming_batch.images, log=log),
        probabilities,
        features,
        labels,
        log=log,
    )
    out_dir = get_settings().storage_dir / "drift_report" / context.partition_key
    out_dir.mkdir(parents=True, exist_ok=True)
    details = report.to_dict()
    report_file = out_dir / "report.json"
    report_file.write_text(json.dumps(details, indent=2) + "\n")
    overview = drift_overview_png(report, baseline, probabilities, out_dir / "drift_overview.png")
    pictures = [overview]
    detectors = pd.DataFrame(
        [
            {"detector": name, **{k: v for k, v in d.items() if k != "details"}}
            for name, d in details["detectors"].items()
        ]
    )
    metadata: dict[str, Any] = {
        "drift": report.drift,
        "data_drift": report.data_drift,
        "model_drift": report.model_drift,
        "score": report.score,
        "images": report.n,
        "moved_features": dg.MetadataValue.json(report.moved_features),
        "detectors": table(detectors),
        "batch_accuracy": report.batch_accuracy if report.batch_accuracy is not None else -1.0,
        "labelled": labels is not None,
        "model_version": int(report.model_version),
        "drift_overview": image(overview, "drift overview"),
    }
    if report.moved_features:
        plot = feature_distribution_png(
            baseline.features.reference_features(),
            features,
            report.moved_features,
            out_dir / "moved_features.png",
        )
        pictures.append(plot)
        metadata["moved_feature_distributions"] = image(plot, "moved features")
    run_id = tracking.log_monitoring_run(
        mlflow.uri(),
        mlflow.registered_model_name(),
        run_name=f"drift-{context.partition_key}",
        tags={
            "kind": "drift_report",
            "batch": context.partition_key,
            "model_version": report.model_version,
            "dagster_run_id": context.run_id,
        }
        | input_version_tags(incoming_batch=incoming_batch),
        params={"p_val": report.p_val, "images": report.n, "model_version": report.model_version},
        metrics={
            "drift": float(report.drift),
            "score": report.score,
            "combined_p_value": report.combined_p_value,
            "batch_accuracy": report.batch_accuracy,
            **{f"p_value_{result.name}": result.p_value for result in report.results},
            **{f"distance_{result.name}": result.distance for result in report.results},
        },
        files=[report_file, *pictures],
        artifact_location=mlflow.artifact_location(),
    )
    metadata["mlflow_run"] = dg.MetadataValue.url(tracking.run_url(mlflow.uri(), run_id))
    from cifar_assets.metrics import write_drift_status

    write_drift_status(
        get_settings().storage_dir, context.partition_key, report.score, report.drift
    )
    context.log.info(
        f"Batch {context.partition_key}: drift={report.drift} score={report.score:.3f} "
        f"moved={report.moved_features[:5]}"
    )
    return versioned_output(
        DriftVerdict(
            batch=context.partition_key,
            drift=report.drift,
            score=report.score,
            labelled=labels is not None,
            model_version=report.model_version,
            details=details,
        ),
        metadata=metadata,
    )


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
    import json

    import pandas as pd

    from cifar_assets.serving.gates import act, judge_stage
    from cifar_assets.serving.rollout import FIXED

    server = triton.server_config()
    rollout = rollout_for(mlflow, server)
    state = rollout.state()
    weights = {v: w for v, w in state.weights.items() if w > 0}
    staged = state.stage not in (None, FIXED)
    if len(weights) != 2 and not staged:
        raise dg.Failure(
            f"No A/B test is running: the router's weights are {weights or 'unset'} and no "
            "staged rollout runs. Deploy a challenger (retraining_job, or main_job when the gate "
            "keeps the champion) first."
        )
    out_dir = get_settings().storage_dir / "ab_test_report"
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata: dict[str, Any] = {}
    files: list[Path] = []
    if len(weights) == 2:
        summary, ab_metadata, files = _ab_analysis(config, server.capture_dir, weights, out_dir)
        metadata |= ab_metadata
    else:
        summary = ABTestSummary(state.champion or 0, state.challenger or 0, "keep_testing", "")
    if staged:
        judgement = judge_stage(state, server.capture_dir)
        gates = pd.DataFrame([vars(gate) for gate in judgement.gates]) if judgement.gates else None
        metadata |= {
            "stage": judgement.stage,
            "stage_action": judgement.action,
            "stage_reason": judgement.reason,
            "stage_evidence": dg.MetadataValue.json(judgement.evidence),
        }
        if gates is not None:
            metadata["gates"] = table(gates)
        stage_file = out_dir / "stage.json"
        stage_file.write_text(json.dumps(judgement.to_dict(), indent=2, default=str) + "\n")
        files.append(stage_file)
        summary = ABTestSummary(
            summary.control,
            summary.treatment,
            summary.decision,
            summary.reason,
            {**summary.details, "stage": judgement.to_dict()},
        )
        if config.apply_rollout:
            transition = act(rollout, judgement, actor=f"dagster run {context.run_id}")
            metadata["transition"] = transition.action if transition else "none"
        context.log.info(f"Stage {judgement.stage}: {judgement.action}: {judgement.reason}")
    metadata["mlflow_run"] = dg.MetadataValue.url(
        _log_ab_run(
            context,
            config,
            mlflow,
            summary,
            weights,
            metadata,
            files,
            input_version_tags(triton_deployment=triton_deployment),
        )
    )
    return versioned_output(summary, metadata=metadata)


def _ab_analysis(
    config: ABTestConfig, capture_dir: Path, weights: dict[int, float], out_dir: Path
) -> tuple[ABTestSummary, dict[str, Any], list[Path]]:
    """The A/B comparison of the two weighted versions on the capture joined with feedback."""
    import json

    import pandas as pd

    from cifar_assets.drift.ab_stats import ab_results_png, analyse_ab
    from cifar_assets.serving.capture import read_capture, read_feedback

    # the control is the version with more traffic (on a 50/50 split, the older one)
    control, treatment = sorted(weights, key=lambda v: (-weights[v], v))
    capture = read_capture(capture_dir)
    feedback = read_feedback(capture_dir)[["request_id", "item", "label"]]
    records = capture.merge(feedback, on=["request_id", "item"], how="left")
    records["correct"] = (records["predicted_class"] == records["label"]).where(
        records["label"].notna()
    )
    records = records[records["served_version"].isin(list(weights))]
    report = analyse_ab(records, weights, control, treatment, config.alpha, config.min_effect)
    plot = ab_results_png(report, out_dir / "ab_results.png")
    per_version = pd.DataFrame(
        [{"version": v, **vars(s)} for v, s in report.versions.items()]
    ).round(4)
    report_file = out_dir / "ab_report.json"
    report_file.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    metadata = {
        "decision": report.decision,
        "reason": report.reason,
        "control": control,
        "treatment": treatment,
        "srm_p_value": report.srm.p_value,
        "sequential_p_value": report.accuracy_test.p_value,
        "fixed_horizon_n_per_arm": report.fixed_horizon_n_per_arm,
        "per_version": table(per_version),
        "ab_results": image(plot, "A/B results"),
    }
    summary = ABTestSummary(control, treatment, report.decision, report.reason, report.to_dict())
    return summary, metadata, [report_file, plot]


def _log_ab_run(
    context: dg.AssetExecutionContext,
    config: ABTestConfig,
    mlflow: MLflowResource,
    summary: ABTestSummary,
    weights: dict[int, float],
    metadata: dict[str, Any],
    files: list[Path],
    input_tags: dict[str, str],
) -> str:
    """The report as a finished MLflow run in the monitoring experiment; returns its URL."""
    from cifar_assets.ml import tracking

    context.log.info(
        f"A/B v{summary.control} vs v{summary.treatment}: {summary.decision}: {summary.reason}"
    )
    metrics: dict[str, float | None] = {}
    for version, stats in summary.details.get("versions", {}).items():
        for key in ("requests", "share", "n_feedback", "accuracy", "latency_p50_ms"):
            metrics[f"v{version}_{key}"] = stats.get(key)
    for key in ("srm_p_value", "sequential_p_value", "fixed_horizon_n_per_arm"):
        if key in metadata:
            metrics[key] = float(metadata[key])
    run_id = tracking.log_monitoring_run(
        mlflow.uri(),
        mlflow.registered_model_name(),
        run_name=f"ab-v{summary.control}-vs-v{summary.treatment}",
        tags={
            "kind": "ab_test",
            "control": summary.control,
            "treatment": summary.treatment,
            "decision": summary.decision,
            "stage": metadata.get("stage", "none"),
            "stage_action": metadata.get("stage_action", "none"),
            "dagster_run_id": context.run_id,
        }
        | input_tags,
        params={"alpha": config.alpha, "min_effect": config.min_effect, "weights": weights},
        metrics=metrics,
        files=files,
        artifact_location=mlflow.artifact_location(),
    )
    return tracking.run_url(mlflow.uri(), run_id)
