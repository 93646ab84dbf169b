"""Apply an A/B decision everywhere at once: MLflow aliases, Triton's live versions and the
router's weights, with an audit record appended to ``<state_dir>/promotions.jsonl``.

Promotion makes the treatment champion and gives it all traffic; rollback gives all traffic back
to the control and retires the treatment. The order keeps traffic safe: weights move before a
version is unloaded, so no request is routed to a version that is gone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

Action = Literal["promote", "rollback"]
AUDIT_FILE = "promotions.jsonl"


@dataclass(frozen=True)
class PromotionRecord:
    time: str
    action: Action
    control: int
    treatment: int
    champion_before: int | None
    champion_after: int | None
    live_versions: list[int]
    weights: dict[str, float]
    reason: str
    actor: str


def apply_ab_decision(
    action: Action,
    *,
    control: int,
    treatment: int,
    reason: str,
    tracking_uri: str,
    model_name: str,
    triton_url: str,
    repo: Path,
    state_dir: Path,
    actor: str = "promotion_job",
) -> PromotionRecord:
    from cifar_assets.ml import registry
    from cifar_assets.serving import repository

    if action not in ("promote", "rollback"):
        raise ValueError(f"action={action!r}: use 'promote' or 'rollback'.")
    if control == treatment:
        raise ValueError(f"control and treatment are both version {control}; nothing to decide.")
    before = registry.get_champion(tracking_uri, model_name)
    winner = treatment if action == "promote" else control
    if action == "promote":
        registry.promote(tracking_uri, treatment, f"A/B test: {reason}", model_name, actor)
    repository.set_ab_weights({winner: 1.0}, state_dir=state_dir)
    live = repository.set_live_versions(triton_url, [winner], repo=repo, state_dir=state_dir)
    after = registry.get_champion(tracking_uri, model_name)
    record = PromotionRecord(
        time=datetime.now(UTC).isoformat(timespec="seconds"),
        action=action,
        control=control,
        treatment=treatment,
        champion_before=before.version if before else None,
        champion_after=after.version if after else None,
        live_versions=live,
        weights={str(winner): 1.0},
        reason=reason,
        actor=actor,
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / AUDIT_FILE).open("a") as audit:
        audit.write(json.dumps(asdict(record)) + "\n")
    return record


def read_audit(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / AUDIT_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
