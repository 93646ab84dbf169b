"""`dagster job execute` of the data job in a subprocess, against a real temporary instance."""

from __future__ import annotations

import subprocess
from pathlib import Path

import dagster as dg
import yaml

from tests.conftest import PROJECT_ROOT, subprocess_env

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
        [
            str(PROJECT_ROOT / ".venv" / "bin" / "dagster"),
            "job",
            "execute",
            "-m",
            "cifar_assets.definitions",
            "-j",
            "data_job",
            "-c",
            str(config_file),
        ],
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
