"""Schedules: the daily drift check over the traffic captured since the previous check."""

from datetime import timedelta

import dagster as dg

from cifar_assets.assets.monitoring_assets import INCOMING_PARTITIONS
from cifar_assets.jobs import drift_check_job


@dg.schedule(
    job=drift_check_job,
    cron_schedule="0 6 * * *",
    execution_timezone="UTC",
    description="Every day at 06:00 UTC: a drift check over the images the A/B router captured "
    "in the 24 hours before (partition capture-<since>-<until>).",
)
def daily_drift_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    from cifar_assets.drift.incoming import capture_window_key, count_captured
    from cifar_assets.settings import get_settings

    until = context.scheduled_execution_time
    since = until - timedelta(days=1)
    captured = count_captured(get_settings().capture_dir, since, until)
    if captured == 0:
        return dg.SkipReason(
            f"No captured images between {since.isoformat()} and {until.isoformat()}."
        )
    key = capture_window_key(since, until)
    context.instance.add_dynamic_partitions(INCOMING_PARTITIONS, [key])
    return dg.RunRequest(run_key=key, partition_key=key, tags={"captured_images": str(captured)})
