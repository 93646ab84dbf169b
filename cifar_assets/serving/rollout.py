"""The one owner of the model's lifecycle state: MLflow's aliases decide, Triton follows.

The state is three things kept in agreement:

- MLflow's aliases on the registered model: ``champion`` and ``challenger``;
- Triton's live versions of ``cifar10_resnet18``;
- the A/B router's weights.

The rule, checked by :meth:`Rollout.check` after every transition (and by a blocking asset check
on ``triton_deployment``): the version with the most router traffic is the champion; every
version with weight is live; a version without an alias gets no traffic. The router's split
is derived from the aliases alone: the champion gets ``1 - challenger_share``, a verified
challenger gets ``challenger_share``, nothing else gets any.

Every transition (deploy, promote, rollback, retire) runs under one file lock, writes an
``intent`` record to the journal before it changes anything and a ``done`` (or ``failed``)
record after, and changes serving in the order that fails no request: load the versions that
will get traffic, then move the weights, then unload the versions that lost it. After a crash
between the two records, :meth:`Rollout.reconcile` sets the aliases the intent named and
brings serving to them. The journal (``<state_dir>/rollout_journal.jsonl``) is also the audit
log: what moved, from which state to which, why, who, and on what evidence.

mlflow and tritonclient are imported inside the functions that need them.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cifar_assets.ml import registry
from cifar_assets.serving import repository

JOURNAL_FILE = "rollout_journal.jsonl"
ROLLOUT_STATE_FILE = "rollout.json"
LOCK_FILE = "rollout.lock"
DEFAULT_CHALLENGER_SHARE = 0.1
Role = Literal["champion", "challenger"]


class RolloutError(RuntimeError):
    """A transition that cannot be carried out as asked; nothing was changed by it."""


@dataclass(frozen=True)
class LifecycleState:
    """One reading of the whole state: the registry's aliases and what serving does."""

    champion: int | None
    challenger: int | None
    live_versions: list[int]
    weights: dict[int, float]
    verified: list[int]
    challenger_share: float

    def to_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state["weights"] = {str(v): w for v, w in sorted(self.weights.items())}
        return state


@dataclass(frozen=True)
class Transition:
    """A finished transition, as the journal keeps it."""

    id: str
    action: str
    version: int | None
    reason: str
    actor: str
    before: dict[str, Any]
    after: dict[str, Any]
    evidence: dict[str, Any] = field(default_factory=dict)


def desired_serving(
    champion: int | None, challenger: int | None, verified: list[int], challenger_share: float
) -> dict[int, float]:
    """The router weights that the aliases call for: champion and a verified challenger share
    the traffic, nothing else gets any (empty while there is no servable champion)."""
    if champion is None or champion not in verified:
        return {}
    if challenger is None or challenger == champion or challenger not in verified:
        return {champion: 1.0}
    return {champion: 1.0 - challenger_share, challenger: challenger_share}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Rollout:
    """Transitions of one registered model served by one Triton server.

    ``triton`` is a tritonclient client or an HTTP URL ("127.0.0.1:8000"); ``repo`` and
    ``state_dir`` are the Triton model repository and the launcher's state folder.
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        model_name: str,
        triton: Any,
        repo: Path,
        state_dir: Path,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.triton = triton
        self.repo = repo
        self.state_dir = state_dir

    # -----------------------------------------------------------------------------------------
    # Reading the state

    def _aliases(self) -> dict[str, int]:
        return registry.aliases(self.tracking_uri, self.model_name)

    def _rollout_settings(self) -> dict[str, Any]:
        path = self.state_dir / ROLLOUT_STATE_FILE
        if not path.is_file():
            return {"verified": [], "challenger_share": DEFAULT_CHALLENGER_SHARE}
        try:
            settings = json.loads(path.read_text())
            return {
                "verified": sorted(int(v) for v in settings["verified"]),
                "challenger_share": float(settings["challenger_share"]),
            }
        except (ValueError, KeyError, TypeError) as error:
            raise RolloutError(
                f"{path} is unreadable ({error}). It lists the versions that passed their "
                "Triton check; delete it and re-run triton_deployment for the versions that "
                "should serve."
            ) from error

    def _write_rollout_settings(self, verified: list[int], challenger_share: float) -> None:
        repository.write_json_atomic(
            self.state_dir / ROLLOUT_STATE_FILE,
            {"verified": sorted(set(verified)), "challenger_share": challenger_share},
        )

    def state(self) -> LifecycleState:
        aliases = self._aliases()
        settings = self._rollout_settings()
        return LifecycleState(
            champion=aliases.get(registry.CHAMPION),
            challenger=aliases.get(registry.CHALLENGER),
            live_versions=repository.read_live_versions(self.state_dir),
            weights=repository.read_ab_weights(self.state_dir),
            verified=settings["verified"],
            challenger_share=settings["challenger_share"],
        )

    def check(self, server_ready: Callable[[int], bool] | None = None) -> list[str]:
        """Every way the current state breaks the rule; empty when MLflow, the router's
        weights, Triton's live versions and the journal agree. ``server_ready(version)``, when
        given, asks the running server whether a weighted version really answers."""
        state = self.state()
        problems: list[str] = []
        weighted = {v: w for v, w in state.weights.items() if w > 0}
        if weighted:
            top = max(weighted, key=lambda v: (weighted[v], -v))
            if top != state.champion:
                problems.append(
                    f"v{top} has the most router traffic ({weighted[top]:.0%}) but MLflow's "
                    f"champion is {_label(state.champion)}"
                )
        elif state.champion is not None and state.champion in state.verified:
            problems.append(f"champion v{state.champion} is servable but gets no traffic")
        aliased = {state.champion, state.challenger} - {None}
        for version in sorted(weighted):
            if version not in state.live_versions:
                problems.append(f"v{version} has router weight but is not live in Triton")
            if version not in aliased:
                problems.append(f"v{version} has router traffic but no MLflow alias")
            if server_ready is not None and not server_ready(version):
                problems.append(f"v{version} has router weight but Triton does not serve it")
        expected = desired_serving(
            state.champion, state.challenger, state.verified, state.challenger_share
        )
        if weighted and _rounded(weighted) != _rounded(expected):
            problems.append(
                f"router weights {_rounded(weighted)} differ from what the aliases call for "
                f"({_rounded(expected)})"
            )
        unfinished = self.unfinished()
        if unfinished is not None:
            problems.append(
                f"transition {unfinished['id']} ({unfinished['action']}) has an intent but no "
                "completion in the journal; run reconcile"
            )
        return problems

    def server_ready(self, version: int) -> bool:
        """Whether the server answers on ``version`` (the inference API's readiness call)."""
        from tritonclient.utils import InferenceServerException

        client = repository._client(self.triton)
        try:
            return bool(client.is_model_ready(repository.MODEL_NAME, str(version)))
        except InferenceServerException:
            return False

    # -----------------------------------------------------------------------------------------
    # The journal

    @property
    def journal_path(self) -> Path:
        return self.state_dir / JOURNAL_FILE

    def _append(self, record: Mapping[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, allow_nan=False, default=str) + "\n"
        with self.journal_path.open("a") as journal:
            journal.write(line)
            journal.flush()
            os.fsync(journal.fileno())

    def journal(self) -> list[dict[str, Any]]:
        """Every journal record, oldest first."""
        if not self.journal_path.is_file():
            return []
        return [json.loads(line) for line in self.journal_path.read_text().splitlines() if line]

    def unfinished(self) -> dict[str, Any] | None:
        """The intent of a transition that never recorded its end (a crash), if any."""
        ended = {r["id"] for r in self.journal() if r["phase"] != "intent"}
        pending = [r for r in self.journal() if r["phase"] == "intent" and r["id"] not in ended]
        return pending[-1] if pending else None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / LOCK_FILE).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -----------------------------------------------------------------------------------------
    # Moving serving to the aliases

    def _apply(self, target: LifecycleState) -> None:
        """Serve what ``target``'s aliases call for: load, then weight, then unload."""
        weights = desired_serving(
            target.champion, target.challenger, target.verified, target.challenger_share
        )
        if not weights:
            raise RolloutError(
                f"MLflow's champion is {_label(target.champion)}, which has not passed its "
                f"Triton check (verified versions: {target.verified or 'none'}); run "
                "triton_deployment for it (main_job does), then try again."
            )
        live_before = repository.read_live_versions(self.state_dir)
        wanted = sorted(weights)
        if set(wanted) - set(live_before):
            repository.set_live_versions(
                self.triton,
                sorted({*live_before, *wanted}),
                repo=self.repo,
                state_dir=self.state_dir,
            )
        repository.set_ab_weights(weights, state_dir=self.state_dir)
        if set(repository.read_live_versions(self.state_dir)) != set(wanted):
            repository.set_live_versions(
                self.triton, wanted, repo=self.repo, state_dir=self.state_dir
            )

    def _transition(
        self,
        action: str,
        version: int | None,
        target_aliases: Mapping[str, int | None],
        reason: str,
        actor: str,
        move_aliases: Callable[[], None],
        evidence: Mapping[str, Any] | None = None,
        verified: list[int] | None = None,
        challenger_share: float | None = None,
    ) -> Transition:
        """Journal the intent, move the aliases, apply serving, journal the end."""
        before = self.state()
        record_id = uuid.uuid4().hex[:12]
        base = {
            "id": record_id,
            "action": action,
            "version": version,
            "reason": reason,
            "actor": actor,
            "evidence": dict(evidence or {}),
        }
        self._append(
            {
                **base,
                "phase": "intent",
                "time": _now(),
                "target_aliases": dict(target_aliases),
                "verified": verified if verified is not None else before.verified,
                "challenger_share": (
                    challenger_share if challenger_share is not None else before.challenger_share
                ),
                "before": before.to_dict(),
            }
        )
        try:
            if verified is not None or challenger_share is not None:
                self._write_rollout_settings(
                    verified if verified is not None else before.verified,
                    challenger_share if challenger_share is not None else before.challenger_share,
                )
            move_aliases()
            self._apply(self.state())
        except Exception as error:
            self._undo(before)
            self._append(
                {**base, "phase": "failed", "time": _now(), "error": str(error)[:2000]}
                | {"after": self.state().to_dict()}
            )
            raise
        after = self.state()
        self._append(
            {
                **base,
                "phase": "done",
                "time": _now(),
                "before": before.to_dict(),
                "after": after.to_dict(),
            }
        )
        return Transition(
            record_id,
            action,
            version,
            reason,
            actor,
            before.to_dict(),
            after.to_dict(),
            dict(evidence or {}),
        )

    def _undo(self, before: LifecycleState) -> None:
        """Put aliases, settings and serving back as they were before a failed transition."""
        self._write_rollout_settings(before.verified, before.challenger_share)
        self._set_aliases(
            {registry.CHAMPION: before.champion, registry.CHALLENGER: before.challenger},
            "undo of a failed transition",
            "rollout",
        )
        if before.weights:
            live_now = repository.read_live_versions(self.state_dir)
            repository.set_live_versions(
                self.triton,
                sorted({*live_now, *before.live_versions}),
                repo=self.repo,
                state_dir=self.state_dir,
            )
            repository.set_ab_weights(before.weights, state_dir=self.state_dir)
            repository.set_live_versions(
                self.triton, before.live_versions, repo=self.repo, state_dir=self.state_dir
            )

    def _set_aliases(self, aliases: Mapping[str, int | None], reason: str, actor: str) -> None:
        for alias, version in aliases.items():
            registry.set_alias(self.tracking_uri, self.model_name, alias, version, reason, actor)

    # -----------------------------------------------------------------------------------------
    # Transitions

    def deploy(
        self,
        version: int,
        role: Role,
        verify: Callable[[], dict[str, Any]],
        *,
        reason: str,
        actor: str,
        challenger_share: float | None = None,
    ) -> Transition:
        """Serve a new registered ``version`` as ``role``, the registry's decision for it.

        The version is loaded beside what serves, without traffic, and ``verify()`` (which
        raises when the version must not serve) checks it; only then does MLflow give it its
        alias and the router its share. A champion takes the traffic of the previous one; a
        challenger replaces any earlier challenger. A version that fails ``verify`` gets no
        alias and no traffic, and Triton is left as it was.
        """
        if challenger_share is not None and not 0.0 < challenger_share < 0.5:
            raise RolloutError(
                f"challenger_share={challenger_share}: give the challenger a share in (0, 0.5), "
                "so the champion keeps the most traffic."
            )
        with self._locked():
            self._finish_unfinished(actor)
            if version not in repository.list_versions(self.repo):
                raise RolloutError(
                    f"Version {version} has no model.onnx under "
                    f"{self.repo / repository.MODEL_NAME}; write it first (triton_deployment "
                    "does)."
                )
            current = self.state()
            live = current.live_versions
            if version not in live:
                repository.set_live_versions(
                    self.triton, sorted({*live, version}), repo=self.repo, state_dir=self.state_dir
                )
            try:
                evidence = verify()
            except Exception:
                # Back to what served before: the version never had traffic.
                if live and version not in live:
                    repository.set_live_versions(
                        self.triton, live, repo=self.repo, state_dir=self.state_dir
                    )
                raise
            target = {
                registry.CHAMPION: version if role == "champion" else current.champion,
                registry.CHALLENGER: (
                    version
                    if role == "challenger"
                    else (None if current.challenger == version else current.challenger)
                ),
            }
            if target[registry.CHAMPION] is None:
                raise RolloutError(
                    f"Version {version} cannot serve as challenger: there is no champion yet. "
                    "Deploy it as champion (the registry's gate promotes a first version)."
                )
            return self._transition(
                "deploy",
                version,
                target,
                reason,
                actor,
                lambda: self._set_aliases(target, f"deployed as {role}: {reason}", actor),
                evidence,
                verified=sorted({*current.verified, version}),
                challenger_share=challenger_share,
            )

    def promote(
        self, version: int, *, reason: str, actor: str, evidence: Mapping[str, Any] | None = None
    ) -> Transition:
        """Make ``version`` the champion and give it the champion's traffic."""
        with self._locked():
            self._finish_unfinished(actor)
            current = self.state()
            if version not in current.verified:
                raise RolloutError(
                    f"v{version} has not passed its Triton check (verified: "
                    f"{current.verified or 'none'}); deploy it with triton_deployment first."
                )
            target = {
                registry.CHAMPION: version,
                registry.CHALLENGER: None if current.challenger == version else current.challenger,
            }
            return self._transition(
                "promote",
                version,
                target,
                reason,
                actor,
                lambda: self._set_aliases(target, f"promote: {reason}", actor),
                evidence,
            )

    def rollback(
        self, *, reason: str, actor: str, evidence: Mapping[str, Any] | None = None
    ) -> Transition:
        """Give the champion alias, and its traffic, back to the previous champion."""
        with self._locked():
            self._finish_unfinished(actor)
            current = self.state()
            previous = registry.previous_champion(self.tracking_uri, self.model_name)
            if previous is None:
                raise RolloutError(
                    f"{self.model_name} has no earlier champion to roll back to (champion: "
                    f"{_label(current.champion)}). Promote a version explicitly instead."
                )
            if previous not in current.verified:
                raise RolloutError(
                    f"The previous champion v{previous} has not passed a Triton check here "
                    f"(verified: {current.verified or 'none'}); re-run onnx_model and "
                    "triton_deployment for it, then roll back."
                )
            target = {
                registry.CHAMPION: previous,
                registry.CHALLENGER: None if current.challenger == previous else current.challenger,
            }
            return self._transition(
                "rollback",
                previous,
                target,
                reason,
                actor,
                lambda: self._set_aliases(target, f"rollback: {reason}", actor),
                evidence,
            )

    def retire(
        self, version: int, *, reason: str, actor: str, evidence: Mapping[str, Any] | None = None
    ) -> Transition:
        """Take ``version`` (a challenger, never the champion) out of the registry's aliases
        and out of serving."""
        with self._locked():
            self._finish_unfinished(actor)
            current = self.state()
            if version == current.champion:
                raise RolloutError(
                    f"v{version} is the champion; promote another version or roll back first."
                )
            target = {
                registry.CHAMPION: current.champion,
                registry.CHALLENGER: None if current.challenger == version else current.challenger,
            }
            return self._transition(
                "retire",
                version,
                target,
                reason,
                actor,
                lambda: self._set_aliases(target, f"retired: {reason}", actor),
                evidence,
                verified=[v for v in current.verified if v != version],
            )

    def reconcile(self, actor: str = "reconcile") -> Transition | None:
        """Complete a transition a crash left between its intent and its end, or bring serving
        to MLflow's aliases if it drifted from them; None when all agreed already."""
        with self._locked():
            transition = self._finish_unfinished(actor)
            if transition is not None:
                return transition
            current = self.state()
            expected = desired_serving(
                current.champion, current.challenger, current.verified, current.challenger_share
            )
            if _rounded(current.weights) == _rounded(expected) and set(
                current.live_versions
            ) == set(expected):
                return None
            return self._transition(
                "reconcile",
                current.champion,
                {registry.CHAMPION: current.champion, registry.CHALLENGER: current.challenger},
                "serving differed from MLflow's aliases",
                actor,
                lambda: None,
            )

    def _finish_unfinished(self, actor: str) -> Transition | None:
        intent = self.unfinished()
        if intent is None:
            return None
        target = {
            k: (int(v) if v is not None else None) for k, v in intent["target_aliases"].items()
        }
        before = self.state()
        self._write_rollout_settings(intent["verified"], intent["challenger_share"])
        self._set_aliases(target, f"completing {intent['action']} {intent['id']}", actor)
        self._apply(self.state())
        after = self.state()
        self._append(
            {
                "id": intent["id"],
                "action": intent["action"],
                "version": intent["version"],
                "reason": intent["reason"],
                "actor": actor,
                "evidence": intent.get("evidence", {}),
                "phase": "done",
                "time": _now(),
                "completed_by": "reconcile",
                "before": intent["before"],
                "after": after.to_dict(),
            }
        )
        return Transition(
            intent["id"],
            intent["action"],
            intent["version"],
            intent["reason"],
            actor,
            before.to_dict(),
            after.to_dict(),
            intent.get("evidence", {}),
        )


def _label(version: int | None) -> str:
    return "none" if version is None else f"v{version}"


def _rounded(weights: Mapping[int, float]) -> dict[int, float]:
    return {int(v): round(float(w), 6) for v, w in weights.items() if w > 0}
