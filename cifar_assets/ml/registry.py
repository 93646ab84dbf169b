"""The MLflow model registry for the CIFAR-10 ResNet18: register, gate, promote, roll back, load.

``Registry(uri, name)`` is one registered model in one MLflow store; every operation is a method
(``Registry.from_settings()`` reads both from the environment)::

    models = Registry("sqlite:///var/mlflow.db")
    models.gate(3, margin=0.005)
    models.rollback("accuracy dropped in production")

A registered version is an MLflow "model from code" (cifar_assets/ml/mlflow_model_code.py) whose
artifacts are the safetensors weights and architecture.json, so nothing is pickled and
``mlflow.pyfunc.load_model("models:/cifar10-resnet18@champion")`` works (uint8 images in, logits
out). Each version is linked to the training run; its metrics and data version are version tags.

Aliases, never stages: a new version gets ``challenger``; the gate or a person moves
``champion``. Every alias move is recorded in an alias history kept in the same MLflow store:
one finished run per move in the experiment ``alias-history/<model name>``, the move held in the
run's tags. A record is a single insert, so concurrent writers cannot lose each other's moves
(a JSON document in a tag or artifact would need read-modify-write) and the history needs no
size limit; it is backed up with the tracking database and browsable in the MLflow UI. It
knows only moves made through this module: an alias moved by hand in the MLflow UI is not in
it.

mlflow and torch are imported inside the functions (this module is imported by asset modules).
"""

from __future__ import annotations

import getpass
import math
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cifar_assets.ml.model import ARCH_FILE, WEIGHTS_FILE
from cifar_assets.ml.tracking import (
    all_pages,
    client_for,
    ensure_experiment,
    log_artifact,
    scoped_tracking_uri,
    search_all_runs,
    ui_base_url,
)

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

DEFAULT_MODEL_NAME = "cifar10-resnet18"
CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "resnet18"  # artifact key (and folder) of weights + architecture in the model
MODEL_CODE = Path(__file__).with_name("mlflow_model_code.py")
METRIC_TAG_PREFIX = "metric."
DATA_VERSION_TAG = "data_version"
GATE_DECISION_TAG = "gate.decision"
GATE_REASON_TAG = "gate.reason"
HISTORY_EXPERIMENT_PREFIX = "alias-history/"
_HISTORY_TAG = "alias_history."
_PACKAGES_NEEDED_TO_LOAD = ("mlflow", "numpy", "safetensors", "torch", "torchvision")

Action = Literal["set", "moved", "removed"]


class RegistryLookupError(LookupError):
    """A model, version or alias that does not exist; the message lists what does."""


class RollbackError(RuntimeError):
    """There is no earlier champion to return to."""


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: int
    run_id: str | None
    aliases: tuple[str, ...]
    metrics: dict[str, float]
    data_version: str | None
    status: str
    created: datetime
    description: str
    source: str
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str


@dataclass(frozen=True)
class AliasMove:
    when: datetime  # UTC
    alias: str
    action: Action
    from_version: int | None
    to_version: int | None
    reason: str
    actor: str


# ---------------------------------------------------------------------------------------------
# Lookups with errors that say what exists


def _model_names(client: MlflowClient) -> list[str]:
    models = all_pages(
        lambda page_token: client.search_registered_models(max_results=1000, page_token=page_token)
    )
    return sorted(model.name for model in models)


def _all_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    # search_model_versions returns empty aliases in MLflow 3; callers take aliases from
    # get_registered_model instead.
    versions = all_pages(
        lambda page_token: client.search_model_versions(
            f"name = '{name}'", max_results=1000, page_token=page_token
        )
    )
    return sorted(versions, key=lambda version: int(version.version))


def _info(version: ModelVersion, aliases: Mapping[str, int]) -> ModelVersionInfo:
    number = int(version.version)
    tags = dict(version.tags)
    return ModelVersionInfo(
        name=version.name,
        version=number,
        run_id=version.run_id or None,
        aliases=tuple(sorted(alias for alias, target in aliases.items() if target == number)),
        metrics=_metrics_from_tags(tags),
        data_version=tags.get(DATA_VERSION_TAG),
        status=str(version.status),
        created=datetime.fromtimestamp(version.creation_timestamp / 1000, tz=UTC),
        description=version.description or "",
        source=version.source or "",
        tags=tags,
    )


def _metrics_from_tags(tags: Mapping[str, str]) -> dict[str, float]:
    return {
        key.removeprefix(METRIC_TAG_PREFIX): float(value)
        for key, value in tags.items()
        if key.startswith(METRIC_TAG_PREFIX)
    }


_clock_lock = threading.Lock()
_last_record_time = datetime.min.replace(tzinfo=UTC)


def _record_time() -> datetime:
    """Now in UTC, strictly after the previous record from this process, so that two moves made
    in the same microsecond (champion set, challenger removed) keep their order."""
    global _last_record_time
    with _clock_lock:
        now = max(datetime.now(UTC), _last_record_time + timedelta(microseconds=1))
        _last_record_time = now
        return now


def _label(version: int | None) -> str:
    return "none" if version is None else f"v{version}"


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in _PACKAGES_NEEDED_TO_LOAD]


def _check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    checked = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"Metric {key!r}={value!r} is not a number; pass floats.") from exc
        if not math.isfinite(number):
            raise ValueError(
                f"Metric {key!r}={value!r} is not finite; a model with a NaN or infinite "
                "metric cannot be compared, so fix the evaluation before registering."
            )
        checked[str(key)] = number
    return checked


def _log_pyfunc_model(tracking_uri: str, run_id: str, model_dir: Path) -> str:
    """Log the models-from-code pyfunc with the weights as its artifact; returns the logged
    model's id. The run is named explicitly, so the caller need not make it the active run."""
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    client = client_for(tracking_uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 32, 32, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )
    with tempfile.TemporaryDirectory() as staging, scoped_tracking_uri(tracking_uri):
        # Only the two model files travel, under a fixed folder name that loaders rely on.
        bundle = Path(staging) / MODEL_ARTIFACT
        bundle.mkdir()
        for filename in (WEIGHTS_FILE, ARCH_FILE):
            shutil.copy2(model_dir / filename, bundle / filename)
        logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
        # Model.log is pyfunc.log_model with an explicit run_id; the input example makes MLflow
        # load and run the model once before it is stored.
        mlflow.models.Model.log(
            artifact_path=None,
            name="model",
            flavor=mlflow.pyfunc,
            flavor_name="pyfunc.ModelFromCode",
            python_model=str(MODEL_CODE),
            artifacts={MODEL_ARTIFACT: str(bundle)},
            signature=signature,
            input_example=np.zeros((1, 32, 32, 3), dtype=np.uint8),
            pip_requirements=_pip_requirements(),
            run_id=run_id,
            model_id=logged.model_id,
        )
    return str(logged.model_id)


def _metrics_table(metrics: Mapping[str, float]) -> str:
    if not metrics:
        return ""
    rows = "\n".join(f"| {key} | {value:.6g} |" for key, value in sorted(metrics.items()))
    return f"| metric | value |\n|---|---|\n{rows}"


def log_onnx_artifacts(
    tracking_uri: str, run_id: str, paths: list[Path], artifact_path: str = "onnx"
) -> list[str]:
    """Attach exported files (FP32 and INT8 ONNX) to the run the version was registered from;
    returns their artifact URIs."""
    return [log_artifact(tracking_uri, run_id, path, artifact_path) for path in paths]


def decide_promotion(
    candidate_metrics: Mapping[str, float],
    champion_metrics: Mapping[str, float] | None,
    metric: str = "accuracy",
    margin: float = 0.0,
    higher_is_better: bool = True,
) -> PromotionDecision:
    """Promote when there is no champion, or when the candidate beats it by more than
    ``margin`` on ``metric``; a tie or a gain within the margin keeps the champion."""
    if margin < 0:
        raise ValueError(f"margin={margin} is negative; use 0 or a positive gain to require.")
    if metric not in candidate_metrics:
        raise ValueError(
            f"The candidate has no {metric!r} metric (it has: "
            f"{', '.join(sorted(candidate_metrics)) or 'none'}); register it with that metric "
            "or gate on one it has."
        )
    candidate = float(candidate_metrics[metric])
    if champion_metrics is None:
        return PromotionDecision(True, f"no champion yet; candidate {metric}={candidate:.4f}")
    if metric not in champion_metrics:
        raise ValueError(
            f"The champion has no {metric!r} metric (it has: "
            f"{', '.join(sorted(champion_metrics)) or 'none'}), so the gate cannot compare; "
            "promote manually with promote(...) or gate on a metric both have."
        )
    champion = float(champion_metrics[metric])
    gain = candidate - champion if higher_is_better else champion - candidate
    comparison = (
        f"candidate {metric}={candidate:.4f}, champion {metric}={champion:.4f}, "
        f"gain {gain:+.4f}, required > {margin:.4f}"
    )
    if gain > margin:
        return PromotionDecision(True, f"promoted: {comparison}")
    return PromotionDecision(False, f"kept champion: {comparison}")


def _previous_champions(moves: list[AliasMove]) -> list[int]:
    """Replay champion moves into a stack of earlier champions: a move back to the top of the
    stack (a rollback) pops it, so rolling back twice goes back two releases."""
    stack: list[int] = []
    for move in moves:
        if move.alias != CHAMPION:
            continue
        if stack and move.to_version == stack[-1]:
            stack.pop()
        elif move.from_version is not None:
            stack.append(move.from_version)
    return stack


def _weights_location(client: MlflowClient, model_version: ModelVersion) -> str:
    from mlflow.exceptions import MlflowException

    # The sqlite store leaves ModelVersion.model_id empty; register() sets source models:/<id>.
    source = model_version.source or ""
    model_id = model_version.model_id or source.removeprefix("models:/")
    try:
        logged = client.get_logged_model(model_id)
    except MlflowException as exc:
        raise RegistryLookupError(
            f"Version {model_version.version} of {model_version.name!r} (source {source}) was "
            "not registered by cifar_assets.ml.registry.Registry.register, so it has no "
            "safetensors weights to load; register the model with Registry.register()."
        ) from exc
    # pyfunc keeps its artifacts in the "artifacts" folder of the logged model.
    return f"{logged.artifact_location.rstrip('/')}/artifacts/{MODEL_ARTIFACT}"


def list_models(tracking_uri: str) -> pd.DataFrame:
    """Registered models with their newest version and aliases."""
    import pandas as pd

    client = client_for(tracking_uri)
    rows = []
    for name in _model_names(client):
        model = client.get_registered_model(name)
        versions = _all_versions(client, name)
        rows.append(
            {
                "name": name,
                "latest_version": int(versions[-1].version) if versions else None,
                "versions": len(versions),
                "aliases": {alias: int(version) for alias, version in model.aliases.items()},
                "updated": datetime.fromtimestamp(model.last_updated_timestamp / 1000, tz=UTC),
                "description": model.description or "",
            }
        )
    columns = ["name", "latest_version", "versions", "aliases", "updated", "description"]
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------------------------
# One registered model


@dataclass(frozen=True)
class Registry:
    """One registered model in one MLflow store: ``Registry(uri, name)``.

    Every lookup raises RegistryLookupError naming what exists; every alias move is recorded in
    the alias history. ``Registry.from_settings()`` takes both from cifar_assets.settings."""

    uri: str
    name: str = DEFAULT_MODEL_NAME

    @classmethod
    def from_settings(cls, uri: str | None = None, name: str | None = None) -> Registry:
        from cifar_assets.settings import get_settings

        settings = get_settings()
        return cls(uri or settings.mlflow_tracking_uri, name or settings.registered_model_name)

    @property
    def client(self) -> MlflowClient:
        return client_for(self.uri)

    # -- lookups ---------------------------------------------------------------------------

    def _require_aliases(self) -> dict[str, int]:
        """alias -> version; raises RegistryLookupError naming the models that exist."""
        from mlflow.exceptions import MlflowException

        client = self.client
        try:
            model = client.get_registered_model(self.name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            existing = ", ".join(_model_names(client)) or "none"
            raise RegistryLookupError(
                f"No registered model {self.name!r} in {self.uri} (registered models: "
                f"{existing}). Register a version first with register(...), or check the "
                "model name."
            ) from exc
        return {alias: int(version) for alias, version in model.aliases.items()}

    def _model_version(self, version: int) -> ModelVersion:
        from mlflow.exceptions import MlflowException

        self._require_aliases()
        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            found = _all_versions(self.client, self.name)
            existing = ", ".join(str(each.version) for each in found) or "none"
            raise RegistryLookupError(
                f"Model {self.name!r} in {self.uri} has no version {version} (versions: "
                f"{existing})."
            ) from exc

    def _version_for_alias(self, alias: str) -> int:
        aliases = self._require_aliases()
        if alias not in aliases:
            existing = ", ".join(f"{key} -> v{value}" for key, value in sorted(aliases.items()))
            raise RegistryLookupError(
                f"Model {self.name!r} in {self.uri} has no alias {alias!r} (aliases: "
                f"{existing or 'none'}). Register a version (sets {CHALLENGER!r}) or promote "
                f"one (sets {CHAMPION!r})."
            )
        return aliases[alias]

    def version(self, version: int) -> ModelVersionInfo:
        model_version = self._model_version(version)
        return _info(model_version, self._require_aliases())

    def aliases(self) -> dict[str, int]:
        """alias -> version of the model; empty while the model is not registered yet."""
        try:
            return self._require_aliases()
        except RegistryLookupError:
            return {}

    def champion(self) -> ModelVersionInfo | None:
        """The champion version, or None while the (existing) model has none."""
        aliases = self._require_aliases()
        return self.version(aliases[CHAMPION]) if CHAMPION in aliases else None

    def url(self, version: int) -> str:
        """A link to the version's page in the MLflow UI."""
        return f"{ui_base_url(self.uri)}/#/models/{self.name}/versions/{version}"

    # -- alias history ---------------------------------------------------------------------

    def _record_move(
        self,
        alias: str,
        from_version: int | None,
        to_version: int | None,
        reason: str,
        actor: str | None,
    ) -> AliasMove:
        action: Action = (
            "set" if from_version is None else "removed" if to_version is None else "moved"
        )
        move = AliasMove(
            when=_record_time(),
            alias=alias,
            action=action,
            from_version=from_version,
            to_version=to_version,
            reason=reason,
            actor=actor or getpass.getuser(),
        )
        millis = int(move.when.timestamp() * 1000)
        tags = {
            _HISTORY_TAG + "model": self.name,
            _HISTORY_TAG + "when": move.when.isoformat(timespec="microseconds"),
            _HISTORY_TAG + "alias": alias,
            _HISTORY_TAG + "action": action,
            _HISTORY_TAG + "from_version": "" if from_version is None else str(from_version),
            _HISTORY_TAG + "to_version": "" if to_version is None else str(to_version),
            _HISTORY_TAG + "reason": reason,
            _HISTORY_TAG + "actor": move.actor,
        }
        # The record is complete once create_run returns; ending the run only keeps the UI tidy.
        client = self.client
        run = client.create_run(
            ensure_experiment(self.uri, HISTORY_EXPERIMENT_PREFIX + self.name),
            start_time=millis,
            tags=tags,
            run_name=f"{alias}: {_label(from_version)} -> {_label(to_version)}",
        )
        client.set_terminated(run.info.run_id, "FINISHED", end_time=millis)
        return move

    def history(self, alias: str | None = None) -> list[AliasMove]:
        """Every recorded alias move of the model (or of one alias), oldest first."""
        client = self.client
        experiment = client.get_experiment_by_name(HISTORY_EXPERIMENT_PREFIX + self.name)
        if experiment is None:
            return []
        moves = []
        for run in search_all_runs(client, [experiment.experiment_id], ""):
            tags = {
                key.removeprefix(_HISTORY_TAG): value
                for key, value in run.data.tags.items()
                if key.startswith(_HISTORY_TAG)
            }
            if tags.get("model") != self.name or (alias is not None and tags["alias"] != alias):
                continue
            moves.append(
                AliasMove(
                    when=datetime.fromisoformat(tags["when"]),
                    alias=tags["alias"],
                    action=tags["action"],  # type: ignore[arg-type]
                    from_version=int(tags["from_version"]) if tags["from_version"] else None,
                    to_version=int(tags["to_version"]) if tags["to_version"] else None,
                    reason=tags.get("reason", ""),
                    actor=tags.get("actor", ""),
                )
            )
        return sorted(moves, key=lambda move: move.when)

    def champion_at(self, when: datetime) -> int | None:
        """The version that was champion at ``when`` (timezone-aware), by the alias history."""
        if when.tzinfo is None:
            raise ValueError(
                f"champion_at got a naive datetime {when.isoformat()}; pass a timezone-aware "
                "one, e.g. datetime.now(UTC) or datetime(2025, 1, 31, 12, 0, tzinfo=UTC)."
            )
        champion: int | None = None
        for move in self.history(alias=CHAMPION):
            if move.when > when:
                break
            champion = move.to_version
        return champion

    def history_frame(self) -> pd.DataFrame:
        """The alias history as a table, oldest first."""
        import pandas as pd

        columns = ["when", "alias", "action", "from_version", "to_version", "reason", "actor"]
        return pd.DataFrame(
            [{column: getattr(move, column) for column in columns} for move in self.history()],
            columns=columns,
        ).astype({"from_version": "Int64", "to_version": "Int64"})

    # -- registering -----------------------------------------------------------------------

    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                self.name,
                description="CIFAR-10 ResNet18 classifier (uint8 images in, logits out).",
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def register(
        self,
        run_id: str,
        model_dir: Path,
        metrics: Mapping[str, float],
        data_version: str,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        actor: str | None = None,
        alias: str | None = CHALLENGER,
    ) -> ModelVersionInfo:
        """Log the model in ``model_dir`` to run ``run_id``, register it as a new version and
        point ``alias`` at it (``challenger``; None leaves every alias where it is, as the
        pipeline does: its versions get their alias when Triton can serve them).

        ``metrics`` become version tags ``metric.<key>`` (and a table in the description), the
        gate compares them; ``data_version`` identifies the training data.
        """
        from mlflow.exceptions import MlflowException

        client = self.client
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            raise RegistryLookupError(
                f"MLflow run {run_id!r} does not exist in {self.uri}; register the model from "
                "the run that trained it (the id tracking_run yields)."
            ) from exc
        if run.info.status in ("FAILED", "KILLED"):
            raise ValueError(
                f"MLflow run {run_id} ended {run.info.status}; a model from a failed run is not "
                "registered. Train again and register from the new run."
            )
        model_dir = Path(model_dir)
        for filename in (WEIGHTS_FILE, ARCH_FILE):
            if not (model_dir / filename).is_file():
                raise FileNotFoundError(
                    f"{model_dir / filename} is missing: register() needs a directory written "
                    "by cifar_assets.ml.model.save_model (weights and architecture)."
                )
        checked_metrics = _check_metrics(metrics)
        user_tags = {str(key): str(value) for key, value in (tags or {}).items()}
        own_tags = (DATA_VERSION_TAG, GATE_DECISION_TAG, GATE_REASON_TAG)
        reserved = [
            key for key in user_tags if key.startswith(METRIC_TAG_PREFIX) or key in own_tags
        ]
        if reserved:
            raise ValueError(
                f"Tags {reserved} clash with the registry's own tags; pass metrics through "
                "`metrics=` and the data version through `data_version=`, and rename the others."
            )

        model_id = _log_pyfunc_model(self.uri, run_id, model_dir)
        self._ensure_registered_model()
        version_tags = {
            **user_tags,
            **{METRIC_TAG_PREFIX + key: repr(value) for key, value in checked_metrics.items()},
            DATA_VERSION_TAG: data_version,
        }
        full_description = f"{description}\n\n{_metrics_table(checked_metrics)}".strip()
        with scoped_tracking_uri(self.uri):
            # The sqlite registry store looks the logged model up through the process-wide URI.
            created = client.create_model_version(
                self.name,
                source=f"models:/{model_id}",
                run_id=run_id,
                tags=version_tags,
                description=full_description,
                model_id=model_id,
            )
        version = int(created.version)
        if alias is not None:
            self._move_alias(alias, version, f"registered from run {run_id}", actor)
        return self.version(version)

    # -- gate, promotion, rollback ---------------------------------------------------------

    def _move_alias(
        self, alias: str, version: int | None, reason: str, actor: str | None
    ) -> AliasMove | None:
        """Point ``alias`` at ``version`` (None removes it) and record the move; None if the
        alias already points there."""
        current = self._require_aliases().get(alias)
        if current == version:
            return None
        if version is None:
            self.client.delete_registered_model_alias(self.name, alias)
        else:
            self.client.set_registered_model_alias(self.name, alias, str(version))
        return self._record_move(alias, current, version, reason, actor)

    def set_alias(
        self, alias: str, version: int | None, reason: str, actor: str | None = None
    ) -> AliasMove | None:
        """Point ``alias`` at ``version`` (None removes it), recorded in the alias history; None
        if it already pointed there. The serving rollout (cifar_assets.serving.rollout) moves
        aliases through this, so that Triton follows every move."""
        if version is not None:
            self._model_version(version)
        return self._move_alias(alias, version, reason, actor)

    def promote(self, version: int, reason: str, actor: str | None = None) -> ModelVersionInfo:
        """Make ``version`` the champion (a no-op if it already is). It stops being the
        challenger: that alias names a version still waiting for its chance."""
        if not reason.strip():
            raise ValueError("promote() needs a reason: it is written to the alias history.")
        model_version = self._model_version(version)
        if str(model_version.status) != "READY":
            raise ValueError(
                f"Version {version} of {self.name!r} is {model_version.status}, not READY; "
                "wait for registration to finish or register it again."
            )
        self._move_alias(CHAMPION, version, reason, actor)
        if self._require_aliases().get(CHALLENGER) == version:
            self._move_alias(CHALLENGER, None, f"promoted to {CHAMPION}", actor)
        return self.version(version)

    def _tag_decision(self, version: int, decision: PromotionDecision) -> None:
        label = "promoted" if decision.promote else "not promoted"
        self.client.set_model_version_tag(self.name, str(version), GATE_DECISION_TAG, label)
        self.client.set_model_version_tag(self.name, str(version), GATE_REASON_TAG, decision.reason)

    def gate(
        self,
        version: int,
        metric: str = "accuracy",
        margin: float = 0.0,
        actor: str | None = None,
        champion_metrics: Mapping[str, float] | None = None,
        apply: bool = True,
    ) -> PromotionDecision:
        """Compare ``version`` with the champion, promote it if ``decide_promotion`` says so,
        and write the decision and its reason to the version's tags either way.

        ``champion_metrics``, when given, are the champion's figures re-measured on the
        candidate's test split; they replace the ones stored at the champion's own
        registration, so the gate compares like with like when the data has changed. With
        ``apply=False`` the decision is only recorded: the caller moves the alias later (the
        pipeline does once Triton serves it)."""
        candidate = self.version(version)
        champion = self.champion()
        if champion is not None and champion.version == version:
            decision = PromotionDecision(False, f"version {version} is already the champion")
        else:
            reference = None
            if champion is not None:
                reference = champion_metrics if champion_metrics is not None else champion.metrics
            decision = decide_promotion(candidate.metrics, reference, metric, margin)
        self._tag_decision(version, decision)
        if decision.promote and apply:
            self.promote(version, f"gate: {decision.reason}", actor)
        return decision

    def hold_as_challenger(self, version: int, reason: str) -> PromotionDecision:
        """Record that ``version`` skips the gate and stays challenger (an A/B test decides)."""
        decision = PromotionDecision(False, reason)
        self.version(version)
        self._tag_decision(version, decision)
        return decision

    def previous_champion(self) -> int | None:
        """The version a rollback would make champion again, or None when there is none."""
        previous = _previous_champions(self.history(alias=CHAMPION))
        return previous[-1] if previous else None

    def rollback(self, reason: str, actor: str | None = None) -> ModelVersionInfo:
        """Move ``champion`` back to the version that was champion before the current one."""
        champion = self.champion()
        previous = _previous_champions(self.history(alias=CHAMPION))
        if champion is None or not previous:
            raise RollbackError(
                f"Model {self.name!r} has no earlier champion to roll back to (current "
                f"champion: {f'v{champion.version}' if champion else 'none'}). Promote a "
                "version explicitly with promote(version, reason)."
            )
        target = previous[-1]
        try:
            self.version(target)
        except RegistryLookupError as exc:
            raise RollbackError(
                f"The previous champion of {self.name!r}, version {target}, no longer exists; "
                "promote a version explicitly with promote(version, reason)."
            ) from exc
        self._move_alias(CHAMPION, target, f"rollback: {reason}", actor)
        return self.version(target)

    # -- loading ---------------------------------------------------------------------------

    def _load(self, model_version: ModelVersion) -> torch.nn.Module:
        import mlflow

        from cifar_assets.ml.model import load_model

        location = _weights_location(self.client, model_version)
        with tempfile.TemporaryDirectory() as download:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=download, tracking_uri=self.uri
            )
            return load_model(Path(local))

    def load(self, version: int) -> torch.nn.Module:
        """Download the version's safetensors weights and rebuild the network (eval mode)."""
        return self._load(self._model_version(version))

    def load_alias(self, alias: str = CHAMPION) -> torch.nn.Module:
        """The network the alias points at, e.g. ``Registry(uri).load_alias("champion")``."""
        return self.load(self._version_for_alias(alias))

    def load_pyfunc(self, alias: str = CHAMPION) -> Any:
        """The MLflow pyfunc model behind the alias (``predict(uint8 images) -> logits``)."""
        import mlflow

        self._version_for_alias(alias)
        with scoped_tracking_uri(self.uri):
            return mlflow.pyfunc.load_model(f"models:/{self.name}@{alias}")

    # -- tables for people -----------------------------------------------------------------

    def compare(self, version_a: int, version_b: int) -> pd.DataFrame:
        """One row per metric: its value in each version and ``difference`` = b - a."""
        import pandas as pd

        metrics_a = self.version(version_a).metrics
        metrics_b = self.version(version_b).metrics
        rows = [
            {
                "metric": metric,
                f"v{version_a}": metrics_a.get(metric, math.nan),
                f"v{version_b}": metrics_b.get(metric, math.nan),
                "difference": metrics_b.get(metric, math.nan) - metrics_a.get(metric, math.nan),
            }
            for metric in sorted(set(metrics_a) | set(metrics_b))
        ]
        columns = ["metric", f"v{version_a}", f"v{version_b}", "difference"]
        return pd.DataFrame(rows, columns=columns)

    def versions(self) -> pd.DataFrame:
        """Every version, oldest first, with aliases read from the registered model (correct
        even where search_model_versions returns none)."""
        import pandas as pd

        aliases = self._require_aliases()
        infos = [_info(version, aliases) for version in _all_versions(self.client, self.name)]
        columns = ["version", "aliases", "run_id", "created", "status", "data_version", "metrics"]
        return pd.DataFrame(
            [
                {
                    "version": info.version,
                    "aliases": list(info.aliases),
                    "run_id": info.run_id,
                    "created": info.created,
                    "status": info.status,
                    "data_version": info.data_version,
                    "metrics": info.metrics,
                }
                for info in infos
            ],
            columns=columns,
        )
