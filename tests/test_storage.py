"""The versioned asset store: content addressing, reading any version back, diffs, retention,
the IO manager in a real Dagster instance, and the `cifar-storage` command.

The whole path (two data versions, two trained and registered models, v1's training data read
back byte for byte after v2, `cifar-storage gc`) runs in tests/test_every_job.py, where the jobs
already run through `dagster job execute`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from cifar_assets.artifacts import TrainedModel
from cifar_assets.data.imageset import CLASSES, ImageSet, RawData, Splits
from cifar_assets.data.splits import stratified_split
from cifar_assets.data.synthetic import generate_synthetic
from cifar_assets.storage import AssetStore, StorageError, content_version, diff, load_location
from tests.conftest import PROJECT_ROOT, subprocess_env


def unequal_set(seed: int, drop_class: int = 3) -> ImageSet:
    """Real-shaped: unequal classes (one class mostly missing), as an image folder gives."""
    images = generate_synthetic(400, seed=seed)
    keep = np.flatnonzero((images.labels != drop_class) | (np.arange(len(images)) % 10 == 0))
    return images.subset(keep)


def same_arrays(a: ImageSet, b: ImageSet) -> bool:
    return (
        all(
            np.array_equal(x, y)
            for x, y in (
                (a.images, b.images),
                (a.labels, b.labels),
                (a.ids, b.ids),
                (a.origins, b.origins),
            )
        )
        and a.source == b.source
    )


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> AssetStore:
    """The same store on a local folder and on an fsspec URL (object storage stands in)."""
    if request.param == "local":
        return AssetStore(tmp_path / "assets")
    return AssetStore(f"memory://store-{tmp_path.name}")


def test_every_materialization_is_kept_under_its_content_hash(store: AssetStore) -> None:
    first = stratified_split(unequal_set(0), 0.1, 0.1, seed=0)
    second = stratified_split(unequal_set(1), 0.1, 0.1, seed=0)
    r1, new1 = store.put("cifar10_splits", first, run_id="run-1", code_version="1")
    r2, new2 = store.put("cifar10_splits", second, run_id="run-2", code_version="1")
    r3, new3 = store.put("cifar10_splits", first, run_id="run-3", code_version="1")

    assert (new1, new2, new3) == (True, True, False), "equal content is stored once"
    assert r1.version == first.fingerprint() == content_version(first)
    assert r1.version != r2.version and r3.version == r1.version and r3.object == r1.object
    assert [r.run_id for r in store.history("cifar10_splits")] == ["run-1", "run-2", "run-3"]
    assert store.latest("cifar10_splits") == r3

    for record, expected in ((r1, first), (r2, second)):
        loaded = store.load("cifar10_splits", record.version)
        assert isinstance(loaded, Splits)
        for (name, part), (_, want) in zip(loaded.items(), expected.items(), strict=True):
            assert same_arrays(part, want), name
    # a unique prefix, as the UI shows versions, is enough
    assert store.load("cifar10_splits", r2.version[:10]).fingerprint() == r2.version


def test_tables_records_and_partitions_round_trip(store: AssetStore) -> None:
    frame = pd.DataFrame({"split": ["train", "test"], "images": [320, 41], "ok": [True, False]})
    record = TrainedModel("/m", "imagenet", "abc", "v", 1, None, 12.5, "cpu")
    batch = unequal_set(2)
    r_frame, _ = store.put("validation_report", frame)
    r_record, _ = store.put("trained_model", record)
    store.put("incoming_batch", batch, "noisy.batch-1")
    store.put("incoming_batch", unequal_set(3), "clean")

    pd.testing.assert_frame_equal(store.load("validation_report", r_frame.version), frame)
    assert store.load("trained_model", r_record.version) == record
    assert same_arrays(store.load("incoming_batch", partition="noisy.batch-1"), batch)
    assert store.partitions("incoming_batch") == ["clean", "noisy.batch-1"]
    assert store.assets() == ["incoming_batch", "trained_model", "validation_report"]
    # equal frames give equal versions: the version is a property of the content
    assert content_version(frame.copy()) == r_frame.version


def test_bad_requests_name_the_problem(store: AssetStore, tmp_path: Path) -> None:
    store.put("cifar10_raw", RawData(unequal_set(0)))
    with pytest.raises(StorageError, match="No stored version 0123abcd of asset 'cifar10_raw'"):
        store.load("cifar10_raw", "0123abcd")
    with pytest.raises(StorageError, match="is not a data version"):
        store.load("cifar10_raw", "../../etc/passwd")
    with pytest.raises(StorageError, match="cannot name a stored value"):
        store.load("../cifar10_raw")
    with pytest.raises(StorageError, match="No stored value for asset 'cifar10_splits'"):
        store.load("cifar10_splits")
    with pytest.raises(TypeError, match="A dict cannot be stored"):
        store.put("cifar10_raw", {"a": 1})
    garbage = tmp_path / "garbage.imageset.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(StorageError, match=r"garbage.imageset.npz cannot be read"):
        load_location(str(garbage))
    with pytest.raises(StorageError, match="does not exist"):
        load_location(str(tmp_path / "missing.imageset.npz"))


def test_an_object_deleted_behind_the_store_s_back_is_reported_with_its_path(
    tmp_path: Path,
) -> None:
    store = AssetStore(tmp_path / "assets")
    record, _ = store.put("cifar10_raw", RawData(unequal_set(0)))
    (tmp_path / "assets" / record.object).unlink()
    with pytest.raises(StorageError, match=str(tmp_path / "assets" / record.object)):
        store.load("cifar10_raw")


def test_diff_counts_classes_and_ids_added_and_removed() -> None:
    before = unequal_set(0)
    extra = generate_synthetic(30, seed=9)
    keep = np.arange(len(before)) >= 5  # the first five images leave
    after = ImageSet.from_arrays(
        np.concatenate([before.images[keep], extra.images]),
        np.concatenate([before.labels[keep], extra.labels]),
        "synthetic",
    )
    (part,) = diff(before, after)
    assert (part.images_before, part.images_after) == (len(before), len(before) - 5 + 30)
    assert part.removed_ids == sorted(before.ids[:5].tolist())
    assert part.added_ids == sorted(extra.ids.tolist())
    for name, count in before.class_counts().items():
        removed = int((before.labels[:5] == CLASSES.index(name)).sum())
        added = int((extra.labels == CLASSES.index(name)).sum())
        assert part.class_counts_after[name] == count - removed + added
    with pytest.raises(StorageError, match="Only image data"):
        diff(pd.DataFrame(), pd.DataFrame())


def test_retention_keeps_the_live_the_last_n_and_what_models_refer_to(
    store: AssetStore,
) -> None:
    sets = [RawData(unequal_set(seed)) for seed in range(5)]
    records = [store.put("cifar10_raw", raw, run_id=f"run-{i}")[0] for i, raw in enumerate(sets)]
    store.put("incoming_batch", unequal_set(7), "only-one")

    plan = store.plan_retention(2, protected={records[0].version}, protected_runs={"run-1"})
    kept = {r.version for r in plan.kept}
    assert kept == {records[i].version for i in (0, 1, 3, 4)} | {
        store.latest("incoming_batch", "only-one").version  # type: ignore[union-attr]
    }
    assert [r.version for r in plan.dropped] == [records[2].version]
    assert plan.delete_objects == [records[2].object] and plan.freed_bytes == records[2].bytes

    store.apply_retention(plan)
    with pytest.raises(StorageError, match="No stored version"):
        store.load("cifar10_raw", records[2].version)
    for i in (0, 1, 3, 4):
        assert store.load("cifar10_raw", records[i].version).fingerprint() == records[i].version
    with pytest.raises(StorageError, match="keep_last must be at least 1"):
        store.plan_retention(0)


def test_the_io_manager_versions_every_materialization_in_dagster(tmp_path: Path) -> None:
    """Two data_job materializations with different seeds: both stored, the Dagster data version
    of each is the stored content hash, and the run and code version are on the record."""
    from cifar_assets.assets.data_assets import cifar10_raw, cifar10_splits
    from cifar_assets.resources import LocalStorageIOManager

    root = tmp_path / "assets"
    io_manager = LocalStorageIOManager(base_dir=str(root))
    seen = []
    with dg.instance_for_test() as instance:
        for seed in (0, 1):
            result = dg.materialize(
                [cifar10_raw, cifar10_splits],
                resources={"io_manager": io_manager},
                run_config={"ops": {"cifar10_raw": {"config": {"num_images": 300, "seed": seed}}}},
                instance=instance,
            )
            event = instance.get_latest_materialization_event(dg.AssetKey("cifar10_splits"))
            assert event is not None and event.asset_materialization is not None
            materialization = event.asset_materialization
            seen.append((result.run_id, materialization.tags["dagster/data_version"]))
            assert materialization.metadata["data_version"].value == seen[-1][1]
            assert str(materialization.metadata["stored_at"].value).startswith(str(root))
    store = AssetStore(root)
    history = store.history("cifar10_splits")
    assert [(r.run_id, r.version) for r in history] == seen
    assert all(r.code_version == "1" for r in history)
    assert len({version for _, version in seen}) == 2
    first = store.load("cifar10_splits", seen[0][1])
    assert first.fingerprint() == seen[0][1]


def test_cifar_storage_command(tmp_path: Path, project_env: dict[str, str]) -> None:
    """The entry point as a user runs it: versions, diff, gc (dry run, then for real) and its
    errors. training-data against a real registry runs in tests/test_every_job.py."""
    root = tmp_path / "assets"
    store = AssetStore(root)
    old, _ = store.put("cifar10_splits", stratified_split(unequal_set(0), 0.1, 0.1, seed=0))
    new, _ = store.put("cifar10_splits", stratified_split(unequal_set(1), 0.1, 0.1, seed=0))
    env = subprocess_env(project_env | {"CIFAR_ASSET_STORE": str(root)})
    command = str(PROJECT_ROOT / ".venv" / "bin" / "cifar-storage")

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [command, *args], env=env, capture_output=True, text=True, timeout=120
        )
        assert (done.returncode == 0) == ok, done.stdout + done.stderr
        return done

    listing = run("versions", "cifar10_splits").stdout
    assert old.version in listing and new.version in listing
    parts = json.loads(run("--json", "diff", "cifar10_splits", old.version, new.version).stdout)
    assert [p["name"] for p in parts] == ["train", "validation", "test"]
    assert parts[0]["images_before"] == len(store.load("cifar10_splits", old.version).train)
    dry = json.loads(run("--json", "gc", "--keep-last", "1", "--dry-run").stdout)
    assert [d["version"] for d in dry["dropped"]] == [old.version] and dry["dry_run"]
    assert store.load("cifar10_splits", old.version).fingerprint() == old.version
    run("gc", "--keep-last", "1")
    assert [r.version for r in store.history("cifar10_splits")] == [new.version]
    missing = run("diff", "cifar10_splits", old.version, new.version, ok=False).stderr
    assert f"No stored version {old.version}" in missing
    assert "cifar-storage versions cifar10_splits" in missing
    assert "is not a data version" in run("diff", "cifar10_splits", "xyz", "abc", ok=False).stderr
