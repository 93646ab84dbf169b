"""``cifar-storage``: list, compare, read back and prune the versioned asset store.

    cifar-storage versions [ASSET] [--partition P]   every materialization, or a summary per asset
    cifar-storage diff ASSET A B [--partition P]     class counts and image ids added / removed
    cifar-storage training-data MODEL_VERSION        the splits a registered version trained on
    cifar-storage gc --keep-last N [--dry-run]       delete what nothing refers to

The store is ``CIFAR_ASSET_STORE`` (``--store`` overrides it); MLflow is ``MLFLOW_TRACKING_URI``.
``gc`` always keeps the last N materializations of every asset partition (so the live one), and
everything a registered model version refers to: the data versions its training run recorded
and every value the Dagster run that trained it stored. Exit status 1 with a message on errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cifar_assets.settings import get_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cifar-storage", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--store", default="", help="store root (folder or fsspec URL)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub = parser.add_subparsers(dest="command", required=True)
    versions = sub.add_parser("versions", help="stored materializations")
    versions.add_argument("asset", nargs="?", default=None)
    versions.add_argument("--partition", default=None)
    diff = sub.add_parser("diff", help="compare two versions of an image asset")
    diff.add_argument("asset")
    diff.add_argument("version_a")
    diff.add_argument("version_b")
    diff.add_argument("--partition", default=None)
    training = sub.add_parser("training-data", help="the splits a model version trained on")
    training.add_argument("model_version", type=int)
    training.add_argument("--model-name", default="")
    gc = sub.add_parser("gc", help="delete what nothing refers to")
    gc.add_argument("--keep-last", type=int, required=True, metavar="N")
    gc.add_argument("--dry-run", action="store_true", help="print the plan, delete nothing")
    gc.add_argument("--model-name", default="")
    return parser


def _print(value: Any, as_json: bool, text: str) -> None:
    print(json.dumps(value, indent=2) if as_json else text)


def _versions(store: Any, asset: str | None, partition: str | None, as_json: bool) -> None:
    if asset is None:
        rows = []
        for name in store.assets():
            records = [r for p in store.partitions(name) for r in store.history(name, p)]
            rows.append(
                {
                    "asset": name,
                    "materializations": len(records),
                    "versions": len({r.version for r in records}),
                    "bytes": sum({r.object: r.bytes for r in records}.values()),
                }
            )
        lines = [f"{'asset':24} {'materializations':>16} {'versions':>9} {'MB':>9}"]
        lines += [
            f"{r['asset']:24} {r['materializations']:>16} {r['versions']:>9} "
            f"{r['bytes'] / 1e6:>9.2f}"
            for r in rows
        ]
        _print(rows, as_json, "\n".join(lines) if rows else f"{store.root_url} is empty.")
        return
    partitions = [partition] if partition is not None else store.partitions(asset)
    records = [r for p in partitions for r in store.history(asset, p)]
    if not records:
        raise SystemExit(f"cifar-storage: no stored versions of {asset!r} under {store.root_url}.")
    lines = [
        f"{r.stored_at}  {r.version}  {r.partition or '-':20}  run {r.run_id[:8] or '-':8}  "
        f"code {r.code_version or '-':3}  {r.bytes / 1e6:8.2f} MB  {store.location(r.object)}"
        for r in records
    ]
    _print([r.to_dict() for r in records], as_json, "\n".join(lines))


def _diff(parts: list[Any], as_json: bool) -> None:
    lines = []
    for part in parts:
        lines.append(
            f"{part.name}: {part.images_before} -> {part.images_after} images, "
            f"+{len(part.added_ids)} added, -{len(part.removed_ids)} removed"
        )
        for cls, before in part.class_counts_before.items():
            after = part.class_counts_after[cls]
            if before != after:
                lines.append(f"  {cls:12} {before:>6} -> {after:>6} ({after - before:+d})")
    _print([p.to_dict() for p in parts], as_json, "\n".join(lines))


def _gc(store: Any, keep_last: int, dry_run: bool, model_name: str, as_json: bool) -> None:
    from cifar_assets.ml.lineage import all_lineages
    from cifar_assets.ml.registry import Registry

    lineages = all_lineages(Registry(get_settings().mlflow_tracking_uri, model_name))
    plan = store.plan_retention(
        keep_last,
        protected={v for lineage in lineages for v in lineage.inputs.values()},
        protected_runs={lineage.dagster_run_id for lineage in lineages if lineage.dagster_run_id},
    )
    if not dry_run:
        store.apply_retention(plan)
    verb = "would" if dry_run else "did"
    text = [f"{'dry run: ' if dry_run else ''}{plan.summary()}"]
    text += [
        f"  {verb} drop {r.asset}{'/' + r.partition if r.partition else ''} {r.version} "
        f"({r.stored_at})"
        for r in plan.dropped
    ]
    text.append(
        f"  protected by {len(lineages)} registered versions of {model_name}: "
        f"{len(plan.protected)} data versions, {len(plan.protected_runs)} Dagster runs"
    )
    _print(
        {
            "dry_run": dry_run,
            "kept": len(plan.kept),
            "dropped": [r.to_dict() for r in plan.dropped],
            "deleted_objects": plan.delete_objects,
            "freed_bytes": plan.freed_bytes,
            "kept_bytes": plan.kept_bytes,
            "protected": plan.protected,
            "protected_runs": plan.protected_runs,
        },
        as_json,
        "\n".join(text),
    )


def main(argv: list[str] | None = None) -> None:
    from cifar_assets.ml.lineage import LineageError
    from cifar_assets.ml.registry import RegistryLookupError
    from cifar_assets.storage import AssetStore, StorageError, diff

    args = _parser().parse_args(argv)
    settings = get_settings()
    store = AssetStore(args.store or settings.asset_store)
    model_name = getattr(args, "model_name", "") or settings.registered_model_name
    try:
        if args.command == "versions":
            _versions(store, args.asset, args.partition, args.json)
        elif args.command == "diff":
            before = store.load(args.asset, args.version_a, args.partition)
            after = store.load(args.asset, args.version_b, args.partition)
            _diff(diff(before, after), args.json)
        elif args.command == "training-data":
            from cifar_assets.ml.lineage import SPLITS_ASSET, training_splits_version
            from cifar_assets.ml.registry import Registry

            models = Registry(settings.mlflow_tracking_uri, model_name)
            version = training_splits_version(models, args.model_version)
            record = store.find(SPLITS_ASSET, version)
            splits = store.read(record)
            counts = {name: len(part) for name, part in splits.items()}
            _print(
                record.to_dict() | {"images": counts, "location": store.location(record.object)},
                args.json,
                f"{model_name} version {args.model_version} trained on {SPLITS_ASSET} "
                f"{record.version} ({store.location(record.object)}): "
                + ", ".join(f"{k} {v}" for k, v in counts.items()),
            )
        else:
            _gc(store, args.keep_last, args.dry_run, model_name, args.json)
    except (StorageError, LineageError, RegistryLookupError) as error:
        sys.exit(f"cifar-storage: {error}")


if __name__ == "__main__":
    main()
