"""Data stage: ``cifar10_raw`` (from a chosen source) and ``cifar10_splits`` (stratified)."""

from pathlib import Path
from typing import Any, Literal

import dagster as dg
import pandas as pd
from pydantic import Field

from cifar_assets.assets.metadata import table, versioned_output
from cifar_assets.data.imageset import CLASSES, RawData, Splits
from cifar_assets.settings import get_settings

DATA_GROUP = "data"


class RawDataConfig(dg.Config):
    source: Literal["synthetic", "cifar10", "image_folder"] = Field(
        default="synthetic",
        description="synthetic: generated CIFAR-like images; cifar10: the real data set "
        "(downloaded into CIFAR_DATA_DIR); image_folder: one subfolder per class.",
    )
    num_images: int = Field(default=3000, description="synthetic only: how many images.")
    seed: int = Field(default=0, description="synthetic only: generator seed.")
    image_folder: str = Field(default="", description="image_folder only: the root folder.")
    extra_batches: list[str] = Field(
        default=[],
        description="Stored labelled ImageSet files (.imageset.npz, e.g. incoming_batch "
        "partitions) added to the pool; set by the retraining sensor.",
    )
    on_error: Literal["fail", "skip"] = Field(
        default="fail",
        description="image_folder only: fail on unreadable files and unknown class folders, "
        "or skip them and report them in the metadata.",
    )


class SplitsConfig(dg.Config):
    validation_fraction: float = Field(default=0.1, description="Share of images for validation.")
    test_fraction: float = Field(
        default=0.1, description="Share for test; ignored when the source has an official test set."
    )
    seed: int = Field(default=0, description="Seed of the stratified shuffle.")


@dg.asset(
    group_name=DATA_GROUP,
    kinds={"numpy"},
    owners=["team:ml-platform"],
    code_version="1",
    description="Images and labels from the configured source, in the canonical uint8 form.",
)
def cifar10_raw(context: dg.AssetExecutionContext, config: RawDataConfig) -> dg.Output[RawData]:
    metadata: dict[str, Any] = {"source": config.source}
    if config.source == "synthetic":
        from cifar_assets.data.synthetic import generate_synthetic

        raw = RawData(generate_synthetic(config.num_images, seed=config.seed))
    elif config.source == "cifar10":
        from dataclasses import replace

        from cifar_assets.data.cifar10 import load_cifar10
        from cifar_assets.data.imageset import default_origins

        train, test = load_cifar10(get_settings().data_dir)
        # both parts come as source "cifar10": name which one an image is from in messages
        raw = RawData(
            replace(train, origins=default_origins("cifar10 train", len(train))),
            official_test=replace(test, origins=default_origins("cifar10 test", len(test))),
        )
    else:
        from cifar_assets.data.image_folder import load_image_folder

        if not config.image_folder:
            raise dg.Failure(
                "source='image_folder' needs the image_folder config field: the folder that "
                "holds one subfolder per CIFAR-10 class."
            )
        pool, report = load_image_folder(Path(config.image_folder), on_error=config.on_error)
        raw = RawData(pool)
        metadata["folder_report"] = dg.MetadataValue.json(report.to_dict())
    if config.extra_batches:
        raw = _with_extra_batches(context, raw, config.extra_batches)
    counts = raw.pool.class_counts()
    context.log.info(f"Loaded {len(raw.pool)} images from {config.source}")
    metadata |= {
        "num_images": len(raw.pool),
        "official_test_images": len(raw.official_test) if raw.official_test is not None else 0,
        "class_counts": dg.MetadataValue.json(counts),
        "content_hash": raw.fingerprint(),
    }
    return versioned_output(raw, metadata=metadata)


def _with_extra_batches(
    context: dg.AssetExecutionContext, raw: RawData, paths: list[str]
) -> RawData:
    import numpy as np

    from cifar_assets.data.imageset import ImageSet
    from cifar_assets.storage import StorageError, load_location

    images, labels, origins = [raw.pool.images], [raw.pool.labels], [raw.pool.origins]
    for path in paths:
        try:
            batch = load_location(path)
        except StorageError as error:
            raise dg.Failure(
                f"extra_batches: {error} Materialize that incoming_batch partition first, or "
                "remove it from the run config."
            ) from error
        if not isinstance(batch, ImageSet):
            raise dg.Failure(
                f"extra_batches: {path} holds a {type(batch).__name__}, not an image batch; "
                "list .imageset.npz files (incoming_batch partitions) only."
            )
        if not batch.is_labelled:
            raise dg.Failure(
                f"extra_batches: {path} has unlabelled images; only labelled batches can join "
                "the training data. Attach labels (feedback) or drop it from the run config."
            )
        context.log.info(f"Adding {len(batch)} labelled images from {path}")
        images.append(batch.images)
        labels.append(batch.labels)
        origins.append(batch.origins)
    pool = ImageSet.from_arrays(
        np.concatenate(images),
        np.concatenate(labels),
        f"{raw.pool.source}+{len(paths)} batches",
        origins=np.concatenate(origins),
    )
    return RawData(pool, raw.official_test)


@dg.asset(
    group_name=DATA_GROUP,
    kinds={"numpy"},
    owners=["team:ml-platform"],
    code_version="1",
    description="Stratified train / validation / test splits (CIFAR-10's official test set "
    "stays the test split).",
)
def cifar10_splits(
    context: dg.AssetExecutionContext, config: SplitsConfig, cifar10_raw: RawData
) -> dg.Output[Splits]:
    from cifar_assets.data.splits import (
        split_with_official_test,
        stratified_split,
        too_small_message,
    )

    if cifar10_raw.official_test is not None:
        splits = split_with_official_test(
            cifar10_raw.pool, cifar10_raw.official_test, config.validation_fraction, config.seed
        )
    else:
        splits = stratified_split(
            cifar10_raw.pool, config.validation_fraction, config.test_fraction, config.seed
        )

    counts = pd.DataFrame(
        [
            {"split": name, **part.class_counts(), "total": len(part)}
            for name, part in splits.items()
        ],
        columns=["split", *CLASSES, "total"],
    )
    context.log.info("Split sizes: " + ", ".join(f"{n}={len(p)}" for n, p in splits.items()))
    too_small = too_small_message(splits)
    if too_small:
        context.log.warning(f"{cifar10_raw.pool.source}: {too_small}")
    return versioned_output(
        splits,
        metadata={
            "counts_per_class_and_split": table(counts),
            "source": cifar10_raw.pool.source,
            "content_hash": splits.fingerprint(),
            "classes_too_small": too_small or "none",
            **{f"{name}_images": len(part) for name, part in splits.items()},
        },
    )
