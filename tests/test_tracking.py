"""cifar_assets.ml.tracking against a real sqlite MLflow store: runs always end with the right
status (their nested runs too), logged values read back, orphaned runs are cleaned up."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from cifar_assets.ml.tracking import (
    PARENT_RUN_TAG,
    all_pages,
    client_for,
    default_artifact_location,
    end_runs_of_ended_dagster_runs,
    ensure_experiment,
    log_artifact,
    log_epoch_metrics,
    log_params,
    monitoring_experiment,
    run_url,
    tracking_run,
)

EXPERIMENT = "tracking-tests"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One sqlite store for the module (creating its schema takes seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    yield uri
    client = client_for(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    assert [run.info.run_id for run in running] == [], "a test left a run RUNNING"


def _run_status(uri: str, run_id: str) -> str:
    return str(client_for(uri).get_run(run_id).info.status)


def _children(uri: str, run_id: str) -> list[str]:
    client = client_for(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{run_id}'")
    return [run.info.run_id for run in runs]


def test_successful_run_finishes_with_tags_params_metrics_and_artifacts(
    store: str, tmp_path: Path
) -> None:
    report = tmp_path / "report.txt"
    report.write_text("accuracy 0.5\n")
    tags = {"dagster_run_id": "abc-123", "dagster_asset_key": "trained_model"}
    with tracking_run(store, EXPERIMENT, "train", tags) as run_id:
        assert _run_status(store, run_id) == "RUNNING"
        log_params(store, run_id, {"epochs": 2, "lr": 0.1})
        log_epoch_metrics(store, run_id, 0, {"loss": 2.0, "accuracy": 0.25})
        log_epoch_metrics(store, run_id, 1, {"loss": 1.5, "accuracy": 0.5})
        artifact_uri = log_artifact(store, run_id, report, "reports")
        mlflow.log_metric("fluent_metric", 7.0)  # fluent calls in the body reach this run

    client = client_for(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "train"
    assert run.data.tags["dagster_run_id"] == "abc-123"
    assert run.data.tags["dagster_asset_key"] == "trained_model"
    assert run.data.params == {"epochs": "2", "lr": "0.1"}
    history = client.get_metric_history(run_id, "accuracy")
    assert [(metric.step, metric.value) for metric in history] == [(0, 0.25), (1, 0.5)]
    assert run.data.metrics["fluent_metric"] == 7.0
    assert [item.path for item in client.list_artifacts(run_id, "reports")] == [
        "reports/report.txt"
    ]
    # Artifacts sit beside the database, not in ./mlruns of the current directory.
    store_dir = Path(store.removeprefix("sqlite:///")).parent
    assert artifact_uri.startswith((store_dir / "artifacts").as_uri())
    assert Path(artifact_uri.removeprefix("file://")).read_text() == "accuracy 0.5\n"
    assert run_url(store, run_id) == (
        f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    )
    assert mlflow.active_run() is None


def test_exception_fails_the_run_and_every_run_nested_in_it(store: str) -> None:
    global_uri = mlflow.get_tracking_uri()
    with (
        pytest.raises(ValueError, match="diverged"),
        tracking_run(store, EXPERIMENT, "crashes", {"case": "exception"}) as run_id,
    ):
        mlflow.start_run(run_name="fold-0", nested=True)  # fluent child, never ended
        client = client_for(store)
        orphan = client.create_run(
            client.get_run(run_id).info.experiment_id, tags={PARENT_RUN_TAG: run_id}
        )
        client.create_run(  # grandchild via the client, also left open
            orphan.info.experiment_id, tags={PARENT_RUN_TAG: orphan.info.run_id}
        )
        raise ValueError("loss diverged")

    assert _run_status(store, run_id) == "FAILED"
    children = _children(store, run_id)
    assert len(children) == 2
    grandchildren = [child for parent in children for child in _children(store, parent)]
    assert len(grandchildren) == 1
    assert {_run_status(store, run) for run in children + grandchildren} == {"FAILED"}
    assert mlflow.active_run() is None
    assert mlflow.get_tracking_uri() == global_uri


def test_keyboard_interrupt_kills_the_run(store: str) -> None:
    with (
        pytest.raises(KeyboardInterrupt),
        tracking_run(store, EXPERIMENT, "interrupted", {}) as run_id,
    ):
        raise KeyboardInterrupt
    assert _run_status(store, run_id) == "KILLED"


def test_body_that_ends_its_own_run_still_gets_the_true_status(store: str) -> None:
    with (
        pytest.raises(RuntimeError),
        tracking_run(store, EXPERIMENT, "ends-itself", {}) as run_id,
    ):
        mlflow.end_run()  # marks FINISHED, then the body fails
        raise RuntimeError("after end_run")
    assert _run_status(store, run_id) == "FAILED"


def test_runs_of_ended_dagster_runs_are_failed_with_the_reason(store: str) -> None:
    client: MlflowClient = client_for(store)
    with tracking_run(store, EXPERIMENT, "finished", {"dagster_run_id": "dead"}) as finished_id:
        pass
    experiment_id = client.get_run(finished_id).info.experiment_id
    # A process killed mid-run leaves these RUNNING.
    orphan = client.create_run(experiment_id, tags={"dagster_run_id": "dead"})
    nested = client.create_run(experiment_id, tags={PARENT_RUN_TAG: orphan.info.run_id})
    other = client.create_run(experiment_id, tags={"dagster_run_id": "alive"})
    # The monitoring experiment's runs are swept in the same call.
    monitoring_id = ensure_experiment(store, monitoring_experiment("cifar"))
    monitoring = client.create_run(monitoring_id, tags={"dagster_run_id": "dead"})
    statuses = {"dead": "FAILURE", "alive": None}
    experiments = [EXPERIMENT, monitoring_experiment("cifar"), "no-such-experiment"]

    ended = end_runs_of_ended_dagster_runs(store, experiments, statuses.get)

    reason = "Dagster run dead ended FAILURE while this MLflow run was still RUNNING"
    swept = [orphan.info.run_id, nested.info.run_id, monitoring.info.run_id]
    assert sorted(ended) == sorted(swept)
    assert all(text.startswith(reason) for text in ended.values())
    for run_id in swept:
        assert client.get_run(run_id).data.tags["ended_reason"].startswith(reason)
        assert _run_status(store, run_id) == "FAILED"
    assert _run_status(store, finished_id) == "FINISHED"
    assert _run_status(store, other.info.run_id) == "RUNNING"
    assert end_runs_of_ended_dagster_runs(store, ["no-such-experiment"], statuses.get) == {}
    # Its Dagster run ends: the next call ends it too.
    statuses["alive"] = "SUCCESS"
    assert list(end_runs_of_ended_dagster_runs(store, experiments, statuses.get)) == [
        other.info.run_id
    ]


def test_user_errors_say_what_and_where(store: str, tmp_path: Path) -> None:
    with tracking_run(store, EXPERIMENT, "errors", {}) as run_id:
        log_params(store, run_id, {"lr": 0.1})
        with pytest.raises(ValueError, match=rf"run {run_id}.*new run"):
            log_params(store, run_id, {"lr": 0.2})
        with pytest.raises(ValueError, match=r"'loss'=.*step 3"):
            log_epoch_metrics(store, run_id, 3, {"loss": "nan-ish"})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="infinite"):
            log_epoch_metrics(store, run_id, 3, {"loss": float("inf")})
        missing = tmp_path / "missing.onnx"
        with pytest.raises(FileNotFoundError, match=r"missing\.onnx"):
            log_artifact(store, run_id, missing)
    assert _run_status(store, run_id) == "FINISHED"


def test_default_artifact_location(tmp_path: Path) -> None:
    database = tmp_path / "mlflow.db"
    assert default_artifact_location(f"sqlite:///{database}", "cifar 10/exp") == (
        (tmp_path / "artifacts" / "cifar_10_exp").as_uri()
    )
    assert default_artifact_location(
        f"sqlite:///{database}", "exp", root=tmp_path / "var" / "artifacts"
    ) == ((tmp_path / "var" / "artifacts" / "exp").as_uri())
    assert default_artifact_location("http://mlflow.internal:5000", "exp") is None


def test_tracking_run_leaves_the_tracking_uri_variable_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with tracking_run(uri, "env-check", "r", {}) as run_id:
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == uri
    assert run_url(uri, run_id).endswith(run_id)


def test_all_pages_follows_page_tokens_to_the_end() -> None:
    from mlflow.store.entities.paged_list import PagedList

    pages = {None: PagedList([1, 2], "b"), "b": PagedList([3], "c"), "c": PagedList([], None)}
    asked: list[str | None] = []

    def search(token: str | None) -> PagedList[int]:
        asked.append(token)
        return pages[token]

    assert all_pages(search) == [1, 2, 3]
    assert asked == [None, "b", "c"]


def test_fluent_nested_runs_land_in_the_runs_experiment_and_variables_are_restored(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    with tracking_run(store, EXPERIMENT, "parent", {}) as run_id:
        child = mlflow.start_run(run_name="child", nested=True)
        mlflow.end_run()
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ
    client = client_for(store)
    assert client.get_run(child.info.run_id).info.experiment_id == (
        client.get_run(run_id).info.experiment_id
    )
    assert _children(store, run_id) == [child.info.run_id]
