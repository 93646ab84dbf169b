"""The lifecycle owner on a real tritonserver and a real MLflow store: every transition moves
MLflow's aliases, Triton's live versions and the router's weights together, under traffic that
never fails, with a journal that a crash mid-transition leaves for reconcile() to complete."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cifar_assets.ml import registry
from cifar_assets.ml.model import Architecture, build_resnet18, save_model
from cifar_assets.ml.registry import Registry
from cifar_assets.ml.tracking import tracking_run
from cifar_assets.serving import repository
from cifar_assets.serving.client import infer_ab
from cifar_assets.serving.rollout import Rollout, RolloutError
from tests.serving_fixtures import ServingEnv

MODEL = "cifar10-resnet18"


def registered(uri: str, tmp_path: Path, versions: int) -> None:
    """Versions 1..n in the registry without aliases, as the pipeline registers them."""
    arch = Architecture(stem="imagenet")
    for number in range(1, versions + 1):
        model_dir = save_model(build_resnet18(arch), arch, tmp_path / f"m{number}").parent
        with tracking_run(uri, "rollout-test", f"train-{number}", {}) as run_id:
            pass
        Registry(uri).register(run_id, model_dir, {"accuracy": 0.5}, "data", alias=None)


def evidence() -> dict[str, Any]:
    return {"max_abs_diff_vs_onnxruntime": 0.0}


class Traffic:
    """Routed requests from a background thread while transitions happen; counts failures."""

    def __init__(self, url: str) -> None:
        self.url, self.ok, self.failed = url, 0, []  # type: ignore[var-annotated]
        self.stop = threading.Event()
        self.images = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        user = 0
        while not self.stop.is_set():
            user += 1
            try:
                infer_ab(self.images, user_id=f"u{user}", url=self.url)
                self.ok += 1
            except Exception as error:
                self.failed.append(repr(error))

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def whole_state(rollout: Rollout, env: ServingEnv) -> dict[str, Any]:
    state = rollout.state()
    return {
        "champion": state.champion,
        "challenger": state.challenger,
        "weights": state.weights,
        "live": state.live_versions,
        "ready": [v for v in (1, 2) if rollout.server_ready(v)],
        "problems": rollout.check(server_ready=rollout.server_ready),
    }


def test_transitions_move_registry_and_serving_together(
    triton_server: ServingEnv, tmp_path: Path
) -> None:
    env = triton_server
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registered(uri, tmp_path, 2)
    rollout = Rollout(
        models=Registry(uri, MODEL),
        triton=env.http_url,
        repo=env.repo,
        state_dir=env.state_dir,
    )
    with Traffic(env.http_url) as traffic:
        rollout.deploy(1, "champion", evidence, reason="first model", actor="test")
        assert whole_state(rollout, env) == {
            "champion": 1,
            "challenger": None,
            "weights": {1: 1.0},
            "live": [1],
            "ready": [1],
            "problems": [],
        }

        # A version that fails its check gets no alias, no traffic, and is unloaded again.
        def fails() -> dict[str, Any]:
            raise RuntimeError("differs from ONNX Runtime")

        with pytest.raises(RuntimeError, match="differs"):
            rollout.deploy(2, "challenger", fails, reason="retrained", actor="test")
        assert whole_state(rollout, env)["live"] == [1]
        assert rollout.state().challenger is None

        rollout.deploy(2, "challenger", evidence, reason="retrained", actor="test")
        assert whole_state(rollout, env) == {
            "champion": 1,
            "challenger": 2,
            "weights": {1: 0.9, 2: 0.1},
            "live": [1, 2],
            "ready": [1, 2],
            "problems": [],
        }

        rollout.promote(2, reason="A/B test won", actor="test", evidence={"p": 0.001})
        assert whole_state(rollout, env) == {
            "champion": 2,
            "challenger": None,
            "weights": {2: 1.0},
            "live": [2],
            "ready": [2],
            "problems": [],
        }

        rollout.rollback(reason="v2 misbehaves", actor="test")
        assert whole_state(rollout, env) == {
            "champion": 1,
            "challenger": None,
            "weights": {1: 1.0},
            "live": [1],
            "ready": [1],
            "problems": [],
        }
        with pytest.raises(RolloutError, match="is the champion"):
            rollout.retire(1, reason="no", actor="test")
    assert traffic.failed == [] and traffic.ok > 20

    done = [r for r in rollout.journal() if r["phase"] == "done"]
    assert [r["action"] for r in done] == ["deploy", "deploy", "promote", "rollback"]
    assert done[2]["evidence"] == {"p": 0.001}
    assert done[3]["before"]["champion"] == 2 and done[3]["after"]["champion"] == 1
    # A failed check happens before the transition starts: nothing moved, nothing to undo.
    assert [r["phase"] for r in rollout.journal()].count("failed") == 0
    moves = Registry(uri, MODEL).history(alias=registry.CHAMPION)
    assert [(m.from_version, m.to_version) for m in moves] == [(None, 1), (1, 2), (2, 1)]


def test_a_crash_mid_transition_is_completed_by_reconcile(
    triton_server: ServingEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = triton_server
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registered(uri, tmp_path, 2)

    def make() -> Rollout:
        return Rollout(
            models=Registry(uri, MODEL),
            triton=env.http_url,
            repo=env.repo,
            state_dir=env.state_dir,
        )

    rollout = make()
    rollout.deploy(1, "champion", evidence, reason="first", actor="test")
    rollout.deploy(2, "challenger", evidence, reason="second", actor="test")

    real = repository.set_ab_weights

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt("killed between the alias move and the weights")

    monkeypatch.setattr(repository, "set_ab_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        rollout.promote(2, reason="A/B test won", actor="test")
    monkeypatch.setattr(repository, "set_ab_weights", real)
    # MLflow moved, serving did not: the check says so, and names the unfinished transition.
    problems = rollout.check(server_ready=rollout.server_ready)
    assert any("most router traffic" in p for p in problems), problems
    assert any("run reconcile" in p for p in problems), problems

    restarted = make()
    transition = restarted.reconcile(actor="next start")
    assert transition is not None and transition.action == "promote"
    assert whole_state(restarted, env) == {
        "champion": 2,
        "challenger": None,
        "weights": {2: 1.0},
        "live": [2],
        "ready": [2],
        "problems": [],
    }
    assert restarted.journal()[-1]["completed_by"] == "reconcile"
    assert restarted.reconcile() is None  # nothing left to do
