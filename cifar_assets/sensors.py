"""Sensors: register new production batches and check them for drift; request a retraining
when a drift report says drift."""

import json
import time

import dagster as dg

from cifar_assets.assets.monitoring_assets import INCOMING_PARTITIONS, incoming_batches
from cifar_assets.jobs import drift_check_job, retraining_job
from cifar_assets.resources import stored_value_path
from cifar_assets.settings import get_settings

ACTIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


@dg.sensor(
    job=drift_check_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers each new file or folder in CIFAR_INCOMING_DIR as an incoming_batch "
    "partition and launches its drift check.",
)
def incoming_batch_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    from cifar_assets.drift.incoming import discover_batches

    known = set(context.instance.get_dynamic_partitions(INCOMING_PARTITIONS))
    new = [
        b.batch_id for b in discover_batches(get_settings().incoming_dir) if b.batch_id not in known
    ]
    if not new:
        return dg.SkipReason(f"No new batch in {get_settings().incoming_dir}.")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=key, run_key=f"drift-{key}") for key in new],
        dynamic_partitions_requests=[incoming_batches.build_add_request(new)],
    )


class RetrainingPolicy(dg.Config):
    cooldown_hours: float = 6.0
    challenger_share: float = 0.1


def retraining_run_config(batch: str, labelled: bool, challenger_share: float) -> dict:
    """Run config of a retraining: the drifted batch joins the training data when it has labels,
    the new version registers as challenger only, and Triton gives it ``challenger_share``."""
    raw: dict = (
        {"extra_batches": [str(stored_value_path("incoming_batch", batch))]} if labelled else {}
    )
    return {
        "ops": {
            "cifar10_raw": {"config": raw},
            "registered_model": {"config": {"promote_automatically": False}},
            "triton_deployment": {
                "config": {"role": "challenger", "challenger_share": challenger_share}
            },
        }
    }


def evaluate_retraining(
    context: dg.SensorEvaluationContext,
    cooldown_hours: float = RetrainingPolicy().cooldown_hours,
    challenger_share: float = RetrainingPolicy().challenger_share,
) -> dg.SensorResult | dg.SkipReason:
    cursor = json.loads(context.cursor) if context.cursor else {}
    after = cursor.get("after_storage_id")
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("drift_report"), after_storage_id=after),
        limit=100,
        ascending=True,
    ).records
    if not records:
        return dg.SkipReason("No new drift report.")
    cursor["after_storage_id"] = records[-1].storage_id
    drifted = [
        r
        for r in records
        if r.asset_materialization
        and r.asset_materialization.metadata.get("drift", dg.BoolMetadataValue(False)).value
    ]
    if not drifted:
        return dg.SensorResult(
            skip_reason="New drift reports show no drift.", cursor=json.dumps(cursor)
        )
    latest = drifted[-1]
    batch = latest.partition_key or "unpartitioned"
    active = context.instance.get_runs(
        filters=dg.RunsFilter(job_name=retraining_job.name, statuses=ACTIVE_STATUSES), limit=1
    )
    if active:
        reason = f"Drift in batch {batch}, but retraining run {active[0].run_id} is still running."
        context.log.info(reason)
        return dg.SensorResult(skip_reason=reason, cursor=json.dumps(cursor))
    last_request = cursor.get("last_request_time", 0.0)
    waited_h = (time.time() - last_request) / 3600
    if waited_h < cooldown_hours:
        reason = (
            f"Drift in batch {batch}, but the last retraining was requested {waited_h:.1f} h ago "
            f"(cooldown {cooldown_hours} h)."
        )
        context.log.info(reason)
        return dg.SensorResult(skip_reason=reason, cursor=json.dumps(cursor))
    labelled = bool(latest.asset_materialization.metadata["labelled"].value)  # type: ignore[union-attr]
    cursor["last_request_time"] = time.time()
    context.log.info(f"Drift in batch {batch}: requesting one retraining run.")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"retrain-{batch}-{latest.storage_id}",
                run_config=retraining_run_config(batch, labelled, challenger_share),
                tags={"drift_report": batch},
            )
        ],
        cursor=json.dumps(cursor),
    )


@dg.sensor(
    job=retraining_job,
    minimum_interval_seconds=60,
    description="When a drift report says drift, requests one retraining run per report, with a "
    "cooldown; skipped while a retraining is running.",
)
def drift_retraining_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    return evaluate_retraining(context)


@dg.run_failure_sensor(
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Marks FAILED any MLflow run a failed Dagster run left RUNNING (a killed step "
    "process cannot end its own run).",
)
def mlflow_cleanup_sensor(context: dg.RunFailureSensorContext) -> None:
    from cifar_assets.ml.tracking import end_orphaned_runs

    settings = get_settings()
    ended = end_orphaned_runs(
        settings.mlflow_tracking_uri,
        settings.mlflow_experiment_name,
        "dagster_run_id",
        context.dagster_run.run_id,
    )
    if ended:
        context.log.info(f"Marked MLflow runs {ended} FAILED")
