"""Feature stage: ``image_features``, the feature store table keyed by image id."""

import dagster as dg
import pandas as pd

from cifar_assets.artifacts import FeatureTable
from cifar_assets.assets.data_assets import DATA_GROUP
from cifar_assets.assets.validation_assets import validation_report
from cifar_assets.data.imageset import Splits
from cifar_assets.settings import get_settings


@dg.asset(
    group_name=DATA_GROUP,
    kinds={"parquet"},
    owners=["team:ml-platform"],
    code_version="1",
    deps=[validation_report],
    description="Declared image features (colour, intensity, texture, noise) for every image, "
    "stored as Parquet with a schema version; read back with cifar_assets.data.features.",
)
def image_features(
    context: dg.AssetExecutionContext, cifar10_splits: Splits
) -> dg.Output[FeatureTable]:

    from cifar_assets.data.features import (
        FEATURE_GROUPS,
        SCHEMA_VERSION,
        FeatureStore,
        compute_features,
    )

    parts = []
    for name, part in cifar10_splits.items():
        context.log.info(f"Computing features for {len(part)} {name} images")
        parts.append(compute_features(part, log=context.log.info))
    features = pd.concat(parts, ignore_index=True).drop_duplicates("id")
    path = FeatureStore(get_settings().asset_files("feature_store")).write(features)
    groups = pd.DataFrame(
        [
            {
                "group": group.name,
                "feature": feature.name,
                "dtype": feature.dtype,
                "description": feature.description,
            }
            for group in FEATURE_GROUPS
            for feature in group.features
        ]
    )
    from cifar_assets.assets.metadata import table, versioned_output

    return versioned_output(
        FeatureTable(str(path), SCHEMA_VERSION, len(features), list(features.columns)),
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "rows": len(features),
            "schema_version": SCHEMA_VERSION,
            "features": table(groups, max_rows=100),
        },
    )
