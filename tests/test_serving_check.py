"""The blocking asset check ``serving_follows_registry`` against a real tritonserver and a real
MLflow store: it passes while MLflow's aliases, the router's weights and Triton's live versions
agree, and fails, naming each problem, when one of them is broken behind the rollout's back (an
alias removed by hand in the MLflow UI, weights edited, a version unloaded)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import dagster as dg
import pytest

from cifar_assets.assets.serving_assets import serving_follows_registry
from cifar_assets.definitions import defs
from cifar_assets.ml.tracking import client_for
from cifar_assets.serving import repository
from cifar_assets.serving.rollout import Rollout
from tests.serving_fixtures import ServingEnv
from tests.test_ab_promotion import checked, point_settings_at, register_versions, rollout_for_test

MODEL = "cifar10-resnet18"
# Only the check, in a job of its own, as Dagster runs it after triton_deployment.
check_job = dg.define_asset_job(
    "serving_check_job", selection=dg.AssetSelection.checks(serving_follows_registry)
)


@pytest.fixture(scope="module")
def served(
    triton_server: ServingEnv, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServingEnv, Rollout]]:
    """v1 champion with 90 % of the traffic, v2 challenger with 10 %, both live."""
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    register_versions(uri, folder)
    rollout = rollout_for_test(triton_server, uri)
    rollout.deploy(1, "champion", checked, reason="first model", actor="test")
    rollout.deploy(2, "challenger", checked, reason="retrained", actor="test", challenger_share=0.1)
    yield triton_server, rollout


def evaluate(env: ServingEnv, uri: str, monkeypatch: pytest.MonkeyPatch) -> dg.AssetCheckEvaluation:
    """The check's evaluation in a Dagster run on a real instance, with the code location's
    resources (pointed at the test server and store)."""
    point_settings_at(env, uri, monkeypatch)
    with_job = dg.Definitions.merge(defs, dg.Definitions(jobs=[check_job]))
    with dg.instance_for_test() as instance:
        result = with_job.resolve_job_def(check_job.name).execute_in_process(
            instance=instance, raise_on_error=False
        )
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def problems(evaluation: dg.AssetCheckEvaluation) -> list[str]:
    return list(evaluation.metadata["problems"].value)  # type: ignore[arg-type]


def test_the_check_passes_when_registry_and_serving_agree(
    served: tuple[ServingEnv, Rollout], monkeypatch: pytest.MonkeyPatch
) -> None:
    env, rollout = served
    evaluation = evaluate(env, rollout.models.uri, monkeypatch)
    assert evaluation.passed, evaluation.description
    assert evaluation.blocking
    assert evaluation.description == "MLflow, the router and Triton agree."
    assert problems(evaluation) == []
    assert evaluation.metadata["champion"].value == 1
    assert evaluation.metadata["challenger"].value == 2


def remove_challenger_alias(env: ServingEnv, rollout: Rollout) -> Callable[[], None]:
    """The challenger alias deleted by hand (the MLflow UI); v2 keeps its 10 %."""
    client_for(rollout.models.uri).delete_registered_model_alias(MODEL, "challenger")
    return lambda: client_for(rollout.models.uri).set_registered_model_alias(
        MODEL, "challenger", "2"
    )


def most_traffic_to_the_challenger(env: ServingEnv, rollout: Rollout) -> Callable[[], None]:
    """The router's weights edited by hand: 90 % to the challenger."""
    repository.set_ab_weights({1: 0.1, 2: 0.9}, state_dir=env.state_dir)
    return lambda: repository.set_ab_weights({1: 0.9, 2: 0.1}, state_dir=env.state_dir)


def weighted_version_unloaded(env: ServingEnv, rollout: Rollout) -> Callable[[], None]:
    """v2 unloaded from Triton (weights moved away first, as set_live_versions insists), then
    the router's weights file put back as it was: v2 gets traffic it cannot serve."""
    weights_file = env.state_dir / repository.AB_WEIGHTS_FILE
    saved = weights_file.read_bytes()
    repository.set_ab_weights({1: 1.0}, state_dir=env.state_dir)
    repository.set_live_versions(env.http_url, [1], repo=env.repo, state_dir=env.state_dir)
    weights_file.write_bytes(saved)
    return lambda: repository.set_live_versions(
        env.http_url, [1, 2], repo=env.repo, state_dir=env.state_dir
    )


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (
            remove_challenger_alias,
            [
                "v2 gets router traffic but has no MLflow alias",
                "router weights {1: 0.9, 2: 0.1} (shadow None) differ from what the aliases and "
                "stage call for ({1: 1.0}, shadow None)",
            ],
        ),
        (
            most_traffic_to_the_challenger,
            [
                "v2 has the most router traffic (90%) but MLflow's champion is v1",
                "router weights {1: 0.1, 2: 0.9} (shadow None) differ from what the aliases and "
                "stage call for ({1: 0.9, 2: 0.1}, shadow None)",
            ],
        ),
        (
            weighted_version_unloaded,
            [
                "v2 gets router traffic but is not live in Triton",
                "v2 gets router traffic but Triton does not serve it",
            ],
        ),
    ],
    ids=["traffic-without-alias", "most-traffic-not-on-champion", "weighted-not-live"],
)
def test_the_check_fails_and_names_each_problem(
    served: tuple[ServingEnv, Rollout],
    monkeypatch: pytest.MonkeyPatch,
    breakage: Callable[[ServingEnv, Rollout], Callable[[], None]],
    expected: list[str],
) -> None:
    env, rollout = served
    restore = breakage(env, rollout)
    try:
        evaluation = evaluate(env, rollout.models.uri, monkeypatch)
    finally:
        restore()
    assert not evaluation.passed
    assert evaluation.blocking  # a failure stops what depends on triton_deployment
    # each problem named, in the metadata and in the description the UI shows (the rollout
    # may find more, e.g. a move the journal does not know)
    for problem in expected:
        assert problem in problems(evaluation), problems(evaluation)
        assert problem in str(evaluation.description)
    # Put back, the same check passes again: it judged the state, not the test's setup.
    assert evaluate(env, rollout.models.uri, monkeypatch).passed
