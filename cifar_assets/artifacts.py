"""Small records that assets hand to each other when the value itself lives in a file.

A model, an ONNX file or a feature table is written once by its asset to a versioned path; what
flows along the lineage is one of these records (stored as JSON by the IO manager), so downstream
assets read exactly the file their upstream produced, never "the latest" one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FeatureTable:
    path: str
    schema_version: str
    rows: int
    columns: list[str]


@dataclass(frozen=True)
class TrainedModel:
    model_dir: str
    stem: str
    mlflow_run_id: str
    data_version: str
    epochs: int
    final_val_accuracy: float | None
    images_per_s: float
    device: str


@dataclass(frozen=True)
class ModelEvaluation:
    mlflow_run_id: str
    metrics: dict[str, float]
    champion_version: int | None = None
    champion_metrics: dict[str, float] | None = None


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: int
    mlflow_run_id: str
    is_champion: bool
    decision_reason: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class OnnxModel:
    fp32_path: str
    int8_path: str | None
    registered_version: int
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TritonDeployment:
    model_name: str
    version: int
    live_versions: list[int]
    http_url: str
    grpc_url: str


@dataclass(frozen=True)
class DriftBaselineRef:
    path: str
    model_version: int
    model_dir: str


@dataclass(frozen=True)
class DriftVerdict:
    batch: str
    drift: bool
    score: float
    labelled: bool
    model_version: int
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ABTestSummary:
    control: int
    treatment: int
    decision: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


ARTIFACT_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        FeatureTable,
        TrainedModel,
        ModelEvaluation,
        RegisteredModel,
        OnnxModel,
        TritonDeployment,
        DriftBaselineRef,
        DriftVerdict,
        ABTestSummary,
    )
}
