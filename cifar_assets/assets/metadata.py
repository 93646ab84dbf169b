"""Helpers that turn plain values (tables, figures) into Dagster metadata."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg

if TYPE_CHECKING:
    import pandas as pd


def table(frame: pd.DataFrame, max_rows: int = 50) -> dg.TableMetadataValue:
    """A DataFrame as a Dagster table (shown as a table in the UI), first ``max_rows`` rows."""
    kinds = {"i": "int", "u": "int", "f": "float", "b": "bool"}
    columns = [
        dg.TableColumn(str(name), kinds.get(frame[name].dtype.kind, "string"))
        for name in frame.columns
    ]
    records = [
        dg.TableRecord({str(k): _scalar(v) for k, v in row.items()})
        for row in frame.head(max_rows).to_dict(orient="records")
    ]
    return dg.MetadataValue.table(records=records, schema=dg.TableSchema(columns=columns))


def _scalar(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, (int, float, bool, str)) or value is None:
        return value
    return str(value)


def image(path: Path, caption: str = "") -> dg.MarkdownMetadataValue:
    """A PNG embedded in markdown, which the Dagster UI renders inline on the asset page."""
    encoded = base64.b64encode(path.read_bytes()).decode()
    return dg.MetadataValue.md(f"![{caption}](data:image/png;base64,{encoded})")


def versioned_output(value: Any, metadata: dict[str, Any] | None = None) -> dg.Output[Any]:
    """``value`` as an Output whose Dagster data version is its content hash, the version
    cifar_assets.storage keeps it under (so the UI's data versions name stored files)."""
    import warnings

    from cifar_assets.storage import content_version

    version = content_version(value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=dg.BetaWarning)
        return dg.Output(value, data_version=dg.DataVersion(version), metadata=metadata)


def input_version_tags(**inputs: Any) -> dict[str, str]:
    """MLflow tags naming the data version of every input an asset consumed:
    ``cifar/data_version/<asset> = <content hash>`` (see cifar_assets.storage)."""
    from cifar_assets.storage import DATA_VERSION_TAG, content_version

    return {DATA_VERSION_TAG + name: content_version(value) for name, value in inputs.items()}
