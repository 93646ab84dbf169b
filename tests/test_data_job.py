"""`dagster job execute` of the data job in a subprocess, against a real temporary instance."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import dagster as dg
import yaml

from tests.conftest import PROJECT_ROOT, subprocess_env
from tests.loop import job_execute

CONFIG = {
    "ops": {
        "cifar10_raw": {"config": {"source": "synthetic", "num_images": 600, "seed": 3}},
    }
}


def test_data_job_runs_and_records_materializations_and_checks(
    project_env: dict[str, str], tmp_path: Path
) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(CONFIG))
    result = subprocess.run(
        [str(PROJECT_ROOT / ".venv" / "bin" / "dagster"), *job_execute("data_job", config_file)],
        cwd=PROJECT_ROOT,
        env=subprocess_env(project_env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    with dg.DagsterInstance.from_config(project_env["DAGSTER_HOME"]) as instance:
        runs = instance.get_runs()
        assert len(runs) == 1 and runs[0].status == dg.DagsterRunStatus.SUCCESS
        for name in ("cifar10_raw", "cifar10_splits", "validation_report", "image_features"):
            event = instance.get_latest_materialization_event(dg.AssetKey(name))
            assert event is not None, f"{name} was not materialized"
        raw = instance.get_latest_materialization_event(dg.AssetKey("cifar10_raw"))
        assert raw.asset_materialization.metadata["num_images"].value == 600
        records = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey("validation_report"), "leakage_check"), limit=5
        )
        assert records and records[0].status.value == "SUCCEEDED"


def execute_data_job(
    env: dict[str, str], config: dict, config_file: Path
) -> subprocess.CompletedProcess[str]:
    """`dagster job execute` through scripts/dagster, as a user runs it."""
    config_file.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [str(PROJECT_ROOT / "scripts" / "dagster"), *job_execute("data_job", config_file)],
        cwd=PROJECT_ROOT,
        env=subprocess_env(env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_data_job_on_an_unequal_image_folder_gives_verdicts_not_crashes(
    project_env: dict[str, str], tmp_path: Path
) -> None:
    """7/3/12 images per class: the class-balance check fails cleanly (blocking, ERROR) with the
    default tolerance, and warns (WARN, not blocking) on the tiny held-out classes when the
    tolerance admits the imbalance. Before the fix it crashed on a numpy.float64 in its metadata."""
    from tests.test_validation_image_folders import UNEQUAL_COUNTS, build_folder

    build_folder(tmp_path / "images", UNEQUAL_COUNTS)
    raw = {"config": {"source": "image_folder", "image_folder": str(tmp_path / "images")}}
    strict = execute_data_job(project_env, {"ops": {"cifar10_raw": raw}}, tmp_path / "strict.yaml")
    tolerant_config = {
        "ops": {
            "cifar10_raw": raw,
            "validation_report_class_balance_check": {"config": {"tolerance": 0.9}},
        }
    }
    tolerant = execute_data_job(project_env, tolerant_config, tmp_path / "tolerant.yaml")
    assert "SerializationError" not in strict.stdout + strict.stderr
    assert strict.returncode != 0  # a blocking check failed: the run failed, as it should
    assert tolerant.returncode == 0, tolerant.stdout[-3000:] + tolerant.stderr[-3000:]

    key = dg.AssetCheckKey(dg.AssetKey("validation_report"), "class_balance_check")
    with dg.DagsterInstance.from_config(project_env["DAGSTER_HOME"]) as instance:
        runs = list(reversed(instance.get_runs()))  # oldest first: strict, then tolerant
        assert [run.status for run in runs] == [
            dg.DagsterRunStatus.FAILURE,
            dg.DagsterRunStatus.SUCCESS,
        ]
        history = instance.event_log_storage.get_asset_check_execution_history(key, limit=5)
        by_run = {record.run_id: record for record in history}
        verdicts = []
        for run in runs:
            record = by_run[run.run_id]
            assert record.status.value == "FAILED"  # a verdict; a crash reads EXECUTION_FAILED
            evaluation = record.event.dagster_event.event_specific_data  # type: ignore[union-attr]
            verdicts.append(evaluation.severity.value)
            metadata = {name: value.value for name, value in evaluation.metadata.items()}
            assert metadata["classes_too_small"] == 10
            assert metadata["train_min_class_count"] == 1
            assert metadata["train_max_class_count"] == 10
            assert metadata["max_relative_deviation"] == round((10 - 5.3) / 5.3, 4)
            assert "bird: 12 image(s) (train 10, validation 1, test 1)" in metadata["summary"]
        assert verdicts == ["ERROR", "WARN"]

        # the strict run stopped before image_features; the tolerant run went through
        materialized = [
            {
                entry.dagster_event.asset_key.to_user_string()  # type: ignore[union-attr]
                for entry in instance.all_logs(
                    run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
                )
            }
            for run in runs
        ]
        assert materialized[0] == {"cifar10_raw", "cifar10_splits", "validation_report"}
        assert "image_features" in materialized[1]
        splits = instance.get_latest_materialization_event(dg.AssetKey("cifar10_splits"))
        too_small = splits.asset_materialization.metadata["classes_too_small"].value  # type: ignore[union-attr]
        assert str(too_small).startswith("10 class(es) too small to split")
        assert "automobile: 3 image(s) (train 1, validation 1, test 1)" in str(too_small)
        warnings = [
            entry.user_message
            for entry in instance.all_logs(runs[1].run_id)
            if entry.level == logging.WARNING and "too small to split" in entry.user_message
        ]
        assert len(warnings) == 1 and warnings[0].startswith(
            f"image_folder:{(tmp_path / 'images').resolve()}: "
        )
