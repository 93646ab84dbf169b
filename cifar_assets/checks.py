"""Blocking data checks on ``validation_report``: a failure stops everything downstream.

The rules live in :mod:`cifar_assets.data.validation`; here each outcome becomes a Dagster check
result whose failure cases show as a table in the UI (dagster-pandera's type check would drop it).
An outcome of severity "warning" (duplicates inside one split, classes too small to split) fails
with WARN severity, which Dagster shows but does not block on.
"""

from typing import TYPE_CHECKING, Any

import dagster as dg
import pandas as pd
from pydantic import Field

from cifar_assets.assets.metadata import table
from cifar_assets.assets.validation_assets import validation_report
from cifar_assets.data.imageset import Splits

if TYPE_CHECKING:
    from cifar_assets.data.validation import CheckOutcome


class BalanceCheckConfig(dg.Config):
    tolerance: float = Field(
        default=0.2, description="Allowed relative deviation of a class count from the mean."
    )


class LeakageCheckConfig(dg.Config):
    near_duplicate_max_distance: int = Field(
        default=4, description="pHash bits two images may differ by and still be near-duplicates."
    )
    max_near_duplicate_fraction: float = Field(
        default=0.0,
        description="Share of validation+test images allowed to have a near-duplicate in an "
        "earlier split (exact duplicates always fail). Real CIFAR-10 has a few percent.",
    )


def _result(outcome: "CheckOutcome") -> dg.AssetCheckResult:
    # CheckOutcome holds builtin scalars only: Dagster accepts np.float64 (a float subclass) here
    # and then fails to serialize the event.
    metadata: dict[str, Any] = {"summary": outcome.description, **outcome.summary}
    if not outcome.failures.empty:
        metadata["failure_cases"] = table(outcome.failures)
        metadata["failure_count"] = len(outcome.failures)
    severity = (
        dg.AssetCheckSeverity.WARN if outcome.severity == "warning" else dg.AssetCheckSeverity.ERROR
    )
    return dg.AssetCheckResult(
        passed=outcome.passed,
        severity=severity,
        metadata=metadata,
        description=outcome.description,
    )


_SPLITS_IN = {"cifar10_splits": dg.AssetIn(key="cifar10_splits")}


@dg.asset_check(
    asset=validation_report,
    blocking=True,
    description="The statistics table matches its pandera schema (types, ranges, unique ids).",
)
def schema_check(validation_report: pd.DataFrame) -> dg.AssetCheckResult:
    from cifar_assets.data.validation import check_schema

    return _result(check_schema(validation_report))


@dg.asset_check(
    asset=validation_report,
    blocking=True,
    additional_ins=_SPLITS_IN,
    description="Shape (N, 32, 32, 3), uint8, labels in 0..9, no constant images, no identical "
    "images with different labels (errors); no identical images inside one split (a warning).",
)
def integrity_check(cifar10_splits: Splits) -> dg.AssetCheckResult:
    from cifar_assets.data.validation import check_integrity

    return _result(check_integrity(cifar10_splits))


@dg.asset_check(
    asset=validation_report,
    blocking=True,
    additional_ins=_SPLITS_IN,
    description="Every class within the tolerance of the mean class count, in every split "
    "(error); every class with enough images in validation and test to be measured (warning).",
)
def class_balance_check(config: BalanceCheckConfig, cifar10_splits: Splits) -> dg.AssetCheckResult:
    from cifar_assets.data.validation import check_class_balance

    return _result(check_class_balance(cifar10_splits, tolerance=config.tolerance))


@dg.asset_check(
    asset=validation_report,
    blocking=True,
    description="No exact or near-duplicate images shared between splits.",
)
def leakage_check(
    config: LeakageCheckConfig, validation_report: pd.DataFrame
) -> dg.AssetCheckResult:
    from cifar_assets.data.validation import check_leakage

    return _result(
        check_leakage(
            validation_report,
            near_duplicate_max_distance=config.near_duplicate_max_distance,
            max_near_duplicate_fraction=config.max_near_duplicate_fraction,
        )
    )


DATA_CHECKS = [schema_check, integrity_check, class_balance_check, leakage_check]
