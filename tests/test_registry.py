"""cifar_assets.ml.registry against a real sqlite MLflow store and real (untrained) ResNet18s:
registration, the promotion gate, alias history, rollback, loading (torch and pyfunc)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException

from cifar_assets import api
from cifar_assets.ml import registry
from cifar_assets.ml.model import Architecture, build_resnet18, normalise_uint8, save_model
from cifar_assets.ml.registry import (
    AliasMove,
    PromotionDecision,
    Registry,
    RegistryLookupError,
    RollbackError,
    decide_promotion,
)
from cifar_assets.ml.tracking import client_for, scoped_tracking_uri, tracking_run

EXPERIMENT = "registry-tests"
ARCH = Architecture(stem="imagenet")  # 5x faster than the CIFAR stem; the registry is the same


@dataclass(frozen=True)
class Store:
    uri: str
    model_dirs: dict[int, Path]  # seed -> saved model directory
    networks: dict[int, torch.nn.Module]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One sqlite store and two differently seeded networks for the module; tests use their
    own model names so that they do not see each other's aliases."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("registry")
    model_dirs, networks = {}, {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        networks[seed] = build_resnet18(ARCH).eval()
        model_dirs[seed] = root / f"model-{seed}"
        save_model(networks[seed], ARCH, model_dirs[seed])
    yield Store(f"sqlite:///{root}/mlflow.db", model_dirs, networks)


def _train_and_register(
    store: Store, name: str, seed: int, accuracy: float, data_version: str = "data-v1"
) -> registry.ModelVersionInfo:
    with tracking_run(store.uri, EXPERIMENT, f"train-{name}", {"dagster_run_id": name}) as run:
        return Registry(store.uri, name).register(
            run,
            store.model_dirs[seed],
            {"accuracy": accuracy, "loss": 1.0 - accuracy},
            data_version,
            description=f"seed {seed}",
            tags={"seed": str(seed)},
            actor="test",
        )


def _images(count: int = 4) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def _logits(network: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return network(torch.from_numpy(normalise_uint8(images)))


@pytest.fixture(scope="module")
def two_versions(store: Store) -> str:
    """Model 'loading': v1 (seed 0) champion, v2 (seed 1) challenger."""
    name = "loading"
    _train_and_register(store, name, seed=0, accuracy=0.60)
    _train_and_register(store, name, seed=1, accuracy=0.55)
    Registry(store.uri, name).promote(1, "first model", actor="test")
    return name


def _moves(store: Store, name: str) -> list[tuple[str, str, int | None, int | None]]:
    return [
        (move.alias, move.action, move.from_version, move.to_version)
        for move in Registry(store.uri, name).history()
    ]


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "promote"),
    [
        (0.90, None, 0.0, True),  # no champion yet
        (0.90, 0.80, 0.05, True),  # better by more than the margin
        (0.82, 0.80, 0.05, False),  # better, but within the margin
        (0.80, 0.80, 0.0, False),  # a tie keeps the champion
        (0.70, 0.80, 0.0, False),  # worse
    ],
)
def test_decide_promotion(
    candidate: float, champion: float | None, margin: float, promote: bool
) -> None:
    decision = decide_promotion(
        {"accuracy": candidate},
        None if champion is None else {"accuracy": champion},
        margin=margin,
    )
    assert decision.promote is promote
    assert f"{candidate:.4f}" in decision.reason
    if champion is not None:
        assert f"required > {margin:.4f}" in decision.reason


def test_decide_promotion_lower_is_better_and_bad_input() -> None:
    assert decide_promotion({"loss": 0.3}, {"loss": 0.5}, "loss", 0.1, higher_is_better=False) == (
        PromotionDecision(
            True,
            "promoted: candidate loss=0.3000, champion loss=0.5000, gain +0.2000, "
            "required > 0.1000",
        )
    )
    with pytest.raises(ValueError, match=r"candidate has no 'accuracy'.*it has: loss"):
        decide_promotion({"loss": 0.3}, None)
    with pytest.raises(ValueError, match=r"champion has no 'accuracy'.*promote manually"):
        decide_promotion({"accuracy": 0.9}, {"loss": 0.3})
    with pytest.raises(ValueError, match="negative"):
        decide_promotion({"accuracy": 0.9}, None, margin=-0.1)


def test_register_links_run_tags_metrics_and_sets_challenger(store: Store) -> None:
    first = _train_and_register(store, "register", seed=0, accuracy=0.5, data_version="d1")
    second = _train_and_register(store, "register", seed=1, accuracy=0.6, data_version="d2")

    assert (first.version, second.version) == (1, 2)
    assert second.metrics == {"accuracy": 0.6, "loss": pytest.approx(0.4)}
    assert second.data_version == "d2"
    assert second.tags["seed"] == "1"
    assert second.status == "READY"
    assert second.description.startswith("seed 1\n\n| metric | value |")
    run = client_for(store.uri).get_run(second.run_id or "")
    assert run.info.status == "FINISHED"
    assert run.data.tags["dagster_run_id"] == "register"
    # challenger moved from v1 to v2; read through get_registered_model, not the search API
    assert Registry(store.uri, "register").version(1).aliases == ()
    assert second.aliases == ("challenger",)
    versions = Registry(store.uri, "register").versions()
    assert versions["version"].tolist() == [1, 2]
    assert versions["aliases"].tolist() == [[], ["challenger"]]
    assert versions["run_id"].tolist() == [first.run_id, second.run_id]
    assert versions["data_version"].tolist() == ["d1", "d2"]
    assert _moves(store, "register") == [
        ("challenger", "set", None, 1),
        ("challenger", "moved", 1, 2),
    ]
    assert Registry(store.uri, "register").champion() is None
    assert Registry(store.uri, "register").url(2) == (
        "http://127.0.0.1:5000/#/models/register/versions/2"
    )
    models = registry.list_models(store.uri)
    row = models.set_index("name").loc["register"]
    assert (row["latest_version"], row["versions"], row["aliases"]) == (2, 2, {"challenger": 2})


def test_gate_promotion_history_champion_at_and_rollback(store: Store) -> None:
    name = "gate"
    before_anything = datetime.now(UTC)
    first = _train_and_register(store, name, seed=0, accuracy=0.80)
    decision = Registry(store.uri, name).gate(first.version, margin=0.01, actor="gate")
    assert decision.promote and decision.reason.startswith("no champion yet")
    assert Registry(store.uri, name).version(1).aliases == ("champion",)
    first_champion_time = datetime.now(UTC)

    # Better by less than the margin: stays challenger, and the reason is on the version.
    second = _train_and_register(store, name, seed=1, accuracy=0.805)
    decision = Registry(store.uri, name).gate(second.version, margin=0.01, actor="gate")
    assert not decision.promote
    second_info = Registry(store.uri, name).version(2)
    assert second_info.aliases == ("challenger",)
    assert second_info.tags["gate.decision"] == "not promoted"
    assert second_info.tags["gate.reason"] == decision.reason
    assert "gain +0.0050, required > 0.0100" in decision.reason
    champion = Registry(store.uri, name).champion()
    assert champion is not None and champion.version == 1

    # Better by more than the margin: promoted, and it stops being the challenger.
    decision = Registry(store.uri, name).gate(second.version, margin=0.001, actor="gate")
    assert decision.promote
    assert Registry(store.uri, name).version(2).aliases == ("champion",)
    assert Registry(store.uri, name).version(1).aliases == ()
    second_champion_time = datetime.now(UTC)

    comparison = Registry(store.uri, name).compare(1, 2).set_index("metric")
    assert comparison.loc["accuracy", "v1"] == 0.80
    assert comparison.loc["accuracy", "v2"] == 0.805
    assert comparison.loc["accuracy", "difference"] == pytest.approx(0.005)

    rolled_back = Registry(store.uri, name).rollback("v2 misbehaves", actor="oncall")
    assert rolled_back.version == 1
    assert rolled_back.aliases == ("champion",)

    history = Registry(store.uri, name).history()
    assert [(m.alias, m.action, m.from_version, m.to_version) for m in history] == [
        ("challenger", "set", None, 1),
        ("champion", "set", None, 1),
        ("challenger", "removed", 1, None),
        ("challenger", "set", None, 2),
        ("champion", "moved", 1, 2),
        ("challenger", "removed", 2, None),
        ("champion", "moved", 2, 1),
    ]
    assert history[-1].reason == "rollback: v2 misbehaves"
    assert history[-1].actor == "oncall"
    assert history[4].reason.startswith("gate: promoted: candidate accuracy=0.8050")
    assert all(earlier.when < later.when for earlier, later in pairwise(history))
    assert all(move.when.tzinfo is not None for move in history)

    assert Registry(store.uri, name).champion_at(before_anything) is None
    assert Registry(store.uri, name).champion_at(first_champion_time) == 1
    assert Registry(store.uri, name).champion_at(second_champion_time) == 2
    assert Registry(store.uri, name).champion_at(datetime.now(UTC) + timedelta(days=1)) == 1
    with pytest.raises(ValueError, match="naive datetime"):
        Registry(store.uri, name).champion_at(datetime.now())

    # v1 was the first champion: nothing earlier to roll back to.
    with pytest.raises(RollbackError, match=r"no earlier champion.*current champion: v1"):
        Registry(store.uri, name).rollback("again")
    frame = Registry(store.uri, name).history_frame()
    assert frame["to_version"].tolist()[-1] == 1


def test_gate_uses_champion_metrics_measured_on_the_same_split(store: Store) -> None:
    name = "same-split"
    _train_and_register(store, name, seed=0, accuracy=0.90)
    Registry(store.uri, name).promote(1, "first", actor="test")
    candidate = _train_and_register(store, name, seed=1, accuracy=0.85)
    # Against the stored 0.90 the candidate loses; re-measured on the candidate's split the
    # champion reaches only 0.80, so the candidate wins there.
    assert not registry.decide_promotion({"accuracy": 0.85}, {"accuracy": 0.90}).promote
    decision = Registry(store.uri, name).gate(
        candidate.version, champion_metrics={"accuracy": 0.80}
    )
    assert decision.promote
    assert Registry(store.uri, name).version(candidate.version).aliases == ("champion",)


def test_rolling_back_twice_goes_back_two_releases(store: Store) -> None:
    name = "rollback"
    for seed, accuracy in ((0, 0.5), (1, 0.6), (0, 0.7)):
        version = _train_and_register(store, name, seed=seed, accuracy=accuracy)
        Registry(store.uri, name).promote(version.version, f"release {accuracy}")
    # Promoting the current champion again moves nothing and records nothing.
    moves_before = len(Registry(store.uri, name).history())
    Registry(store.uri, name).promote(3, "same again")
    assert len(Registry(store.uri, name).history()) == moves_before

    assert Registry(store.uri, name).rollback("bad release").version == 2
    assert Registry(store.uri, name).rollback("also bad").version == 1
    with pytest.raises(RollbackError):
        Registry(store.uri, name).rollback("nothing left")
    champion_moves = Registry(store.uri, name).history(alias="champion")
    assert [(m.from_version, m.to_version) for m in champion_moves] == [
        (None, 1),
        (1, 2),
        (2, 3),
        (3, 2),
        (2, 1),
    ]
    assert isinstance(champion_moves[0], AliasMove)


def test_load_by_alias_and_version_predicts_like_the_saved_model(
    store: Store, two_versions: str
) -> None:
    images = _images()
    champion = Registry(store.uri, two_versions).load_alias("champion")
    challenger = Registry(store.uri, two_versions).load_alias("challenger")
    second = Registry(store.uri, two_versions).load(2)

    assert not champion.training
    assert torch.equal(_logits(champion, images), _logits(store.networks[0], images))
    assert torch.equal(_logits(challenger, images), _logits(store.networks[1], images))
    assert torch.equal(_logits(second, images), _logits(store.networks[1], images))
    assert not torch.equal(_logits(champion, images), _logits(challenger, images))


def test_pyfunc_loads_from_models_uri_with_uint8_input(store: Store, two_versions: str) -> None:
    images = _images()
    expected = _logits(store.networks[0], images).numpy()
    with scoped_tracking_uri(store.uri):
        model = mlflow.pyfunc.load_model(f"models:/{two_versions}@champion")
    logits = model.predict(images)
    assert logits.shape == (4, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-6)

    challenger = Registry(store.uri, two_versions).load_pyfunc("challenger")
    np.testing.assert_allclose(
        challenger.predict(images), _logits(store.networks[1], images).numpy(), atol=1e-6
    )
    # The signature logged with the model rejects normalised float input before it runs.
    with pytest.raises(MlflowException, match="float32 does not match expected dtype uint8"):
        model.predict(images.astype(np.float32))


def test_failed_training_run_leaves_registry_untouched(store: Store, two_versions: str) -> None:
    versions_before = Registry(store.uri, two_versions).versions()
    history_before = Registry(store.uri, two_versions).history()

    with (
        pytest.raises(RuntimeError, match="out of memory"),
        tracking_run(store.uri, EXPERIMENT, "fails", {"dagster_run_id": "failing"}) as run_id,
    ):
        raise RuntimeError("out of memory")  # training dies before register() is reached

    assert client_for(store.uri).get_run(run_id).info.status == "FAILED"
    with pytest.raises(ValueError, match=rf"run {run_id} ended FAILED"):
        Registry(store.uri, two_versions).register(
            run_id, store.model_dirs[0], {"accuracy": 0.99}, "d"
        )
    after = Registry(store.uri, two_versions).versions()
    assert after[["version", "aliases", "run_id"]].equals(
        versions_before[["version", "aliases", "run_id"]]
    )
    assert Registry(store.uri, two_versions).history() == history_before
    champion = Registry(store.uri, two_versions).champion()
    assert champion is not None and champion.version == 1


def test_errors_name_what_exists(store: Store, two_versions: str, tmp_path: Path) -> None:
    with pytest.raises(RegistryLookupError, match=r"No registered model 'nope'.*loading"):
        Registry(store.uri, "nope").champion()
    with pytest.raises(RegistryLookupError, match=r"no version 9 \(versions: 1, 2\)"):
        Registry(store.uri, two_versions).load(9)
    with pytest.raises(
        RegistryLookupError,
        match=r"no alias 'staging' \(aliases: challenger -> v2, champion -> v1\)",
    ):
        Registry(store.uri, two_versions).load_alias("staging")
    with tracking_run(store.uri, EXPERIMENT, "bad-register", {}) as run_id:
        with pytest.raises(FileNotFoundError, match=r"empty/model\.safetensors is missing"):
            Registry(store.uri, two_versions).register(run_id, tmp_path / "empty", {}, "d")
        with pytest.raises(ValueError, match=r"'accuracy'=nan is not finite"):
            Registry(store.uri, two_versions).register(
                run_id, store.model_dirs[0], {"accuracy": float("nan")}, "d"
            )
    with pytest.raises(RegistryLookupError, match="does not exist"):
        Registry(store.uri, two_versions).register("0" * 32, store.model_dirs[0], {}, "d")
    with pytest.raises(ValueError, match="needs a reason"):
        Registry(store.uri, two_versions).promote(2, " ")


def test_notebook_api_uses_settings(
    store: Store, two_versions: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.setenv("CIFAR_MODEL_NAME", two_versions)
    monkeypatch.setenv("CIFAR_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "notebook")

    champion = api.champion()
    assert champion is not None and champion.version == 1
    images = _images()
    assert torch.equal(_logits(api.load(version=2), images), _logits(store.networks[1], images))
    assert api.compare(1, 2).set_index("metric").loc["accuracy", "difference"] == pytest.approx(
        -0.05
    )
    assert api.list_versions()["aliases"].tolist() == [["champion"], ["challenger"]]
    assert [move.to_version for move in api.history()][-1] == 1
    with api.start_run("notebook-run", tags={"author": "test"}) as run_id:
        pass
    run = client_for(store.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((tmp_path / "var" / "mlflow" / "artifacts").as_uri())


def test_no_run_left_running(store: Store) -> None:
    """Runs last in the module: nothing above left a run (or an alias-history record) open."""
    client = client_for(store.uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    assert len(experiments) > 2  # the training experiment and the alias histories
    assert client.search_runs(experiments, "attributes.status = 'RUNNING'") == []
    finished = client.search_runs(experiments, "attributes.status = 'FINISHED'")
    assert len(finished) > 10
