"""Progressive delivery on a real tritonserver and a real MLflow store, under load from several
threads for at least a minute: shadow, three canary steps and the promotion, judged by the gates
on captured traffic; a slower or less accurate candidate is rolled back on its own; 0 requests
fail throughout. Prints the time of every transition. (The router's p50 with a shadow target
against without is a benchmark: ``benchmarks/router_modes.py --shadow`` alternates the two.)"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cifar_assets.ml.model import Architecture, build_resnet18, save_model
from cifar_assets.ml.registry import Registry
from cifar_assets.ml.tracking import tracking_run
from cifar_assets.serving import repository
from cifar_assets.serving.capture import read_shadow, record_feedbacks
from cifar_assets.serving.client import infer_ab
from cifar_assets.serving.gates import act, judge_stage
from cifar_assets.serving.rollout import Rollout, RolloutPlan
from tests.serving_fixtures import ServingEnv

MODEL = "cifar10-resnet18"


class Load:
    """Routed requests from ``threads`` threads until stopped; every failure is kept."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url = url
        self.failures: list[str] = []
        self.answered: list[tuple[str, int, int]] = []  # request id, version, predicted class
        self.stop_event = threading.Event()
        self.images = np.random.default_rng(5).integers(0, 256, (64, 1, 32, 32, 3), np.uint8)
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(threads)]
        self.started = 0.0
        self.labelled = 0

    def run(self, index: int) -> None:
        n = 0
        while not self.stop_event.is_set():
            n += 1
            try:
                result = infer_ab(self.images[n % 64], user_id=f"t{index}-u{n}", url=self.url)
                predicted = int(np.argmax(result.logits[0]))
                self.answered.append((result.request_id, result.served_version, predicted))
            except Exception as error:
                self.failures.append(repr(error)[:300])

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(60)


def setup_versions(env: ServingEnv, tmp_path: Path, files: dict[int, Path]) -> Rollout:
    """Versions in Triton's repository and in the registry (no aliases yet), v1 champion."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    arch = Architecture(stem="imagenet")
    assert sorted(files) == list(range(1, len(files) + 1)), "registry numbers from 1"
    for version in sorted(files):
        repository.write_version(env.repo, files[version], version, {"run_id": "test"})
        model_dir = save_model(build_resnet18(arch), arch, tmp_path / f"m{version}").parent
        with tracking_run(uri, "rollout", f"train-{version}", {}) as run_id:
            pass
        Registry(uri).register(run_id, model_dir, {"accuracy": 0.5}, "data", alias=None)
    rollout = Rollout(
        models=Registry(uri, MODEL),
        triton=env.http_url,
        repo=env.repo,
        state_dir=env.state_dir,
    )
    rollout.deploy(1, "champion", lambda: {}, reason="first", actor="test")
    return rollout


def drive(rollout: Rollout, env: ServingEnv, timeout_s: float = 240) -> list[dict[str, Any]]:
    """What the rollout sensor does: judge the stage on the capture, act, until the staged
    rollout ends (promoted or rolled back). Returns the judgements that acted."""
    acted = []
    deadline = time.monotonic() + timeout_s
    while rollout.state().stage is not None:
        assert time.monotonic() < deadline, f"rollout stuck: {rollout.state()}"
        judgement = judge_stage(rollout.state(), env.capture_dir)
        if judgement.action == "hold":
            time.sleep(0.5)
            continue
        transition = act(rollout, judgement, actor="test driver")
        assert transition is not None
        # After every transition MLflow, the router, Triton and the journal agree.
        assert rollout.check(server_ready=rollout.server_ready) == [], transition
        acted.append({"stage": judgement.stage, "action": judgement.action, **judgement.to_dict()})
    return acted


@pytest.mark.slow
def test_a_whole_staged_rollout_under_load_fails_no_request(
    triton_server: ServingEnv, onnx_models: dict[int, Path], tmp_path: Path
) -> None:
    env = triton_server
    # v3 is v1's file again: a candidate that agrees with the champion and is as fast.
    same = tmp_path / "same.onnx"
    shutil.copy(onnx_models[1], same)
    rollout = setup_versions(env, tmp_path, {1: onnx_models[1], 2: onnx_models[2], 3: same})
    # The same file on both sides: the latency ratio only measures noise here, which on two
    # shared cores reaches 1.5 now and then at a p95 of a few dozen requests.
    plan = RolloutPlan(
        shadow_requests=150, steps=(0.05, 0.25, 0.5), min_requests=60, max_p95_latency_ratio=2.0
    )

    with Load(env.http_url) as load:
        rollout.deploy(3, "challenger", lambda: {}, reason="retrained", actor="test", plan=plan)
        state = rollout.state()
        assert (state.stage, state.shadow, state.weights) == ("shadow", (3, 1.0), {1: 1.0})
        acted = drive(rollout, env)
        while time.monotonic() - load.started < 60:
            time.sleep(1)
    duration = time.monotonic() - load.started

    assert load.failures == [], load.failures[:5]
    why = [(a["stage"], a["action"], a["reason"]) for a in acted]
    assert [a["stage"] for a in acted] == ["shadow", "canary-0", "canary-1", "canary-2"], why
    assert all(a["action"] == "advance" for a in acted), [(a["stage"], a["reason"]) for a in acted]
    final = rollout.state()
    assert (final.champion, final.challenger, final.weights, final.live_versions) == (
        3,
        None,
        {3: 1.0},
        [3],
    )
    assert final.shadow is None and final.stage is None
    assert rollout.check(server_ready=rollout.server_ready) == []
    mirrored = read_shadow(env.capture_dir)
    assert (mirrored["shadow_version"] == 3).sum() >= 150
    assert mirrored["error"].isna().all()
    assert (mirrored["predicted_class"] == mirrored["champion_class"]).all()  # same file
    served_by = {v for _, v, _ in load.answered}
    assert served_by == {1, 3}
    done = [r for r in rollout.journal() if r["phase"] == "done"]
    steps = [(r["action"], r["seconds"]) for r in done[-4:]]
    assert [a for a, _ in steps] == ["step", "step", "step", "promote"]
    print(
        f"\nstaged rollout: {len(load.answered)} requests in {duration:.0f} s, "
        f"{len(load.failures)} failed; transitions (s): {steps}"
    )


@pytest.mark.slow
def test_a_worse_candidate_is_rolled_back_on_its_own(
    triton_server: ServingEnv, onnx_models: dict[int, Path], tmp_path: Path
) -> None:
    env = triton_server
    rollout = setup_versions(env, tmp_path, {1: onnx_models[1], 2: onnx_models[2]})
    # Less accurate on labelled feedback: the users' true labels are what v1 answers.
    plan = RolloutPlan(shadow_requests=0, steps=(0.25,), min_requests=60, min_labelled_per_arm=40)
    with Load(env.http_url) as load:
        rollout.deploy(2, "challenger", lambda: {}, reason="worse", actor="test", plan=plan)
        deadline = time.monotonic() + 240
        acted: list[dict[str, Any]] = []
        while rollout.state().stage is not None and time.monotonic() < deadline:
            label_what_the_champion_says(load, env)
            judgement = judge_stage(rollout.state(), env.capture_dir)
            if judgement.action != "hold":
                act(rollout, judgement, actor="test driver")
                acted.append(judgement.to_dict())
            time.sleep(1)
    assert load.failures == [], load.failures[:5]
    (verdict,) = acted
    assert verdict["action"] == "rollback" and "accuracy failed" in verdict["reason"]
    state = rollout.state()
    assert (state.champion, state.challenger, state.weights, state.live_versions) == (
        1,
        None,
        {1: 1.0},
        [1],
    )
    assert rollout.journal()[-1]["action"] == "retire"
    assert rollout.check(server_ready=rollout.server_ready) == []


def export_heavier_model(path: Path) -> Path:
    """ResNet18 with the CIFAR stem: its feature maps stay 32x32 through the first stage (the
    ImageNet stem's are 8x8), about 16x the compute per image. A genuinely slower candidate: the
    latency gate compares the versions' model CPU time per image, which a sleep would not move."""
    import torch

    from cifar_assets.ml.onnx_export import export_onnx

    torch.manual_seed(3)
    return export_onnx(build_resnet18(Architecture(stem="cifar")).eval(), path)


@pytest.mark.slow
def test_a_slower_candidate_fails_the_latency_gate_and_is_rolled_back(
    triton_server: ServingEnv, onnx_models: dict[int, Path], tmp_path: Path
) -> None:
    env = triton_server
    same = tmp_path / "same.onnx"
    shutil.copy(onnx_models[1], same)
    heavy = export_heavier_model(tmp_path / "heavy.onnx")
    # Version numbers name one file for good in the module's repository: v4 is the slow one.
    files = {1: onnx_models[1], 2: onnx_models[2], 3: same, 4: heavy}
    rollout = setup_versions(env, tmp_path, files)
    assert rollout.state().live_versions == [1]
    plan = RolloutPlan(shadow_requests=0, steps=(0.25,), min_requests=60)
    with Load(env.http_url) as load:
        rollout.deploy(4, "challenger", lambda: {}, reason="slower", actor="test", plan=plan)
        acted = drive(rollout, env)
    assert load.failures == [], load.failures[:5]
    (verdict,) = acted
    assert (verdict["stage"], verdict["action"]) == ("canary-0", "rollback"), verdict["reason"]
    failed = {gate["name"]: gate for gate in verdict["gates"] if not gate["passed"]}
    assert list(failed) == ["p95_latency_ratio"], verdict["reason"]
    assert failed["p95_latency_ratio"]["value"] > plan.max_p95_latency_ratio
    assert verdict["evidence"]["latency_measure"] == "model_ms"
    state = rollout.state()
    assert (state.champion, state.challenger, state.weights, state.live_versions) == (
        1,
        None,
        {1: 1.0},
        [1],
    )
    last = rollout.journal()[-1]
    assert (last["action"], last["version"], last["phase"]) == ("retire", 4, "done")
    assert "p95_latency_ratio failed" in last["reason"]
    served_by = {version for _, version, _ in load.answered}
    assert served_by == {1, 4}, served_by
    print(
        f"\nslower candidate: p95 model time ratio {failed['p95_latency_ratio']['value']:.1f} "
        f"(limit {plan.max_p95_latency_ratio}); {len(load.answered)} requests, "
        f"{len(load.failures)} failed, {time.monotonic() - load.started:.0f} s of load"
    )


def label_what_the_champion_says(load: Load, env: ServingEnv) -> None:
    """Feedback for the answers not labelled yet: v1's answers are right, the candidate's
    wrong (the planted outcome the gate must catch)."""
    answered = list(load.answered)
    record_feedbacks(
        env.capture_dir,
        [
            (request_id, predicted if version == 1 else (predicted + 1) % 10, 0)
            for request_id, version, predicted in answered[load.labelled :]
        ],
    )
    load.labelled = len(answered)


def test_shadow_evidence_picture_shows_counts_model_time_and_agreement(tmp_path: Path) -> None:
    import pandas as pd
    from PIL import Image

    from cifar_assets.serving.ab_test import shadow_evidence_png

    rng = np.random.default_rng(0)
    n = 120
    mirrored = pd.DataFrame(
        {
            "champion_class": rng.integers(0, 10, n),
            "predicted_class": rng.integers(0, 10, n).astype(float),
            "model_cpu_ms": rng.gamma(4, 2.0, n),
            "champion_model_cpu_ms": rng.gamma(4, 1.0, n),
            "error": [None] * (n - 3) + ["UNAVAILABLE"] * 3,
        }
    )
    mirrored.loc[n - 3 :, "predicted_class"] = np.nan
    plan = RolloutPlan(shadow_requests=100)
    path = shadow_evidence_png(mirrored, 1, 2, plan, tmp_path / "shadow.png")
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size[0] > 900
    # Before any mirrored answer: a picture that says so, not an error.
    empty = shadow_evidence_png(mirrored.iloc[:0], 1, 2, plan, tmp_path / "empty.png")
    assert empty.stat().st_size > 0


def test_rollout_sensor_asks_and_ab_test_report_moves_the_stage(
    triton_server: ServingEnv,
    onnx_models: dict[int, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dagster as dg

    from cifar_assets.artifacts import TritonDeployment
    from cifar_assets.assets.monitoring_assets import ABTestConfig, ab_test_report
    from cifar_assets.resources import MLflowResource, TritonResource
    from cifar_assets.sensors import rollout_sensor
    from tests.test_ab_promotion import point_settings_at

    env = triton_server
    same = tmp_path / "same.onnx"
    shutil.copy(onnx_models[1], same)
    rollout = setup_versions(env, tmp_path, {1: onnx_models[1], 2: onnx_models[2], 3: same})
    point_settings_at(env, rollout.models.uri, monkeypatch)
    plan = RolloutPlan(shadow_requests=40, steps=(0.25,), min_requests=20)
    rollout.deploy(3, "challenger", lambda: {}, reason="sensor test", actor="test", plan=plan)
    resources = {
        "mlflow": MLflowResource(tracking_uri=rollout.models.uri),
        "triton": TritonResource(),
    }

    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources=resources)
        waiting = rollout_sensor(context)
        assert not waiting.run_requests
        assert "mirrored requests so far" in str(waiting.skip_reason)

        images = np.random.default_rng(2).integers(0, 256, (1, 32, 32, 3), np.uint8)
        for user in range(150):
            infer_ab(images, user_id=f"s{user}", url=env.http_url)
        deadline = time.monotonic() + 30
        while (read_shadow(env.capture_dir)["shadow_version"] == 3).sum() < 40:
            assert time.monotonic() < deadline, "the shadow thread wrote too few records"
            time.sleep(0.2)
        (request,) = (
            rollout_sensor(
                dg.build_sensor_context(instance=instance, resources=resources)
            ).run_requests
            or []
        )
        assert request.tags == {"cifar/stage": "shadow", "cifar/verdict": "advance"}

    # What rollout_job runs: the report with apply_rollout, which moves the stage.
    output = ab_test_report(
        context=dg.build_asset_context(),
        config=ABTestConfig(apply_rollout=True),
        triton=TritonResource(),
        mlflow=MLflowResource(tracking_uri=rollout.models.uri),
        triton_deployment=TritonDeployment("cifar10_resnet18", 3, [1, 3], "", ""),
    )
    metadata = output.metadata
    assert metadata["stage"].value == "shadow" and metadata["stage_action"].value == "advance"
    # The shadow stage has its picture too, beside the stage's JSON and in the MLflow run.
    from cifar_assets.settings import get_settings

    picture = get_settings().asset_files("ab_test_report") / "shadow_evidence.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metadata["transition"].value == "step"
    state = rollout.state()
    assert (state.stage, state.weights, state.shadow) == ("canary-0", {1: 0.75, 3: 0.25}, None)
    assert rollout.check(server_ready=rollout.server_ready) == []
    rollout.retire(3, reason="test over", actor="test")
