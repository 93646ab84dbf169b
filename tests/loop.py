"""The closed loop's steps, shared by the two tests that drive it as a user does:
tests/test_closed_loop.py (``dagster dev`` on sqlite) and tests/test_stack.py (the production
stack: PostgreSQL, the MLflow server, the daemon of its own, Prometheus).

A :class:`Loop` is one Dagster instance with a webserver, the settings in its ``env``, and the
figures a test prints. The steps (:func:`drop_and_check`, :func:`retraining_serves_challenger`,
:func:`ab_test_and_promote`, :func:`roll_back`) assert that every run succeeded and check the
whole state (MLflow's aliases, Triton's live versions, the router's weights) after every step.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
from PIL import Image

from tests.conftest import PROJECT_ROOT, subprocess_env, whole_state

DAGSTER = str(PROJECT_ROOT / "scripts" / "dagster")
FAILED = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
# Small enough for two CPU cores, big enough that the model beats chance and drift shows.
TRAINING = {
    "cifar10_raw": {"config": {"source": "synthetic", "num_images": 1200, "seed": 0}},
    "cifar10_splits": {"config": {"validation_fraction": 0.15, "test_fraction": 0.15, "seed": 0}},
    "trained_model": {"config": {"stem": "imagenet", "epochs": 2, "batch_size": 64, "lr": 0.1}},
    "onnx_model": {"config": {"parity_images": 64, "calibration_images": 64}},
    "drift_baseline": {"config": {"reference_images": 180}},
}


def job_execute(job: str, config: Path | None = None, *extra: str) -> list[str]:
    """The arguments of ``dagster job execute`` for ``job`` of the code location, as users
    type them after ``./scripts/dagster``."""
    config_args = ["-c", str(config)] if config else []
    return ["job", "execute", "-m", "cifar_assets.definitions", "-j", job, *config_args, *extra]


# champion, challenger, router weights: what the whole state must say after a step
State = tuple[int, int | None, dict[int, float]]
CHAMPION_ONLY: State = (1, None, {1: 1.0})


def expected_state(
    champion: int, challenger: int | None, weights: dict[int, float]
) -> dict[str, Any]:
    """The whole state (see ``whole_state``) when the registry and serving agree: every
    weighted version is live and answers, and nothing else is."""
    live = sorted(weights)
    return {
        "champion": champion,
        "challenger": challenger,
        "weights": weights,
        "live": live,
        "ready": live,
        "problems": [],
    }


@dataclass
class Loop:
    env: dict[str, str]
    port: int  # the Dagster webserver's
    figures: dict[str, Any] = field(default_factory=dict)
    # more views of the state to check after each change (the stack: Prometheus' gauges)
    watch: Callable[[dict[str, Any]], None] | None = None

    @property
    def var(self) -> Path:
        return Path(self.env["CIFAR_VAR_DIR"])

    @property
    def incoming(self) -> Path:
        return self.var / "incoming"

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(self.env["DAGSTER_HOME"])

    def runs(self) -> list[dg.DagsterRun]:
        with self.instance() as instance:
            return list(reversed(instance.get_runs()))

    def wait_for_runs(
        self, done: Callable[[list[dg.DagsterRun]], bool], what: str, timeout_s: float
    ) -> list[dg.DagsterRun]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            runs = self.runs()
            failed = [r for r in runs if r.status in FAILED]
            assert not failed, self.failure_report(failed)
            if done(runs):
                return runs
            time.sleep(2)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}: {self.summary()}")

    def summary(self) -> str:
        return ", ".join(f"{r.job_name}:{r.status.value}" for r in self.runs())

    def failure_report(self, failed: list[dg.DagsterRun]) -> str:
        lines = []
        with self.instance() as instance:
            for run in failed:
                for entry in instance.all_logs(run.run_id):
                    if entry.dagster_event and entry.dagster_event.is_failure:
                        lines.append(f"{run.job_name}: {entry.message[:1500]}")
        return f"runs failed: {self.summary()}\n" + "\n".join(lines[-6:])

    def dagster(self, *args: str, timeout_s: float = 900) -> str:
        """``./scripts/dagster ARGS`` with the loop's settings; asserts it succeeds."""
        result = subprocess.run(
            [DAGSTER, *args],
            cwd=PROJECT_ROOT,
            env=subprocess_env(self.env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        return result.stdout + result.stderr

    def launch(self, job: str, run_config: dict[str, Any]) -> str:
        """Launch ``job`` through the webserver's GraphQL, as the launchpad does."""
        from dagster_graphql import DagsterGraphQLClient

        client = DagsterGraphQLClient("127.0.0.1", port_number=self.port)
        return client.submit_job_execution(
            job, repository_location_name="cifar_assets", run_config=run_config
        )

    def assert_state(
        self, champion: int, challenger: int | None, weights: dict[int, float]
    ) -> None:
        expected = expected_state(champion, challenger, weights)
        state = whole_state()
        assert state == expected
        if self.watch is not None:
            self.watch(state)


def finished(runs: list[dg.DagsterRun], job: str) -> bool:
    return any(r.job_name == job and r.status == dg.DagsterRunStatus.SUCCESS for r in runs)


def write_noisy_batch(incoming: Path) -> None:
    """A labelled gaussian-noise batch (severity 3) with unequal classes (10 to 37 images)."""
    from cifar_assets.data.corruptions import corrupt
    from cifar_assets.data.imageset import CLASSES, save_npz
    from cifar_assets.data.synthetic import generate_synthetic

    incoming.mkdir(parents=True, exist_ok=True)
    noisy = generate_synthetic(400, seed=12)
    keep = np.concatenate(
        [np.flatnonzero(noisy.labels == c)[: 10 + 3 * c] for c in range(len(CLASSES))]
    )
    save_npz(
        incoming / "noisy.npz",
        {
            "images": corrupt(noisy.images[keep], "gaussian_noise", 3),
            "labels": noisy.labels[keep],
        },
    )


def small_clean_batch(name: str, seed: int) -> Callable[[Path], None]:
    """A writer of ``name.npz``: 20 clean unlabelled images, enough for a verdict; dropped
    only to see whose detectors judge it."""

    def write(incoming: Path) -> None:
        from cifar_assets.data.imageset import save_npz
        from cifar_assets.data.synthetic import generate_synthetic

        incoming.mkdir(parents=True, exist_ok=True)
        save_npz(incoming / f"{name}.npz", {"images": generate_synthetic(20, seed=seed).images})

    return write


def write_batches(incoming: Path, outside: Path) -> None:
    """A clean unlabelled batch, the noisy labelled one, a labelled image folder and a
    symlink to a file outside the folder (refused)."""
    from cifar_assets.data.imageset import CLASSES, save_npz
    from cifar_assets.data.synthetic import generate_synthetic

    clean = generate_synthetic(200, seed=11)
    save_npz(incoming / "clean.npz", {"images": clean.images})  # unlabelled, like traffic
    write_noisy_batch(incoming)
    # A labelled image folder: four classes, 9/4/13/6 files, PNG and JPEG, some not 32x32.
    photos = generate_synthetic(200, seed=13)
    for name, count in (("airplane", 9), ("cat", 4), ("dog", 13), ("ship", 6)):
        folder = incoming / "field_photos" / name
        folder.mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(photos.labels == CLASSES.index(name))[:count]):
            picture = Image.fromarray(photos.images[index])
            if i % 3 == 0:
                picture.resize((48, 40)).save(folder / f"IMG_{i:04d}.JPG", quality=92)
            else:
                picture.save(folder / f"img_{i}.png")
    # A symlink to a file outside the folder: refused, and it blocks nothing.
    save_npz(outside, {"images": clean.images[:20]})
    (incoming / "elsewhere.npz").symlink_to(outside)


def drift_verdicts(loop: Loop) -> dict[str, dict[str, Any]]:
    """Every drift report of the instance: batch -> verdict, labelled, model version, time."""
    with loop.instance() as instance:
        records = instance.fetch_materializations(dg.AssetKey("drift_report"), limit=50).records
    verdicts = {}
    for record in records:
        metadata = record.asset_materialization.metadata  # type: ignore[union-attr]
        verdicts[str(record.partition_key)] = {
            "drift": metadata["drift"].value,
            "labelled": metadata["labelled"].value,
            "model_version": metadata["model_version"].value,
            "time": record.timestamp,
        }
    return verdicts


def retraining_actions(loop: Loop) -> dict[str, str]:
    """batch -> what the retraining policy recorded on its drift report (first word kept)."""
    with loop.instance() as instance:
        records = instance.fetch_observations(dg.AssetKey("drift_report"), limit=50).records
    actions = {}
    for record in reversed(records):  # oldest first: a report's latest action wins
        observation = record.asset_observation
        assert observation is not None
        action = str(observation.metadata["retraining_action"].value)
        actions[str(record.partition_key)] = (
            "requested" if action.startswith("retraining requested") else action.split(":")[0]
        )
    return actions


def drop_and_check(
    loop: Loop,
    write: Callable[[Path], None],
    batches: set[str],
    state: State = CHAMPION_ONLY,
) -> dict[str, dict[str, Any]]:
    """Drop ``batches`` into the incoming folder (``write``) and wait until the daemon has
    checked each against the detectors of ``state``'s champion, which the whole state must
    still show; records the time from the drop to each verdict. Returns every verdict of the
    instance (earlier batches included)."""
    dropped = time.time()
    write(loop.incoming)
    loop.wait_for_runs(
        lambda runs: (
            batches
            <= {
                r.tags.get("dagster/partition")
                for r in runs
                if r.job_name == "drift_check_job" and r.status == dg.DagsterRunStatus.SUCCESS
            }
        ),
        f"the drift checks of {sorted(batches)}",
        timeout_s=900,
    )
    verdicts = drift_verdicts(loop)
    for batch in sorted(batches):
        loop.figures[f"dropped_to_verdict_{batch}_s"] = round(verdicts[batch]["time"] - dropped, 1)
    champion = state[0]
    assert {b: verdicts[b]["model_version"] for b in batches} == dict.fromkeys(batches, champion)
    loop.assert_state(*state)
    return verdicts


def retraining_serves_challenger(loop: Loop, verdicts: dict[str, dict[str, Any]]) -> None:
    """The drift sensor's one retraining for every drifted report, trained on every labelled
    drifted batch, serves v2 as challenger beside champion v1; each report has its action."""
    from cifar_assets.resources import stored_value_path

    drifted_at = max(v["time"] for v in verdicts.values() if v["drift"])
    runs = loop.wait_for_runs(
        lambda runs: finished(runs, "retraining_job"), "the retraining run", timeout_s=1200
    )
    (retraining,) = [r for r in runs if r.job_name == "retraining_job"]
    drifted = sorted(b for b, v in verdicts.items() if v["drift"])
    assert sorted(retraining.tags["cifar/drift_batches"].split(",")) == drifted
    extra = retraining.run_config["ops"]["cifar10_raw"]["config"]["extra_batches"]
    # each by the stored version the drift check read (its content-hash path)
    labelled_drifted = [b for b in drifted if verdicts[b]["labelled"]]
    assert sorted(extra) == sorted(stored_value_path("incoming_batch", b) for b in labelled_drifted)
    loop.figures["drifted_verdict_to_challenger_serving_s"] = round(time.time() - drifted_at, 1)
    loop.assert_state(1, 2, {1: 0.9, 2: 0.1})
    assert retraining_actions(loop) == {
        batch: "requested" if verdict["drift"] else "no drift"
        for batch, verdict in verdicts.items()
    }


def send_traffic_with_feedback(users: int) -> dict[int, int]:
    """Requests through the router from ``users`` users, then feedback that says the
    challenger (v2) was right and the champion (v1) wrong: the planted outcome the A/B test
    must find. Returns requests per served version."""
    from cifar_assets.data.synthetic import generate_synthetic
    from cifar_assets.serving.capture import record_feedback
    from cifar_assets.serving.client import infer_ab
    from cifar_assets.serving.launcher import TritonConfig

    config = TritonConfig.from_settings()
    images = generate_synthetic(users, seed=21).images
    served: dict[int, int] = {}
    results = []
    for user in range(users):
        result = infer_ab(images[user : user + 1], user_id=f"user-{user}", url=config.http_url)
        served[result.served_version] = served.get(result.served_version, 0) + 1
        results.append(result)
    for result in results:
        predicted = int(np.argmax(result.logits[0]))
        label = predicted if result.served_version == 2 else (predicted + 1) % 10
        record_feedback(config.capture_dir, result.request_id, label)
    return served


def ab_test_promote_and_roll_back(loop: Loop) -> None:
    """:func:`ab_test_and_promote`, then :func:`roll_back`."""
    ab_test_and_promote(loop)
    roll_back(loop)


def ab_test_and_promote(loop: Loop) -> None:
    """Traffic with feedback through the router, ``ab_test_report`` from the CLI (it says
    promote), then promotion_job through GraphQL; the state after each."""
    served = send_traffic_with_feedback(600)
    assert set(served) == {1, 2} and served[1] > served[2] > 20
    loop.assert_state(1, 2, {1: 0.9, 2: 0.1})
    time.sleep(2)  # the router writes its capture within a second
    started = time.monotonic()
    loop.dagster(
        "asset", "materialize", "-m", "cifar_assets.definitions", "--select", "ab_test_report"
    )
    loop.figures["ab_test_report_cli_s"] = round(time.monotonic() - started, 1)
    with loop.instance() as instance:
        report = instance.get_latest_materialization_event(dg.AssetKey("ab_test_report"))
    assert report is not None and report.asset_materialization is not None
    assert report.asset_materialization.metadata["decision"].value == "promote"
    loop.assert_state(1, 2, {1: 0.9, 2: 0.1})  # the report only reports

    launch_and_wait(loop, "promotion_job", {})
    loop.assert_state(2, None, {2: 1.0})


def roll_back(loop: Loop) -> None:
    """rollback_job through GraphQL: v1 champion again, with all the traffic."""
    reason = {"ops": {"rollback_champion": {"config": {"reason": "user-path test"}}}}
    launch_and_wait(loop, "rollback_job", reason)
    loop.assert_state(1, None, {1: 1.0})


def launch_and_wait(loop: Loop, job: str, run_config: dict[str, Any]) -> None:
    """Launch ``job`` through GraphQL and wait until it succeeds; records the time."""
    started = time.monotonic()
    loop.launch(job, run_config)
    loop.wait_for_runs(lambda runs: finished(runs, job), job, 600)
    loop.figures[f"{job}_launch_to_success_s"] = round(time.monotonic() - started, 1)


def assert_journal(loop: Loop, done: list[tuple[str, int]]) -> None:
    """Every run succeeded, and the rollout journal kept every transition."""
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in loop.runs()), loop.summary()
    journal = [
        json.loads(line)
        for line in (loop.var / "triton" / "rollout_journal.jsonl").read_text().splitlines()
    ]
    assert [(r["action"], r["version"]) for r in journal if r["phase"] == "done"] == done
