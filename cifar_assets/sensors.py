"""Sensors: register new production batches and check them for drift; request retraining when
drift reports say drift, under a written policy (evaluate_retraining). Every tick of every sensor
first marks FAILED the MLflow runs of Dagster runs that have ended
(MLflowResource.end_orphaned_runs)."""

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from cifar_assets.assets.monitoring_assets import INCOMING_PARTITIONS, incoming_batches
from cifar_assets.jobs import drift_check_job, retraining_job, rollout_job
from cifar_assets.resources import MLflowResource, TritonResource, rollout_for, stored_value_path
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
def incoming_batch_sensor(
    context: dg.SensorEvaluationContext, mlflow: MLflowResource
) -> dg.SensorResult:
    from cifar_assets.drift.incoming import discover_batches

    mlflow.end_orphaned_runs(context.instance, context.log)
    incoming_dir = get_settings().incoming_dir
    discovery = discover_batches(incoming_dir)
    # A bad entry is reported once (not at every tick) and never holds up the others.
    reported = set(json.loads(context.cursor)) if context.cursor else set()
    problems = {f"{e.path}: {e.reason}": e for e in (*discovery.rejected, *discovery.ignored)}
    for key, entry in problems.items():
        if key not in reported:
            log = context.log.warning if entry in discovery.rejected else context.log.info
            log(f"{'Refused' if entry in discovery.rejected else 'Ignored'} {key}")
    known = set(context.instance.get_dynamic_partitions(INCOMING_PARTITIONS))
    new = [b.batch_id for b in discovery.batches if b.batch_id not in known]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=key, run_key=f"drift-{key}") for key in new],
        dynamic_partitions_requests=[incoming_batches.build_add_request(new)] if new else None,
        skip_reason=None
        if new
        else f"No new batch in {incoming_dir} ({len(discovery.rejected)} entries refused).",
        cursor=json.dumps(sorted(problems)),
    )


@dataclass(frozen=True)
class RetrainingPolicy:
    cooldown_hours: float = 6.0  # from the end of the last successful retraining
    failure_backoff_minutes: float = 30.0  # after a failed attempt, before the next
    challenger_share: float = 0.1  # router traffic of the retrained challenger


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
    labelled_batches: list[str], challenger_share: float, base: Mapping[str, Any]
) -> dict[str, Any]:
    """Run config of a retraining: ``base`` (the training recipe, see load_retraining_base) with
    the drift settings laid over it. Every labelled drifted batch joins the training data (after
    any ``extra_batches`` the base lists), the new version is held as challenger (the A/B test
    decides), and Triton gives it ``challenger_share``; these win over what the base says."""
    extra = list(_raw_config(base).get("extra_batches", []))
    extra += [str(stored_value_path("incoming_batch", batch)) for batch in labelled_batches]
    per_run: dict[str, Any] = {
        "ops": {
            "registered_model": {"config": {"promote_automatically": False}},
            "triton_deployment": {"config": {"challenger_share": challenger_share}},
        }
    }
    if extra:
        per_run["ops"]["cifar10_raw"] = {"config": {"extra_batches": extra}}
    return _merged(base, per_run)


COVERS_TAG = "cifar/covers_drift_reports_through"  # storage id of the newest report a run covers
BATCHES_TAG = "cifar/drift_batches"


@dataclass(frozen=True)
class RetrainingHistory:
    """What earlier retraining runs did, read from the Dagster instance."""

    covered_through: int  # newest drift report covered by a successful retraining
    last_success_end: float | None
    active_run_id: str | None
    failures_since: int  # failed attempts at the reports not yet covered
    last_failure_end: float | None


def retraining_history(instance: dg.DagsterInstance) -> RetrainingHistory:
    records = instance.get_run_records(
        filters=dg.RunsFilter(job_name=retraining_job.name), limit=200
    )
    succeeded = [r for r in records if r.dagster_run.status == dg.DagsterRunStatus.SUCCESS]
    covered = max((int(r.dagster_run.tags.get(COVERS_TAG, 0)) for r in succeeded), default=0)
    failed = [
        r
        for r in records
        if r.dagster_run.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
        and int(r.dagster_run.tags.get(COVERS_TAG, 0)) > covered
    ]
    active = [r for r in records if r.dagster_run.status in ACTIVE_STATUSES]
    return RetrainingHistory(
        covered_through=covered,
        last_success_end=max((r.end_time or 0.0 for r in succeeded), default=None),
        active_run_id=active[0].dagster_run.run_id if active else None,
        failures_since=len(failed),
        last_failure_end=max((r.end_time or 0.0 for r in failed), default=None),
    )


def _drifted(record: dg.EventLogRecord) -> bool:
    materialization = record.asset_materialization
    if materialization is None:
        return False
    return bool(materialization.metadata.get("drift", dg.BoolMetadataValue(False)).value)


def _labelled(record: dg.EventLogRecord) -> bool:
    materialization = record.asset_materialization
    if materialization is None:
        return False
    return bool(materialization.metadata.get("labelled", dg.BoolMetadataValue(False)).value)


def _drift_reports(instance: dg.DagsterInstance, after: int) -> list[dg.EventLogRecord]:
    records: list[dg.EventLogRecord] = []
    while True:
        page = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("drift_report"), after_storage_id=after),
            limit=500,
            ascending=True,
        ).records
        records.extend(page)
        if len(page) < 500:
            return records
        after = page[-1].storage_id


def evaluate_retraining(
    context: dg.SensorEvaluationContext,
    mlflow: MLflowResource,
    policy: RetrainingPolicy | None = None,
    now: float | None = None,
) -> dg.SensorResult:
    """The retraining policy (README, "Drift, retraining and A/B promotion"):

    - one retraining run covers every drifted report since the last successful retraining, and
      trains on every labelled batch among them;
    - never while a retraining runs; the cooldown counts from the last success; after a failed
      attempt the next waits ``failure_backoff_minutes``;
    - every new report gets an action recorded on it (an observation of its drift_report
      partition, shown in the UI), so none is consumed silently; a report that waited gets a
      second one when the retraining that covers it is requested.
    """
    policy = policy or RetrainingPolicy()
    now = time.time() if now is None else now
    # Read first, so that a broken file fails every tick (red in the UI); the cursor stays, so
    # the reports are handled once the file is fixed.
    base = load_retraining_base(get_settings().retraining_config)
    mlflow.end_orphaned_runs(context.instance, context.log)
    cursor = json.loads(context.cursor) if context.cursor else {}
    history = retraining_history(context.instance)
    seen = int(cursor.get("seen_through", 0))
    # One read of the event log serves both questions: what is new, and what still waits.
    reports = _drift_reports(context.instance, min(seen, history.covered_through))
    new_reports = [r for r in reports if r.storage_id > seen]
    pending = [r for r in reports if r.storage_id > history.covered_through and _drifted(r)]

    request: dg.RunRequest | None = None
    if not pending:
        decision = "no drifted report waits for a retraining"
    elif history.active_run_id is not None:
        decision = (
            f"waiting: retraining run {history.active_run_id} is running; the next retraining "
            "covers this report"
        )
    elif (
        history.last_success_end is not None
        and now - history.last_success_end < policy.cooldown_hours * 3600
    ):
        until = history.last_success_end + policy.cooldown_hours * 3600
        decision = (
            f"waiting: cooldown of {policy.cooldown_hours} h after the last successful "
            f"retraining, until {_utc(until)}"
        )
    elif (
        history.last_failure_end is not None
        and now - history.last_failure_end < policy.failure_backoff_minutes * 60
    ):
        until = history.last_failure_end + policy.failure_backoff_minutes * 60
        decision = (
            f"waiting: the last retraining attempt failed; the next starts after {_utc(until)}"
        )
    else:
        through = pending[-1].storage_id
        batches = [r.partition_key or "unpartitioned" for r in pending]
        labelled = [r.partition_key for r in pending if _labelled(r) and r.partition_key]
        run_key = f"retrain-through-{through}-attempt-{history.failures_since + 1}"
        request = dg.RunRequest(
            run_key=run_key,
            run_config=retraining_run_config(labelled, policy.challenger_share, base),
            tags={COVERS_TAG: str(through), BATCHES_TAG: ",".join(batches)[:1000]},
        )
        decision = (
            f"retraining requested ({run_key}) for {len(pending)} drifted report(s) "
            f"({', '.join(batches)}); training data adds labelled batches "
            f"{', '.join(labelled) or 'none'}"
        )
    context.log.info(decision)

    # Reports that waited (a cooldown, a running retraining) get the request that covers them
    # recorded as well, once per request: the same run key asked again records nothing new.
    to_record = {r.storage_id: r for r in new_reports}
    if request is not None and cursor.get("recorded_request") != request.run_key:
        to_record |= {r.storage_id: r for r in pending}
        cursor["recorded_request"] = request.run_key
    observations = []
    for _, record in sorted(to_record.items()):
        action = decision if _drifted(record) else "no drift: no retraining needed"
        if _drifted(record) and record.storage_id <= history.covered_through:
            action = "drift: already covered by a successful retraining"
        observations.append(
            dg.AssetObservation(
                asset_key="drift_report",
                partition=record.partition_key,
                metadata={"retraining_action": action, "report_storage_id": record.storage_id},
            )
        )
    if new_reports:
        cursor["seen_through"] = new_reports[-1].storage_id
    return dg.SensorResult(
        run_requests=[request] if request else None,
        skip_reason=None if request else decision,
        cursor=json.dumps(cursor),
        asset_events=observations,
    )


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="minutes")


@dg.sensor(
    job=retraining_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="The retraining policy: one retraining_job run for all drifted drift reports "
    "since the last successful retraining (training on every labelled batch among them), never "
    "while one runs, a cooldown from the last success, and an action recorded on every report.",
)
def drift_retraining_sensor(
    context: dg.SensorEvaluationContext, mlflow: MLflowResource
) -> dg.SensorResult:
    return evaluate_retraining(context, mlflow)


@dg.sensor(
    job=rollout_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Advances a staged rollout without a human: when the running stage has the "
    "traffic its gates need, launches rollout_job, which judges the stage and moves to the next "
    "one, promotes, or rolls back.",
)
def rollout_sensor(
    context: dg.SensorEvaluationContext, mlflow: MLflowResource, triton: TritonResource
) -> dg.SensorResult:
    from cifar_assets.serving.gates import judge_stage
    from cifar_assets.serving.rollout import FIXED

    mlflow.end_orphaned_runs(context.instance, context.log)
    server = triton.server_config()
    state = rollout_for(mlflow, server).state()
    if state.stage in (None, FIXED):
        return dg.SensorResult(skip_reason="No staged rollout is running.")
    active = context.instance.get_runs(
        filters=dg.RunsFilter(job_name=rollout_job.name, statuses=ACTIVE_STATUSES), limit=1
    )
    if active:
        return dg.SensorResult(skip_reason=f"rollout_job run {active[0].run_id} is judging.")
    judgement = judge_stage(state, server.capture_dir)
    if judgement.action == "hold":
        return dg.SensorResult(skip_reason=f"{judgement.stage}: {judgement.reason}")
    context.log.info(f"{judgement.stage}: {judgement.action} ({judgement.reason})")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"rollout-v{state.challenger}-{state.stage}-{state.stage_started}",
                tags={"cifar/stage": judgement.stage, "cifar/verdict": judgement.action},
            )
        ]
    )
