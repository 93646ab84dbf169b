"""Sensors: register new production batches and check them for drift; request a retraining
when a drift report says drift."""

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


class RetrainingConfigError(ValueError):
    """The base run config of retraining runs (CIFAR_RETRAINING_CONFIG) is missing or invalid."""


def load_retraining_base(path: Path) -> dict[str, Any]:
    """The base run config of retraining runs: a YAML run config of ``retraining_job``
    (``configs/retraining.yaml`` unless CIFAR_RETRAINING_CONFIG names another file)."""
    import yaml

    what_to_do = (
        "Point CIFAR_RETRAINING_CONFIG at a YAML run config of retraining_job (the repository's "
        "configs/retraining.yaml is one), or unset it to use that file; the drift report stays "
        "unhandled until then and is picked up at the next tick."
    )
    if not path.is_file():
        raise RetrainingConfigError(
            f"The retraining base config {path} does not exist. {what_to_do}"
        )
    try:
        base = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RetrainingConfigError(
            f"The retraining base config {path} is not valid YAML: {exc}. {what_to_do}"
        ) from exc
    if not isinstance(base, dict) or not isinstance(base.get("ops"), dict):
        raise RetrainingConfigError(
            f"The retraining base config {path} has no 'ops:' mapping at its top level (it holds "
            f"{type(base).__name__} {str(base)[:80]!r}); without one the retraining would run "
            f"with the GPU defaults of every asset. {what_to_do}"
        )
    extra = _raw_config(base).get("extra_batches", [])
    if not isinstance(extra, list):
        raise RetrainingConfigError(
            f"The retraining base config {path} sets ops.cifar10_raw.config.extra_batches to "
            f"{extra!r}; it must be a list of stored ImageSet files (or left out). {what_to_do}"
        )
    return base


def _raw_config(base: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``cifar10_raw`` config of a run config; empty where the run config leaves it out."""
    raw = base.get("ops", {}).get("cifar10_raw")
    config = raw.get("config") if isinstance(raw, Mapping) else None
    return config if isinstance(config, Mapping) else {}


def _merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it: mappings merge key by key, anything else in
    ``override`` replaces what ``base`` has."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def retraining_run_config(
    batch: str, labelled: bool, challenger_share: float, base: Mapping[str, Any]
) -> dict[str, Any]:
    """Run config of a retraining: ``base`` (the training recipe, see load_retraining_base) with
    the per-batch settings laid over it. The drifted batch joins the training data when it has
    labels (after any ``extra_batches`` the base lists), the new version registers as challenger
    only, and Triton gives it ``challenger_share``; these win over what the base says."""
    extra = list(_raw_config(base).get("extra_batches", []))
    if labelled:
        extra.append(str(stored_value_path("incoming_batch", batch)))
    per_batch: dict[str, Any] = {
        "ops": {
            "registered_model": {"config": {"promote_automatically": False}},
            "triton_deployment": {
                "config": {"role": "challenger", "challenger_share": challenger_share}
            },
        }
    }
    if extra:
        per_batch["ops"]["cifar10_raw"] = {"config": {"extra_batches": extra}}
    return _merged(base, per_batch)


def evaluate_retraining(
    context: dg.SensorEvaluationContext,
    cooldown_hours: float = RetrainingPolicy().cooldown_hours,
    challenger_share: float = RetrainingPolicy().challenger_share,
) -> dg.SensorResult | dg.SkipReason:
    # Read first, so that a broken file fails every tick (red in the UI) rather than only the
    # one that finds drift; the raised error leaves the cursor where it was, so the drift report
    # is handled once the file is fixed.
    base = load_retraining_base(get_settings().retraining_config)
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
                run_config=retraining_run_config(batch, labelled, challenger_share, base),
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
