"""Every job of the code location through `dagster job execute`, as a user runs them, one after the
other on one instance, one MLflow store and one real Triton:

data_job on an image folder with unequal classes and mixed formats; main_job with the
quickstart's config (v1, champion, served) and again with a smaller recipe (v2: the gate keeps
the champion, so v2 serves as challenger); drift_check_job on a dropped batch; retraining_job
with the run config the drift sensor builds (v3 replaces v2 as challenger); promotion_job and
rollback_job; rollout_job. The job list comes from the definitions: a job added without a run here fails.
After every job, MLflow's aliases, Triton's live versions and the router's weights agree.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from tests.conftest import PROJECT_ROOT, subprocess_env, wait_for_capture, whole_state
from tests.loop import job_execute
from tests.serving_fixtures import copy_repository, free_ports

SMALL_RECIPE = {
    "cifar10_raw": {"config": {"source": "synthetic", "num_images": 800, "seed": 1}},
    "trained_model": {"config": {"stem": "imagenet", "epochs": 1, "batch_size": 64}},
    "onnx_model": {"config": {"parity_images": 64, "calibration_images": 64}},
    "drift_baseline": {"config": {"reference_images": 100}},
}
JOBS_RUN_HERE = [
    "data_job",
    "main_job",
    "drift_check_job",
    "retraining_job",
    "promotion_job",
    "rollback_job",
    "rollout_job",
]


def execute(env: dict[str, str], job: str, config: Path | None = None, *extra: str) -> str:
    command = [str(PROJECT_ROOT / "scripts" / "dagster"), *job_execute(job, config, *extra)]
    result = subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        env=subprocess_env(env),
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def config_file(folder: Path, name: str, ops: dict[str, Any]) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"ops": ops}))
    return path


def latest_run(home: str) -> dg.DagsterRun:
    with dg.DagsterInstance.from_config(home) as instance:
        (run,) = instance.get_runs(limit=1)
        return run


def image_folder(root: Path) -> Path:
    """All ten classes with 18 to 60 images each, PNG and JPEG, RGB, greyscale, other sizes."""
    from cifar_assets.data.imageset import CLASSES
    from cifar_assets.data.synthetic import generate_synthetic

    images = generate_synthetic(800, seed=7)
    counts = dict(zip(CLASSES, (40, 25, 60, 31, 18, 22, 35, 28, 45, 20), strict=True))
    for name, count in counts.items():
        folder = root / name
        folder.mkdir(parents=True)
        indices = np.flatnonzero(images.labels == CLASSES.index(name))[:count]
        for i, index in enumerate(indices):
            picture = Image.fromarray(images.images[index])
            if i % 4 == 0:
                picture.resize((64, 48)).save(folder / f"photo_{i}.jpeg", quality=90)
            elif i % 4 == 1:
                picture.convert("L").save(folder / f"scan_{i}.png")
            else:
                picture.save(folder / f"img_{i}.PNG")
    return root


@pytest.fixture
def serving_env(project_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    http, grpc, metrics = free_ports(3)
    env = project_env | {
        "TRITON_HTTP_PORT": str(http),
        "TRITON_GRPC_PORT": str(grpc),
        "TRITON_METRICS_PORT": str(metrics),
        "CIFAR_PROGRESS_BAR": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    copy_repository(Path(env["TRITON_MODEL_REPOSITORY"]))
    return env


@pytest.mark.slow
def test_every_job_runs_through_dagster_job_execute(
    serving_env: dict[str, str], tmp_path: Path
) -> None:
    from cifar_assets.definitions import defs
    from cifar_assets.serving.launcher import TritonConfig, stop_server

    jobs = sorted(j.name for j in defs.resolve_all_job_defs() if not j.name.startswith("__"))
    assert jobs == sorted(JOBS_RUN_HERE), "every job needs its `dagster job execute` below"
    try:
        run_every_job(serving_env, tmp_path)
    finally:
        stop_server(TritonConfig.from_settings())


def run_every_job(env: dict[str, str], tmp_path: Path) -> None:
    from cifar_assets.data.corruptions import corrupt
    from cifar_assets.data.imageset import save_npz
    from cifar_assets.data.synthetic import generate_synthetic
    from cifar_assets.ml.registry import Registry
    from cifar_assets.sensors import retraining_run_config
    from cifar_assets.serving.client import infer
    from cifar_assets.serving.launcher import TritonConfig
    from cifar_assets.settings import get_settings

    home = env["DAGSTER_HOME"]
    settings = get_settings()

    # data_job on real-shaped data: an image folder with unequal classes and mixed formats.
    folder = image_folder(tmp_path / "photos")
    # Its classes differ by up to 85% from the mean: allowed knowingly, as a user would.
    data_config = {
        "cifar10_raw": {"config": {"source": "image_folder", "image_folder": str(folder)}},
        "validation_report_class_balance_check": {"config": {"tolerance": 0.9}},
    }
    execute(env, "data_job", config_file(tmp_path, "data", data_config))
    with dg.DagsterInstance.from_config(home) as instance:
        raw = instance.get_latest_materialization_event(dg.AssetKey("cifar10_raw"))
        assert raw is not None and raw.asset_materialization is not None
        assert raw.asset_materialization.metadata["num_images"].value == 324
        key = dg.AssetCheckKey(dg.AssetKey("validation_report"), "class_balance_check")
        (record,) = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [key]
        ).values()
        evaluation = record.event.dagster_event.event_specific_data  # type: ignore[union-attr]
        # Unequal but within the tolerance given; the too-small classes are named, not fatal.
        assert evaluation.metadata["unbalanced_classes"].value == 0
        assert evaluation.metadata["max_relative_deviation"].value > 0.5
        assert "(train " in evaluation.metadata["too_small_class_sizes"].value

    # main_job with the quickstart's config: v1, champion, served, answering.
    execute(env, "main_job", PROJECT_ROOT / "configs" / "quickstart.yaml")
    run = latest_run(home)
    assert run.status == dg.DagsterRunStatus.SUCCESS
    with dg.DagsterInstance.from_config(home) as instance:
        messages = [entry.user_message for entry in instance.all_logs(run.run_id)]
        # Long steps report progress in the run log.
        assert any(m.startswith("features of ") and " images in " in m for m in messages)
        assert any(m.startswith("predictions: ") for m in messages)
        assert any(m.startswith("epoch 1/") for m in messages)
        evaluation = instance.get_latest_materialization_event(dg.AssetKey("model_evaluation"))
        accuracy = evaluation.asset_materialization.metadata["accuracy"].value  # type: ignore[union-attr]
        assert accuracy > 0.2  # ten classes: chance is 0.1
    expected_v1 = {"champion": 1, "challenger": None, "weights": {1: 1.0}, "live": [1]}
    assert whole_state() == expected_v1 | {"ready": [1], "problems": []}
    v1_data = stored_splits(home)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    logits = infer(images, url=TritonConfig.from_settings().http_url, version=1)
    assert logits.shape == (4, 10) and np.isfinite(logits).all()

    # main_job again with a smaller recipe: the gate keeps v1, so v2 serves as challenger only.
    execute(env, "main_job", config_file(tmp_path, "small", SMALL_RECIPE))
    assert Registry(settings.mlflow_tracking_uri).version(2).tags["gate.decision"] == (
        "not promoted"
    )
    assert whole_state() == {
        "champion": 1,
        "challenger": 2,
        "weights": {1: 0.9, 2: 0.1},
        "live": [1, 2],
        "ready": [1, 2],
        "problems": [],
    }

    check_data_versions(env, v1_data, stored_splits(home))

    # drift_check_job on a dropped, labelled, corrupted batch: the champion's detectors.
    batch = generate_synthetic(300, seed=99)
    save_npz(
        settings.incoming_dir / "noisy.npz",
        {"images": corrupt(batch.images, "gaussian_noise", 5), "labels": batch.labels},
    )
    with dg.DagsterInstance.from_config(home) as instance:
        instance.add_dynamic_partitions("incoming_batches", ["noisy"])
    execute(env, "drift_check_job", None, "--tags", json.dumps({"dagster/partition": "noisy"}))
    with dg.DagsterInstance.from_config(home) as instance:
        report = instance.get_latest_materialization_event(dg.AssetKey("drift_report"))
        assert report is not None and report.asset_materialization is not None
        metadata = report.asset_materialization.metadata
        assert metadata["drift"].value is True and metadata["labelled"].value is True
        assert metadata["model_version"].value == 1  # the champion, not the newest v2
        run = instance.get_runs(limit=1)[0]
        messages = [entry.user_message for entry in instance.all_logs(run.run_id)]
        assert any(m.startswith("MMD permutation test (300 images): done in ") for m in messages)
        assert "drift_overview" in metadata and "mlflow_run" in metadata
    # The check is also an MLflow run, with its figures and pictures, beside the training runs.
    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("monitoring/" + settings.registered_model_name)
    assert experiment is not None
    (check,) = client.search_runs([experiment.experiment_id], "tags.batch = 'noisy'")
    assert check.data.metrics["drift"] == 1.0 and check.data.metrics["score"] > 0.95
    assert check.data.tags["kind"] == "drift_report" and check.data.tags["model_version"] == "1"
    logged = {artifact.path for artifact in client.list_artifacts(check.info.run_id)}
    assert {"report.json", "drift_overview.png", "moved_features.png"} <= logged

    # retraining_job with the run config the drift sensor builds: v3 replaces v2 as challenger.
    recipe = retraining_run_config(["noisy"], 0.2, {"ops": SMALL_RECIPE})
    execute(env, "retraining_job", config_file(tmp_path, "retraining", recipe["ops"]))
    assert whole_state() == {
        "champion": 1,
        "challenger": 3,
        "weights": {1: 0.8, 3: 0.2},
        "live": [1, 3],
        "ready": [1, 3],
        "problems": [],
    }

    # promotion_job: the A/B report from traffic, then a forced promotion with its reason.
    from cifar_assets.serving.client import infer_ab

    url = TritonConfig.from_settings().http_url
    answers = [
        infer_ab(batch.images[user : user + 1], user_id=f"u{user}", url=url) for user in range(60)
    ]
    wait_for_capture(settings.capture_dir, [answer.request_id for answer in answers])
    # rollout_job: the A/B report as rollout_sensor launches it (no staged rollout runs here,
    # so it reports and moves nothing).
    execute(env, "rollout_job")
    with dg.DagsterInstance.from_config(home) as instance:
        report = instance.get_latest_materialization_event(dg.AssetKey("ab_test_report"))
        assert report is not None and report.asset_materialization is not None
        assert report.asset_materialization.metadata["control"].value == 1
        assert report.asset_materialization.metadata["treatment"].value == 3
        assert "stage" not in report.asset_materialization.metadata
    assert whole_state()["weights"] == {1: 0.8, 3: 0.2}
    promote = {"apply_ab_outcome": {"config": {"action": "promote", "reason": "manual review"}}}
    execute(env, "promotion_job", config_file(tmp_path, "promote", promote))
    assert whole_state() == {
        "champion": 3,
        "challenger": None,
        "weights": {3: 1.0},
        "live": [3],
        "ready": [3],
        "problems": [],
    }

    rollback = {"rollback_champion": {"config": {"reason": "v3 misbehaves"}}}
    execute(env, "rollback_job", config_file(tmp_path, "rollback", rollback))
    assert whole_state() == expected_v1 | {"ready": [1], "problems": []}

    with dg.DagsterInstance.from_config(home) as instance:
        runs = instance.get_runs()
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        executed = {r.job_name for r in runs}
    assert set(JOBS_RUN_HERE) <= executed
    check_retention(env, v1_data)


def stored_splits(home: str) -> tuple[str, str, Any]:
    """The cifar10_splits just materialized: its data version in Dagster (checked equal to the
    stored record's), the sha256 of its stored file, and its value."""
    import hashlib

    from cifar_assets.settings import get_settings
    from cifar_assets.storage import AssetStore

    store = AssetStore(get_settings().asset_store)
    record = store.latest("cifar10_splits")
    assert record is not None
    with dg.DagsterInstance.from_config(home) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("cifar10_splits"))
        assert event is not None and event.asset_materialization is not None
        assert event.asset_materialization.tags["dagster/data_version"] == record.version  # type: ignore[index]
        assert record.run_id == event.run_id
    digest = hashlib.sha256(Path(store.location(record.object)).read_bytes()).hexdigest()
    return record.version, digest, store.read(record)


def storage_command(env: dict[str, str], *args: str) -> Any:
    result = subprocess.run(
        [str(PROJECT_ROOT / ".venv" / "bin" / "cifar-storage"), "--json", *args],
        env=subprocess_env(env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout)


def same_splits(a: Any, b: Any) -> bool:
    return all(
        np.array_equal(getattr(x, field), getattr(y, field))
        for (_, x), (_, y) in zip(a.items(), b.items(), strict=True)
        for field in ("images", "labels", "ids", "origins")
    )


def check_data_versions(
    env: dict[str, str], v1: tuple[str, str, Any], v2: tuple[str, str, Any]
) -> None:
    """v2 trained on new data (another seed); v1's training data still reads back byte for byte
    by model version, and the diff of the two data versions is right."""
    from cifar_assets import api

    (v1_version, v1_sha, v1_splits), (v2_version, _, v2_splits) = v1, v2
    assert v1_version != v2_version
    for model_version, (version, splits) in {
        1: (v1_version, v1_splits),
        2: (v2_version, v2_splits),
    }.items():
        assert same_splits(api.training_data(model_version), splits)
        assert storage_command(env, "training-data", str(model_version))["version"] == version
    assert stored_sha(v1_version) == v1_sha  # the file itself is untouched
    parts = storage_command(env, "diff", "cifar10_splits", v1_version, v2_version)
    assert [p["name"] for p in parts] == ["train", "validation", "test"]
    for part, (name, before), (_, after) in zip(
        parts, v1_splits.items(), v2_splits.items(), strict=True
    ):
        assert part["images_before"] == len(before) and part["images_after"] == len(after), name
        assert part["class_counts_before"] == before.class_counts()
        assert part["class_counts_after"] == after.class_counts()
        assert set(part["added_ids"]) == set(after.ids.tolist()) - set(before.ids.tolist())
        assert set(part["removed_ids"]) == set(before.ids.tolist()) - set(after.ids.tolist())


def stored_sha(version: str) -> str:
    import hashlib

    from cifar_assets.settings import get_settings
    from cifar_assets.storage import AssetStore

    store = AssetStore(get_settings().asset_store)
    record = store.find("cifar10_splits", version)
    return hashlib.sha256(Path(store.location(record.object)).read_bytes()).hexdigest()


def check_retention(env: dict[str, str], v1: tuple[str, str, Any]) -> None:
    """gc keeps what registered versions refer to and the live values; it drops data_job's splits
    (no model trained on them), first in a dry run that deletes nothing."""
    from cifar_assets import api
    from cifar_assets.settings import get_settings
    from cifar_assets.storage import AssetStore

    store = AssetStore(get_settings().asset_store)
    splits = store.history("cifar10_splits")
    image_folder_splits = splits[0].version  # data_job's, on the photo folder
    assert len(splits) == 4  # data_job, main_job twice, retraining_job
    dry = storage_command(env, "gc", "--keep-last", "1", "--dry-run")
    dropped = {(d["asset"], d["version"]) for d in dry["dropped"]}
    assert ("cifar10_splits", image_folder_splits) in dropped
    assert not {v for a, v in dropped if a == "cifar10_splits"} & {v1[0]}
    assert len(store.history("cifar10_splits")) == 4, "a dry run deletes nothing"
    done = storage_command(env, "gc", "--keep-last", "1")
    assert done["freed_bytes"] > 0 and not done["dry_run"]
    assert [r.version for r in store.history("cifar10_splits")] == [s.version for s in splits[1:]]
    assert same_splits(api.training_data(1), v1[2]) and stored_sha(v1[0]) == v1[1]
    for model_version in (2, 3):
        api.training_data(model_version)  # still there
