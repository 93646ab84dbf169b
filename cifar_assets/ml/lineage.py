"""What each registered model version was made from: the data versions its MLflow run records.

The training run of a version tags the content hash of every input it consumed
(``cifar/data_version/<asset>``, see cifar_assets.storage) and the Dagster run that made it
(``dagster_run_id``). From those, a version's exact training data can be read back from the
asset store, and retention knows what it must never delete.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cifar_assets.ml import registry, tracking
from cifar_assets.storage import DATA_VERSION_TAG

SPLITS_ASSET = "cifar10_splits"


class LineageError(LookupError):
    """A model version's run does not say what data it was trained on."""


@dataclass(frozen=True)
class ModelLineage:
    version: int
    run_id: str
    dagster_run_id: str
    inputs: dict[str, str] = field(default_factory=dict)  # asset -> data version


def model_lineage(tracking_uri: str, version: int, name: str) -> ModelLineage:
    """The inputs (asset -> data version) and the Dagster run of one registered version."""
    info = registry.get_version(tracking_uri, version, name)
    if info.run_id is None:
        return ModelLineage(version, "", "", {})
    tags = tracking.client_for(tracking_uri).get_run(info.run_id).data.tags
    inputs = {
        key[len(DATA_VERSION_TAG) :]: value
        for key, value in tags.items()
        if key.startswith(DATA_VERSION_TAG)
    }
    # runs from before per-input tags name their splits in `data_version` alone
    if SPLITS_ASSET not in inputs and tags.get("data_version"):
        inputs[SPLITS_ASSET] = tags["data_version"]
    return ModelLineage(version, info.run_id, tags.get("dagster_run_id", ""), inputs)


def all_lineages(tracking_uri: str, name: str) -> list[ModelLineage]:
    """The lineage of every registered version of ``name``: none while the registry holds no
    model at all; a RegistryLookupError when it holds others but not ``name`` (a wrong name must
    not leave retention believing nothing is referred to)."""
    try:
        frame = registry.list_versions(tracking_uri, name)
    except registry.RegistryLookupError:
        if registry.list_models(tracking_uri).empty:
            return []
        raise
    return [model_lineage(tracking_uri, int(v), name) for v in frame["version"]]


def training_splits_version(tracking_uri: str, version: int, name: str) -> str:
    lineage = model_lineage(tracking_uri, version, name)
    if SPLITS_ASSET not in lineage.inputs:
        raise LineageError(
            f"Model {name} version {version} (MLflow run {lineage.run_id}) records no data "
            f"version of {SPLITS_ASSET}: it was not trained by the trained_model asset, so its "
            "training data is unknown."
        )
    return lineage.inputs[SPLITS_ASSET]
