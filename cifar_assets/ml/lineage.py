"""What each registered model version was made from: the data versions its MLflow run records.

The training run of a version tags the content hash of every input it consumed
(``cifar/data_version/<asset>``, see cifar_assets.storage) and the Dagster run that made it
(``dagster_run_id``). From those, a version's exact training data can be read back from the
asset store, and retention knows what it must never delete.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cifar_assets.ml import tracking
from cifar_assets.ml.registry import Registry, RegistryLookupError, list_models
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


def model_lineage(models: Registry, version: int) -> ModelLineage:
    """The inputs (asset -> data version) and the Dagster run of one registered version."""
    info = models.version(version)
    if info.run_id is None:
        return ModelLineage(version, "", "", {})
    tags = tracking.client_for(models.uri).get_run(info.run_id).data.tags
    inputs = {
        key[len(DATA_VERSION_TAG) :]: value
        for key, value in tags.items()
        if key.startswith(DATA_VERSION_TAG)
    }
    # runs from before per-input tags name their splits in `data_version` alone
    if SPLITS_ASSET not in inputs and tags.get("data_version"):
        inputs[SPLITS_ASSET] = tags["data_version"]
    return ModelLineage(version, info.run_id, tags.get("dagster_run_id", ""), inputs)


def all_lineages(models: Registry) -> list[ModelLineage]:
    """The lineage of every registered version of the model: none while the registry holds no
    model at all; a RegistryLookupError when it holds others but not this one (a wrong name must
    not leave retention believing nothing is referred to)."""
    try:
        frame = models.versions()
    except RegistryLookupError:
        if list_models(models.uri).empty:
            return []
        raise
    return [model_lineage(models, int(v)) for v in frame["version"]]


def training_splits_version(models: Registry, version: int) -> str:
    lineage = model_lineage(models, version)
    if SPLITS_ASSET not in lineage.inputs:
        raise LineageError(
            f"Model {models.name} version {version} (MLflow run {lineage.run_id}) records no data "
            f"version of {SPLITS_ASSET}: it was not trained by the trained_model asset, so its "
            "training data is unknown."
        )
    return lineage.inputs[SPLITS_ASSET]
