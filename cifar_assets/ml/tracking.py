"""MLflow experiment tracking as plain functions: one run per training, always ended properly.

``tracking_run`` creates the experiment if needed, starts a run tagged with its caller (for
example the Dagster run id and asset key) and guarantees that neither it nor any run started
inside it is left RUNNING: FINISHED on success, FAILED on an exception, KILLED on an interrupt.
Every function takes the tracking URI explicitly and builds its own ``MlflowClient``; the
process-wide tracking URI is switched only inside ``tracking_run`` (so that fluent ``mlflow.*``
calls in its body reach the same store) and inside ``scoped_tracking_uri`` blocks, and restored
afterwards.

mlflow is imported inside the functions: this module is imported by Dagster asset modules, and
importing mlflow costs about 4 s in every step process.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.store.entities.paged_list import PagedList

LOCAL_UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local (sqlite/file) store
PARENT_RUN_TAG = "mlflow.parentRunId"
MONITORING_EXPERIMENT_PREFIX = "monitoring/"  # + the registered model name
T = TypeVar("T")
_BATCH_LIMIT = 100  # MLflow's log_batch accepts at most 100 params and 1000 metrics per call


def client_for(tracking_uri: str) -> MlflowClient:
    """A client whose registry is the tracking store itself, whatever MLFLOW_REGISTRY_URI says,
    so that runs and the model versions made from them always live in the same database."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@contextmanager
def scoped_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``tracking_uri`` for the block, then restore the previous URI.

    Needed because some MLflow 3 calls (logging a model, registering a logged model, loading
    ``models:/`` URIs) resolve the process-wide URI internally. MLflow has no public scoped
    setter, so this pairs ``mlflow.get_tracking_uri`` with ``mlflow.set_tracking_uri``. The
    previous URI comes back as the value it resolved to, so after the first block the fluent API
    keeps that URI even if ``MLFLOW_TRACKING_URI`` changes later; the project passes URIs
    explicitly and calls the fluent API only inside these blocks.
    """
    import mlflow

    # MLflow's setter also writes MLFLOW_TRACKING_URI into os.environ: the project reads that
    # variable (settings), so it is put back exactly as it was, unset included.
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def default_artifact_location(
    tracking_uri: str, experiment_name: str, root: Path | None = None
) -> str | None:
    """Where a new experiment keeps its artifacts when the caller gives no location.

    For a sqlite store: ``<root>/<experiment name>``, with ``root`` defaulting to ``artifacts/``
    beside the database file, because MLflow's own default is ``./mlruns`` relative to whatever
    the current directory happens to be. For other stores (a tracking server), None lets the
    server decide.
    """
    parsed = urlparse(tracking_uri)
    # sqlite:///relative.db and sqlite:////absolute.db: the path follows the third slash.
    if parsed.scheme != "sqlite" or len(parsed.path) < 2:
        return None
    if root is None:
        root = Path(unquote(parsed.path[1:])).resolve().parent / "artifacts"
    # Distinct names may share a folder after this; harmless, since run and model ids are unique.
    folder = re.sub(r"[^A-Za-z0-9._-]", "_", experiment_name)
    return (root.resolve() / folder).as_uri()


def ensure_experiment(
    tracking_uri: str, experiment_name: str, artifact_location: str | None = None
) -> str:
    """The id of ``experiment_name``, created (with ``artifact_location``, or the default above)
    if it does not exist yet."""
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        location = artifact_location or default_artifact_location(tracking_uri, experiment_name)
        try:
            return client.create_experiment(experiment_name, artifact_location=location)
        except MlflowException as exc:
            # Another process created it between our lookup and our create: use theirs.
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(experiment_name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise RuntimeError(
            f"MLflow experiment {experiment_name!r} in {tracking_uri} is deleted. Restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or use "
            "another experiment name."
        )
    return str(experiment.experiment_id)


def _status_for(error: BaseException | None) -> str:
    if error is None:
        return "FINISHED"
    if isinstance(error, Exception):
        return "FAILED"
    # KeyboardInterrupt, SystemExit and Dagster's interruption errors derive from BaseException.
    return "KILLED"


def all_pages(search: Callable[[str | None], PagedList[T]]) -> list[T]:
    """Every item of a paged MLflow search: ``search(page_token)`` returns one page (a
    ``PagedList`` whose ``token`` names the next page, empty after the last one)."""
    items: list[T] = []
    page_token = None
    while True:
        page = search(page_token)
        items.extend(page)
        page_token = page.token
        if not page_token:
            return items


def search_all_runs(
    client: MlflowClient, experiment_ids: list[str], filter_string: str
) -> list[Run]:
    """All runs matching ``filter_string``, across result pages."""
    return all_pages(
        lambda page_token: client.search_runs(
            experiment_ids, filter_string=filter_string, max_results=1000, page_token=page_token
        )
    )


def _end_running_descendants(client: MlflowClient, run: Run, status: str) -> list[str]:
    """End every still-RUNNING run below ``run`` (children, grandchildren, ...)."""
    ended: list[str] = []
    parents = [run.info.run_id]
    # Code in the body may have started children in another experiment.
    experiment_ids = [experiment.experiment_id for experiment in client.search_experiments()]
    while parents:
        parent = parents.pop()
        children = search_all_runs(client, experiment_ids, f"tags.`{PARENT_RUN_TAG}` = '{parent}'")
        for child in children:
            parents.append(child.info.run_id)
            if child.info.status == "RUNNING":
                client.set_terminated(child.info.run_id, status)
                ended.append(child.info.run_id)
    return ended


@contextmanager
def _default_experiment(experiment_id: str) -> Iterator[None]:
    """Make ``experiment_id`` the fluent API's default experiment for the block, through the
    documented ``MLFLOW_EXPERIMENT_ID`` variable, then restore the variable exactly.

    Without this, ``mlflow.start_run(nested=True)`` in the body would put children in the
    Default experiment. An experiment the caller chose with ``mlflow.set_experiment`` takes
    precedence over the variable; children then land there and still end with the run.
    """
    saved = os.environ.get("MLFLOW_EXPERIMENT_ID")
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = saved


@contextmanager
def tracking_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    tags: Mapping[str, Any],
    artifact_location: str | None = None,
) -> Iterator[str]:
    """Start an MLflow run and yield its id; the run always ends, never stays RUNNING.

    The run is also the active fluent run for the body, so ``mlflow.log_metric`` or
    ``mlflow.start_run(nested=True)`` inside it land here. On exit, runs the body left open
    (fluent or nested) end with the same status as this one: FINISHED on success, FAILED on an
    exception, KILLED on KeyboardInterrupt or another interruption; the exception propagates.
    """
    import mlflow

    experiment_id = ensure_experiment(tracking_uri, experiment_name, artifact_location)
    client = client_for(tracking_uri)
    error: BaseException | None = None
    with scoped_tracking_uri(tracking_uri), _default_experiment(experiment_id):
        outer = mlflow.active_run()
        outer_id = outer.info.run_id if outer else None
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name,
            nested=outer is not None,
            tags={key: str(value) for key, value in tags.items()},
        )
        run_id = run.info.run_id
        try:
            yield run_id
        except BaseException as exc:
            error = exc
            raise
        finally:
            status = _status_for(error)
            while (active := mlflow.active_run()) is not None and active.info.run_id != outer_id:
                mlflow.end_run(status)
            _end_running_descendants(client, run, status)
            client.set_terminated(run_id, status)


def monitoring_experiment(model_name: str) -> str:
    """The experiment that holds the monitoring runs (drift checks, A/B reports) of a model."""
    return MONITORING_EXPERIMENT_PREFIX + model_name


def end_runs_of_ended_dagster_runs(
    tracking_uri: str,
    experiment_names: Iterable[str],
    dagster_run_status: Callable[[str], str | None],
    tag_key: str = "dagster_run_id",
) -> dict[str, str]:
    """Mark FAILED every RUNNING run of the experiments (and the runs nested under it) whose
    Dagster run, named by its ``tag_key`` tag, has ended: a step killed with SIGKILL cannot end
    its own MLflow run. ``dagster_run_status(run_id)`` gives the Dagster run's final status, or
    None while it runs or when the instance does not know it (such runs are left alone).
    Experiments that do not exist yet are skipped. One search of RUNNING runs when none is
    orphaned, so callers can afford it at every sensor tick and run start.
    Returns MLflow run id -> the reason, which is also kept in the run's ``ended_reason`` tag."""
    client = client_for(tracking_uri)
    experiment_ids = [
        experiment.experiment_id
        for name in experiment_names
        if (experiment := client.get_experiment_by_name(name)) is not None
    ]
    if not experiment_ids:
        return {}
    running = search_all_runs(client, experiment_ids, "attributes.status = 'RUNNING'")
    ended: dict[str, str] = {}
    for run in running:
        dagster_run = run.data.tags.get(tag_key)
        status = dagster_run_status(dagster_run) if dagster_run else None
        if status is None or run.info.run_id in ended:
            continue
        reason = (
            f"Dagster run {dagster_run} ended {status} while this MLflow run was still RUNNING "
            "(its step process was killed)"
        )
        client.set_tag(run.info.run_id, "ended_reason", reason)
        client.set_terminated(run.info.run_id, "FAILED")
        ended[run.info.run_id] = reason
        for child in _end_running_descendants(client, run, "FAILED"):
            client.set_tag(child, "ended_reason", reason)
            ended[child] = reason
    return ended


def log_params(tracking_uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    """Log ``params`` (values as strings). MLflow params are immutable: logging a key again
    with a different value raises."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    items = [Param(str(key), str(value)) for key, value in params.items()]
    for start in range(0, len(items), _BATCH_LIMIT):
        try:
            client.log_batch(run_id, params=items[start : start + _BATCH_LIMIT])
        except MlflowException as exc:
            raise ValueError(
                f"Could not log params {sorted(params)} to MLflow run {run_id}: {exc.message} "
                "Params cannot change once logged; log changed values in a new run."
            ) from exc


def log_epoch_metrics(
    tracking_uri: str, run_id: str, step: int, metrics: Mapping[str, float]
) -> None:
    """Log one step's metrics (for example one epoch's loss and accuracy) in a single call."""
    from mlflow.entities import Metric

    timestamp = int(time.time() * 1000)
    items = []
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"Metric {key!r}={value!r} for MLflow run {run_id} step {step} is not a number; "
                "pass floats (call .item() on tensors)."
            ) from exc
        items.append(Metric(str(key), number, timestamp, step))
    if any(math.isinf(metric.value) for metric in items):
        raise ValueError(
            f"Metrics {dict(metrics)} for MLflow run {run_id} step {step} contain an infinite "
            "value; training diverged or a metric divides by zero."
        )
    client_for(tracking_uri).log_batch(run_id, metrics=items)


def log_artifact(
    tracking_uri: str, run_id: str, path: Path | str, artifact_path: str | None = None
) -> str:
    """Copy a file or a whole directory into the run's artifacts; returns its artifact URI."""
    local = Path(path)
    client = client_for(tracking_uri)
    if local.is_dir():
        client.log_artifacts(run_id, str(local), artifact_path)
        relative = artifact_path or ""
    elif local.is_file():
        client.log_artifact(run_id, str(local), artifact_path)
        relative = f"{artifact_path}/{local.name}" if artifact_path else local.name
    else:
        raise FileNotFoundError(
            f"Cannot log {local} to MLflow run {run_id}: no such file or directory. Write it "
            "first, or check the path."
        )
    root = client.get_run(run_id).info.artifact_uri.rstrip("/")
    return f"{root}/{relative}" if relative else root


def log_monitoring_run(
    tracking_uri: str,
    model_name: str,
    run_name: str,
    tags: Mapping[str, Any],
    params: Mapping[str, Any],
    metrics: Mapping[str, float | None],
    files: Iterable[Path],
    artifact_location: str | None = None,
) -> str:
    """One finished run in the experiment ``monitoring/<model name>`` holding a monitoring result
    (a drift check, an A/B report): its params, its metrics (None values left out), and its files,
    pictures and report JSON, as artifacts. Returns the run id.

    Monitoring results sit in their own experiment so that the model's experiment keeps only
    training runs, and the MLflow UI can chart a drift score or an A/B accuracy over time."""
    with tracking_run(
        tracking_uri,
        monitoring_experiment(model_name),
        run_name,
        tags,
        artifact_location,
    ) as run_id:
        log_params(tracking_uri, run_id, params)
        numbers = {key: float(value) for key, value in metrics.items() if value is not None}
        if numbers:
            log_epoch_metrics(tracking_uri, run_id, 0, numbers)
        for path in files:
            log_artifact(tracking_uri, run_id, path)
    return run_id


def ui_base_url(tracking_uri: str) -> str:
    """The MLflow UI that shows this store: the server itself for http(s) URIs, else the
    local ``mlflow ui`` default address."""
    if urlparse(tracking_uri).scheme in ("http", "https"):
        return tracking_uri.rstrip("/")
    return LOCAL_UI_URL


def run_url(tracking_uri: str, run_id: str) -> str:
    """A link to the run in the MLflow UI (for Dagster metadata and notebook output)."""
    experiment_id = client_for(tracking_uri).get_run(run_id).info.experiment_id
    return f"{ui_base_url(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"
