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
log: what moved, from which state to which, why, who, and on what evidence. Its last finished
record's ``after`` is what MLflow, the router and Triton should still show; :meth:`Rollout.check`
names anything moved since without the rollout (an alias set by hand in MLflow, say).

Test hook: with ``CIFAR_ROLLOUT_CRASH_AFTER=intent`` (or ``aliases``) in the environment, a
transition SIGKILLs its own process right after the journal's intent (or after MLflow's aliases
moved, before serving follows), so a test can crash a real transition in a subprocess. Nothing
else reads the variable; never set it outside a test.

mlflow and tritonclient are imported inside the functions that need them.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cifar_assets.fileio import write_json_atomic
from cifar_assets.ml import registry
from cifar_assets.serving import repository

JOURNAL_FILE = "rollout_journal.jsonl"
FIXED, SHADOW, CANARY = "fixed", "shadow", "canary-"
ROLLOUT_STATE_FILE = "rollout.json"
SHADOW_FILE = "shadow.json"  # beside the router's weights file: the version it mirrors to
LOCK_FILE = "rollout.lock"
DEFAULT_CHALLENGER_SHARE = 0.1
CRASH_AFTER_ENV = "CIFAR_ROLLOUT_CRASH_AFTER"  # test hook: intent | aliases (module docstring)
# What the journal's last finished record says serving is, compared by check() with now.
JOURNALED_KEYS = ("champion", "challenger", "live_versions", "weights", "shadow", "stage")
Role = Literal["champion", "challenger"]


class RolloutError(RuntimeError):
    """A transition that cannot be carried out as asked; nothing was changed by it."""


@dataclass(frozen=True)
class RolloutPlan:
    """A staged rollout of a challenger: shadow until ``shadow_requests`` mirrored requests,
    then each canary weight of ``steps`` in turn, then promotion. Every stage is judged by the
    gates (cifar_assets.serving.gates) before the next; a failed gate retires the challenger."""

    shadow_requests: int = 200  # mirrored requests the shadow stage needs (0: no shadow stage)
    shadow_share: float = 1.0  # share of the champion's requests mirrored to the challenger
    steps: tuple[float, ...] = (0.05, 0.25, 0.5)  # canary weights, each judged before the next
    min_requests: int = 100  # challenger requests a canary stage needs before it is judged
    max_error_rate: float = 0.01  # errors / requests of the challenger
    max_p95_latency_ratio: float = 1.5  # challenger p95 / champion p95 (an SLO ratio)
    min_shadow_agreement: float = 0.8  # top-1 agreement with the champion on mirrored requests
    srm_alpha: float = 0.001  # sample ratio mismatch: chi-square p below this fails
    accuracy_alpha: float = 0.05  # always-valid sequential test on labelled feedback
    # Labelled requests per arm a stage waits for before it may advance (0: judge on whatever
    # feedback exists; the accuracy test can still stop a worse challenger at any look).
    min_labelled_per_arm: int = 0

    def __post_init__(self) -> None:
        if not all(0 < w <= 0.5 for w in self.steps) or list(self.steps) != sorted(self.steps):
            raise RolloutError(
                f"Rollout steps {list(self.steps)}: give increasing canary weights in (0, 0.5] "
                "(the champion keeps the most traffic until the promotion)."
            )
        if self.shadow_requests < 0 or not 0 < self.shadow_share <= 1:
            raise RolloutError(
                f"shadow_requests={self.shadow_requests}, shadow_share={self.shadow_share}: use "
                "a count >= 0 and a share in (0, 1]."
            )

    def to_dict(self) -> dict[str, Any]:
        plan = asdict(self)
        plan["steps"] = list(self.steps)
        return plan

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RolloutPlan:
        return cls(**{**values, "steps": tuple(values.get("steps", cls.steps))})

    def first_stage(self) -> str:
        return SHADOW if self.shadow_requests > 0 else f"{CANARY}0"

    def next_stage(self, stage: str) -> str | None:
        """The stage after ``stage``; None when the next move is the promotion."""
        if stage == SHADOW:
            return f"{CANARY}0" if self.steps else None
        index = int(stage.removeprefix(CANARY)) + 1
        return f"{CANARY}{index}" if index < len(self.steps) else None


@dataclass(frozen=True)
class LifecycleState:
    """One reading of the whole state: the registry's aliases and what serving does."""

    champion: int | None
    challenger: int | None
    live_versions: list[int]
    weights: dict[int, float]
    verified: list[int]
    challenger_share: float
    shadow: tuple[int, float] | None = None  # (version, share) the router mirrors to
    stage: str | None = None  # fixed | shadow | canary-<i>, while a challenger serves
    stage_started: str | None = None
    plan: RolloutPlan | None = None

    def to_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state["weights"] = {str(v): w for v, w in sorted(self.weights.items())}
        state["shadow"] = list(self.shadow) if self.shadow else None
        state["plan"] = self.plan.to_dict() if self.plan else None
        return state

    def desired(self) -> tuple[dict[int, float], tuple[int, float] | None]:
        return desired_serving(
            self.champion,
            self.challenger,
            self.verified,
            self.challenger_share,
            self.stage,
            self.plan,
        )


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
    champion: int | None,
    challenger: int | None,
    verified: list[int],
    challenger_share: float,
    stage: str | None = None,
    plan: RolloutPlan | None = None,
) -> tuple[dict[int, float], tuple[int, float] | None]:
    """The router weights and shadow target that the aliases and the rollout stage call for:
    the champion and a verified challenger share the traffic (the challenger's share set by the
    stage), nothing else gets any; empty while there is no servable champion."""
    if champion is None or champion not in verified:
        return {}, None
    if challenger is None or challenger == champion or challenger not in verified:
        return {champion: 1.0}, None
    if stage == SHADOW and plan is not None:
        return {champion: 1.0}, (challenger, plan.shadow_share)
    if stage is not None and stage.startswith(CANARY) and plan is not None:
        share = plan.steps[int(stage.removeprefix(CANARY))]
    else:
        share = challenger_share
    return {champion: 1.0 - share, challenger: share}, None


def write_shadow_target(state_dir: Path, shadow: tuple[int, float] | None) -> None:
    """The router's shadow target (version, share), or None for no mirroring. Only the rollout
    (and benchmarks on a scratch server) write it."""
    value = {"version": shadow[0], "share": shadow[1]} if shadow else None
    write_json_atomic(state_dir / SHADOW_FILE, value)


def _crash_point(point: str) -> None:
    """The crash test's hook (module docstring): SIGKILL, as a power cut would, at ``point``."""
    if os.environ.get(CRASH_AFTER_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


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
        models: registry.Registry,
        triton: Any,
        repo: Path,
        state_dir: Path,
    ) -> None:
        self.models = models
        self.triton = triton
        self.repo = repo
        self.state_dir = state_dir

    # -----------------------------------------------------------------------------------------
    # Reading the state

    def _settings(self) -> dict[str, Any]:
        """What the rollout keeps besides MLflow and the router: the versions that passed their
        Triton check, the fixed challenger share, and the stage of a staged rollout."""
        path = self.state_dir / ROLLOUT_STATE_FILE
        settings: dict[str, Any] = {
            "verified": [],
            "challenger_share": DEFAULT_CHALLENGER_SHARE,
            "stage": None,
            "stage_started": None,
            "plan": None,
        }
        if not path.is_file():
            return settings
        try:
            stored = json.loads(path.read_text())
            settings.update(stored)
            settings["verified"] = sorted(int(v) for v in settings["verified"])
            settings["challenger_share"] = float(settings["challenger_share"])
            if settings["plan"] is not None:
                RolloutPlan.from_dict(settings["plan"])
        except (ValueError, KeyError, TypeError, RolloutError) as error:
            raise RolloutError(
                f"{path} is unreadable ({error}). It lists the versions that passed their "
                "Triton check and the rollout stage; delete it and re-run triton_deployment for "
                "the versions that should serve."
            ) from error
        return settings

    def _write_settings(self, settings: Mapping[str, Any]) -> None:
        write_json_atomic(self.state_dir / ROLLOUT_STATE_FILE, dict(settings))

    def _read_shadow(self) -> tuple[int, float] | None:
        path = self.state_dir / SHADOW_FILE
        if not path.is_file():
            return None
        shadow = json.loads(path.read_text())
        return (int(shadow["version"]), float(shadow["share"])) if shadow else None

    def _write_shadow(self, shadow: tuple[int, float] | None) -> None:
        write_shadow_target(self.state_dir, shadow)

    def state(self) -> LifecycleState:
        aliases = self.models.aliases()
        settings = self._settings()
        return LifecycleState(
            champion=aliases.get(registry.CHAMPION),
            challenger=aliases.get(registry.CHALLENGER),
            live_versions=repository.read_live_versions(self.state_dir),
            weights=repository.read_ab_weights(self.state_dir),
            verified=settings["verified"],
            challenger_share=settings["challenger_share"],
            shadow=self._read_shadow(),
            stage=settings["stage"],
            stage_started=settings["stage_started"],
            plan=RolloutPlan.from_dict(settings["plan"]) if settings["plan"] else None,
        )

    def check(self, server_ready: Callable[[int], bool] | None = None) -> list[str]:
        """Every way the current state breaks the rule; empty when MLflow, the router's
        weights, Triton's live versions and the journal agree. ``server_ready(version)``, when
        given, asks the running server whether a live version really answers."""
        state = self.state()
        problems: list[str] = []
        weighted = {v: w for v, w in state.weights.items() if w > 0}
        if weighted:
            top = max(weighted.values())
            if state.champion is None or weighted.get(state.champion, 0.0) < top:
                leader = min(v for v, w in weighted.items() if w == top)
                problems.append(
                    f"v{leader} has the most router traffic ({top:.0%}) but MLflow's champion is "
                    f"{_label(state.champion)}"
                )
        elif state.champion is not None and state.champion in state.verified:
            problems.append(f"champion v{state.champion} is servable but gets no traffic")
        aliased = {state.champion, state.challenger} - {None}
        serving = sorted(set(weighted) | ({state.shadow[0]} if state.shadow else set()))
        for version in serving:
            if version not in state.live_versions:
                problems.append(f"v{version} gets router traffic but is not live in Triton")
            if version not in aliased:
                problems.append(f"v{version} gets router traffic but has no MLflow alias")
            if server_ready is not None and not server_ready(version):
                problems.append(f"v{version} gets router traffic but Triton does not serve it")
        expected, shadow = state.desired()
        if weighted and (_rounded(weighted) != _rounded(expected) or state.shadow != shadow):
            problems.append(
                f"router weights {_rounded(weighted)} (shadow {state.shadow}) differ from what "
                f"the aliases and stage call for ({_rounded(expected)}, shadow {shadow})"
            )
        unfinished = self.unfinished()
        if unfinished is not None:
            problems.append(
                f"transition {unfinished['id']} ({unfinished['action']}) has an intent but no "
                "completion in the journal; run reconcile"
            )
        else:
            problems += self._differences_from_journal(state)
        return problems

    def _differences_from_journal(self, state: LifecycleState) -> list[str]:
        last, moved = self._moved_outside(state)
        return [
            f"{key} is {now} but the journal's last transition {last['id']} ({last['action']} "
            f"at {last['time']}) left it {recorded}: it was moved outside the rollout; run "
            "`cifar-triton reconcile` to bring serving to MLflow's aliases and journal it"
            for key, (recorded, now) in moved.items()
        ]

    def _moved_outside(
        self, state: LifecycleState
    ) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
        """The journal's last finished record and, for each key of its ``after`` that MLflow's
        aliases, the rollout settings, the router or Triton's live versions no longer show,
        (recorded, now): what moved since without going through the rollout."""
        last = self.last_finished()
        if last is None:
            return {}, {}
        recorded, now = last["after"], state.to_dict()
        return last, {
            key: (recorded.get(key), now[key])
            for key in JOURNALED_KEYS
            if recorded.get(key) != now[key]
        }

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

    def last_finished(self) -> dict[str, Any] | None:
        """The journal's last ``done`` or ``failed`` record (both keep the state they left)."""
        finished = [r for r in self.journal() if r["phase"] != "intent"]
        return finished[-1] if finished else None

    def unfinished(self) -> dict[str, Any] | None:
        """The intent of a transition that never recorded its end (a crash), if any."""
        records = self.journal()
        ended = {r["id"] for r in records if r["phase"] != "intent"}
        pending = [r for r in records if r["phase"] == "intent" and r["id"] not in ended]
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
        """Serve what ``target``'s aliases and stage call for: load, then weight (and shadow),
        then unload."""
        weights, shadow = target.desired()
        if not weights:
            raise RolloutError(
                f"MLflow's champion is {_label(target.champion)}, which has not passed its "
                f"Triton check (verified versions: {target.verified or 'none'}); run "
                "triton_deployment for it (main_job does), then try again."
            )
        live_before = repository.read_live_versions(self.state_dir)
        wanted = sorted(set(weights) | ({shadow[0]} if shadow else set()))
        if set(wanted) - set(live_before):
            repository.set_live_versions(
                self.triton,
                sorted({*live_before, *wanted}),
                repo=self.repo,
                state_dir=self.state_dir,
            )
        # The shadow target leaves before the weights change and arrives after them, so the
        # router never mirrors to a version that is about to be unloaded.
        if self._read_shadow() != shadow and shadow is None:
            self._write_shadow(None)
        repository.set_ab_weights(weights, state_dir=self.state_dir)
        if shadow is not None:
            self._write_shadow(shadow)
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
        settings: Mapping[str, Any] | None = None,
        evidence: Mapping[str, Any] | None = None,
    ) -> Transition:
        """Journal the intent, move the aliases and the settings, apply serving, journal the
        end. ``settings`` replaces keys of the rollout settings (verified, stage, plan, ...)."""
        before = self.state()
        before_settings = self._settings()
        after_settings = {**before_settings, **(settings or {})}
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
                "settings": after_settings,
                "before": before.to_dict(),
            }
        )
        _crash_point("intent")
        started = time.monotonic()
        try:
            self._write_settings(after_settings)
            self._set_aliases(target_aliases, f"{action}: {reason}", actor)
            _crash_point("aliases")
            self._apply(self.state())
        except Exception as error:
            self._undo(before, before_settings)
            self._append(
                {
                    **base,
                    "phase": "failed",
                    "time": _now(),
                    "error": str(error)[:2000],
                    "after": self.state().to_dict(),
                }
            )
            raise
        after = self.state()
        self._append(
            {
                **base,
                "phase": "done",
                "time": _now(),
                "seconds": round(time.monotonic() - started, 3),
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

    def _undo(self, before: LifecycleState, settings: Mapping[str, Any]) -> None:
        """Put aliases, settings and serving back as they were before a failed transition."""
        self._write_settings(settings)
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
            self._write_shadow(None)
            repository.set_ab_weights(before.weights, state_dir=self.state_dir)
            self._write_shadow(before.shadow)
            repository.set_live_versions(
                self.triton, before.live_versions, repo=self.repo, state_dir=self.state_dir
            )

    def _set_aliases(self, aliases: Mapping[str, int | None], reason: str, actor: str) -> None:
        for alias, version in aliases.items():
            self.models.set_alias(alias, version, reason, actor)

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
        plan: RolloutPlan | None = None,
    ) -> Transition:
        """Serve a new registered ``version`` as ``role``, the registry's decision for it.

        The version is loaded beside what serves, without traffic, and ``verify()`` (which
        raises when the version must not serve) checks it; only then does MLflow give it its
        alias and the router its traffic. A champion takes the traffic of the previous one. A
        challenger replaces any earlier challenger and gets ``challenger_share`` of the traffic,
        or, with a ``plan``, starts that staged rollout (shadow first, unless the plan skips
        it). A version that fails ``verify`` gets no alias and no traffic, and Triton is left as
        it was.
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
            if role == "champion":
                target = {
                    registry.CHAMPION: version,
                    registry.CHALLENGER: None
                    if current.challenger == version
                    else current.challenger,
                }
            else:
                if current.champion is None:
                    raise RolloutError(
                        f"Version {version} cannot serve as challenger: there is no champion "
                        "yet. Deploy it as champion (the registry's gate promotes a first "
                        "version)."
                    )
                target = {registry.CHAMPION: current.champion, registry.CHALLENGER: version}
            settings: dict[str, Any] = {"verified": sorted({*current.verified, version})}
            if challenger_share is not None:
                settings["challenger_share"] = challenger_share
            if role == "challenger":
                settings |= _stage(plan.first_stage() if plan else FIXED, plan)
            elif target[registry.CHALLENGER] is None:
                settings |= _stage(None, None)
            return self._transition(
                "deploy",
                version,
                target,
                f"deployed as {role}: {reason}",
                actor,
                settings,
                evidence,
            )

    def step(
        self, *, reason: str, actor: str, evidence: Mapping[str, Any] | None = None
    ) -> Transition:
        """Advance the staged rollout: shadow to the first canary weight, each weight to the
        next, and the last to the challenger's promotion."""
        with self._locked():
            self._finish_unfinished(actor)
            current = self.state()
            if current.challenger is None or current.plan is None or current.stage in (None, FIXED):
                raise RolloutError(
                    f"No staged rollout is running (challenger {_label(current.challenger)}, "
                    f"stage {current.stage or 'none'}); deploy a challenger with a rollout plan."
                )
            following = current.plan.next_stage(current.stage or SHADOW)
            if following is None:
                return self._promote(current, current.challenger, reason, actor, evidence)
            return self._transition(
                "step",
                current.challenger,
                {registry.CHAMPION: current.champion, registry.CHALLENGER: current.challenger},
                f"{current.stage} -> {following}: {reason}",
                actor,
                _stage(following, current.plan),
                evidence,
            )

    def promote(
        self, version: int, *, reason: str, actor: str, evidence: Mapping[str, Any] | None = None
    ) -> Transition:
        """Make ``version`` the champion and give it the champion's traffic."""
        with self._locked():
            self._finish_unfinished(actor)
            return self._promote(self.state(), version, reason, actor, evidence)

    def _promote(
        self,
        current: LifecycleState,
        version: int,
        reason: str,
        actor: str,
        evidence: Mapping[str, Any] | None,
    ) -> Transition:
        if version not in current.verified:
            raise RolloutError(
                f"v{version} has not passed its Triton check (verified: "
                f"{current.verified or 'none'}); deploy it with triton_deployment first."
            )
        target = {
            registry.CHAMPION: version,
            registry.CHALLENGER: None if current.challenger == version else current.challenger,
        }
        stage = _stage(None, None) if target[registry.CHALLENGER] is None else {}
        return self._transition("promote", version, target, reason, actor, stage, evidence)

    def rollback(
        self, *, reason: str, actor: str, evidence: Mapping[str, Any] | None = None
    ) -> Transition:
        """Give the champion alias, and its traffic, back to the previous champion."""
        with self._locked():
            self._finish_unfinished(actor)
            current = self.state()
            previous = self.models.previous_champion()
            if previous is None:
                raise RolloutError(
                    f"{self.models.name} has no earlier champion to roll back to (champion: "
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
            stage = _stage(None, None) if target[registry.CHALLENGER] is None else {}
            return self._transition("rollback", previous, target, reason, actor, stage, evidence)

    def retire(
        self, version: int, *, reason: str, actor: str, evidence: Mapping[str, Any] | None = None
    ) -> Transition:
        """Take ``version`` (a challenger, never the champion) out of the registry's aliases
        and out of serving; a staged rollout of it ends (an automatic rollback does this)."""
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
            settings = {"verified": [v for v in current.verified if v != version]}
            if current.challenger == version:
                settings |= _stage(None, None)
            return self._transition("retire", version, target, reason, actor, settings, evidence)

    def reconcile(self, actor: str = "reconcile") -> Transition | None:
        """Complete a transition a crash left between its intent and its end, or bring serving
        to MLflow's aliases if it drifted from them or from the journal (an alias moved by
        hand), journaling what was found; None when all agreed already."""
        with self._locked():
            transition = self._finish_unfinished(actor)
            if transition is not None:
                return transition
            current = self.state()
            expected, shadow = current.desired()
            _, moved = self._moved_outside(current)
            if (
                not moved
                and _rounded(current.weights) == _rounded(expected)
                and current.shadow == shadow
                and set(current.live_versions) == set(expected) | ({shadow[0]} if shadow else set())
            ):
                return None
            found = ", ".join(f"{key} {was} -> {now}" for key, (was, now) in moved.items())
            return self._transition(
                "reconcile",
                current.champion,
                {registry.CHAMPION: current.champion, registry.CHALLENGER: current.challenger},
                f"moved outside the rollout: {found}"
                if moved
                else "serving differed from MLflow's aliases",
                actor,
            )

    def _finish_unfinished(self, actor: str) -> Transition | None:
        intent = self.unfinished()
        if intent is None:
            return None
        target = {
            k: (int(v) if v is not None else None) for k, v in intent["target_aliases"].items()
        }
        started = time.monotonic()
        self._write_settings(intent["settings"])
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
                "seconds": round(time.monotonic() - started, 3),
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
            intent["before"],
            after.to_dict(),
            intent.get("evidence", {}),
        )


def _stage(stage: str | None, plan: RolloutPlan | None) -> dict[str, Any]:
    return {
        "stage": stage,
        "stage_started": _now() if stage else None,
        "plan": plan.to_dict() if plan else None,
    }


def _label(version: int | None) -> str:
    return "none" if version is None else f"v{version}"


def _rounded(weights: Mapping[int, float]) -> dict[int, float]:
    return {int(v): round(float(w), 6) for v, w in weights.items() if w > 0}
