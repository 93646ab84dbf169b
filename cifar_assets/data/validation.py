"""Validation rules for the splits: the statistics-table schema, integrity, class balance, leakage.

Each ``check_*`` function returns a :class:`CheckOutcome` of plain values (a pass flag, small
scalars for metadata, a failure table of at most :data:`MAX_FAILURE_ROWS` rows naming the offending
image ids and splits, and one sentence), so an orchestrator can attach them to its own check
results. The schema is a pandera model run lazily, so every violation is collected at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.typing.pandas import Series

from cifar_assets.data.imageset import CLASSES, IMAGE_SHAPE, SPLITS, Splits
from cifar_assets.data.statistics import hex_to_hashes, near_duplicates, single_colour

MAX_FAILURE_ROWS = 50
MAX_STD = 127.5  # the largest standard deviation values confined to 0..255 can have
_TOLERANCE = 1e-6  # slack for float sums in the cross-column rules


class ImageStatisticsSchema(pa.DataFrameModel):
    """The table :func:`cifar_assets.data.statistics.image_statistics` produces."""

    id: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    split: Series[str] = pa.Field(isin=list(SPLITS))
    label: Series[np.int64] = pa.Field(ge=0, le=len(CLASSES) - 1)
    mean_r: Series[np.float64] = pa.Field(ge=0.0, le=255.0)
    mean_g: Series[np.float64] = pa.Field(ge=0.0, le=255.0)
    mean_b: Series[np.float64] = pa.Field(ge=0.0, le=255.0)
    std_r: Series[np.float64] = pa.Field(ge=0.0, le=MAX_STD)
    std_g: Series[np.float64] = pa.Field(ge=0.0, le=MAX_STD)
    std_b: Series[np.float64] = pa.Field(ge=0.0, le=MAX_STD)
    min: Series[np.int64] = pa.Field(ge=0, le=255)
    max: Series[np.int64] = pa.Field(ge=0, le=255)
    brightness: Series[np.float64] = pa.Field(ge=0.0, le=255.0)
    contrast: Series[np.float64] = pa.Field(ge=0.0, le=MAX_STD)
    is_constant: Series[bool]
    content_hash: Series[str] = pa.Field(str_matches=r"^[0-9a-f]{64}$")
    phash: Series[str] = pa.Field(str_matches=r"^[0-9a-f]{16}$")

    class Config:
        strict = True  # an unexpected column means the table came from other code
        coerce = False  # a wrong dtype is a bug upstream, not something to paper over

    @pa.dataframe_check(name="min_not_above_max")
    def _min_not_above_max(cls, table: pd.DataFrame) -> pd.Series:
        return table["min"] <= table["max"]

    @pa.dataframe_check(name="means_and_brightness_within_min_max")
    def _within_range(cls, table: pd.DataFrame) -> pd.Series:
        low = table["min"] - _TOLERANCE
        high = table["max"] + _TOLERANCE
        columns = ["mean_r", "mean_g", "mean_b", "brightness"]
        return table[columns].ge(low, axis=0).all(axis=1) & table[columns].le(high, axis=0).all(
            axis=1
        )

    @pa.dataframe_check(name="is_constant_iff_zero_std")
    def _constant_consistent(cls, table: pd.DataFrame) -> pd.Series:
        flat = (table[["std_r", "std_g", "std_b"]] <= _TOLERANCE).all(axis=1)
        return table["is_constant"] == flat


@dataclass(frozen=True)
class CheckOutcome:
    """A check's verdict in plain values: ``failures`` holds at most MAX_FAILURE_ROWS rows."""

    passed: bool
    summary: dict[str, int | float | str]
    failures: pd.DataFrame = field(repr=False)
    description: str


def _examples(values: pd.Series | list[str], limit: int = 5, total: int | None = None) -> str:
    """The first ``limit`` values joined, plus how many of ``total`` (default: all) were left out."""
    items = [str(value) for value in list(values)[:limit]]
    more = (len(values) if total is None else total) - len(items)
    return ", ".join(items) + (f" and {more} more" if more > 0 else "")


def check_schema(stats: pd.DataFrame) -> CheckOutcome:
    """Validate the statistics table against :class:`ImageStatisticsSchema`, collecting all errors.

    The failure table has one row per (violated rule, row) with the row's ``id`` and ``split``
    when the table has them, so each problem points at an image.
    """
    columns = ["id", "split", "column", "check", "failure_case", "row"]
    try:
        ImageStatisticsSchema.validate(stats, lazy=True)
    except pa.errors.SchemaErrors as error:
        cases = error.failure_cases.copy()
        # a dataframe-wide rule reports every column of a failing row; one line per row suffices
        cases = cases.drop_duplicates(subset=["check", "index"]).reset_index(drop=True)
        row_rule = (cases["schema_context"] == "DataFrameSchema") & cases["index"].notna()
        cases["column"] = (
            cases["column"]
            .astype(str)
            .where(~row_rule, "(row)")
            .replace(ImageStatisticsSchema.__name__, "(table)")
        )
        cases["failure_case"] = cases["failure_case"].astype(str).where(~row_rule, "(row)")
        rows = pd.to_numeric(cases["index"], errors="coerce")
        ids = stats["id"] if "id" in stats.columns else pd.Series(dtype=object)
        splits = stats["split"] if "split" in stats.columns else pd.Series(dtype=object)
        failures = pd.DataFrame(
            {
                "id": [_lookup(ids, row) for row in rows],
                "split": [_lookup(splits, row) for row in rows],
                "column": cases["column"].astype(str),
                "check": cases["check"].astype(str),
                "failure_case": cases["failure_case"].astype(str),
                "row": pd.Series(
                    [None if pd.isna(row) else int(row) for row in rows], dtype=object
                ),
            },
            columns=columns,
        )
        by_check = failures["check"].value_counts()
        worst = "; ".join(
            f"{count} x {check} on {_rule_columns(failures, check)} ({_first_id(failures, check)})"
            for check, count in by_check.head(3).items()
        )
        return CheckOutcome(
            passed=False,
            summary={
                "rows": len(stats),
                "violations": len(failures),
                "violated_rules": len(by_check),
                "rows_with_violations": int(failures["row"].nunique()),
            },
            failures=_capped(failures, "check"),
            description=(
                f"The statistics table breaks {len(by_check)} schema rule(s): {worst}; "
                "fix the source data or the code that built the table, then re-materialize."
            ),
        )
    return CheckOutcome(
        passed=True,
        summary={"rows": len(stats), "violations": 0, "violated_rules": 0},
        failures=pd.DataFrame(columns=columns),
        description=f"All {len(stats)} rows of the statistics table match the schema.",
    )


def _lookup(values: pd.Series, row: float) -> str | None:
    if pd.isna(row) or int(row) not in values.index:
        return None
    return str(values.loc[int(row)])


def _capped(failures: pd.DataFrame, kind_column: str) -> pd.DataFrame:
    """At most MAX_FAILURE_ROWS rows, shared fairly between kinds so none is crowded out."""
    kinds = failures[kind_column].nunique()
    if len(failures) <= MAX_FAILURE_ROWS or kinds == 0:
        return failures
    per_kind = max(MAX_FAILURE_ROWS // kinds, 1)
    first = failures.groupby(kind_column, sort=False).head(per_kind)
    rest = failures.drop(first.index).head(MAX_FAILURE_ROWS - len(first))
    return pd.concat([first, rest]).sort_index().head(MAX_FAILURE_ROWS).reset_index(drop=True)


def _first_id(failures: pd.DataFrame, check: object) -> str:
    ids = failures.loc[failures["check"] == check, "id"].dropna()
    return f"e.g. id {ids.iloc[0]}" if len(ids) else "table-wide"


def _rule_columns(failures: pd.DataFrame, check: object) -> str:
    return ", ".join(failures.loc[failures["check"] == check, "column"].unique()[:3])


def check_integrity(splits: Splits) -> CheckOutcome:
    """Array shapes (N, 32, 32, 3), uint8 pixels in 0..255, labels in 0..9, unique ids, no
    single-colour images; the failure table names the split and image id of every problem."""
    problems: list[dict[str, object]] = []
    counts = {
        "bad_shape": 0,
        "bad_dtype": 0,
        "values_out_of_range": 0,
        "labels_out_of_range": 0,
        "duplicate_ids": 0,
        "constant_images": 0,
    }

    def report(kind: str, split: str, image_id: str | None, value: object) -> None:
        counts[kind] += 1
        problems.append({"split": split, "id": image_id, "problem": kind, "value": str(value)})

    total = 0
    for split, part in splits.items():
        images, labels, ids = np.asarray(part.images), np.asarray(part.labels), np.asarray(part.ids)
        total += len(images)
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
            report("bad_shape", split, None, f"images {images.shape}, expected (N, 32, 32, 3)")
            continue
        if labels.shape != (len(images),) or ids.shape != (len(images),):
            report(
                "bad_shape",
                split,
                None,
                f"{len(images)} images but labels {labels.shape} and ids {ids.shape}",
            )
            continue
        if images.dtype != np.uint8:
            report("bad_dtype", split, None, f"images are {images.dtype}, expected uint8")
            flat = images.reshape(len(images), -1)
            outside = (flat < 0) | (flat > 255) | (flat != np.round(flat))
            for index in np.flatnonzero(outside.any(axis=1)):
                report("values_out_of_range", split, str(ids[index]), "pixels outside 0..255 ints")
        for index in np.flatnonzero((labels < 0) | (labels >= len(CLASSES))):
            report("labels_out_of_range", split, str(ids[index]), int(labels[index]))
        unique, seen = np.unique(ids, return_counts=True)
        for image_id, times in zip(unique[seen > 1], seen[seen > 1], strict=True):
            report("duplicate_ids", split, str(image_id), f"{int(times)} images share it")
        for index in np.flatnonzero(single_colour(images)):
            report("constant_images", split, str(ids[index]), images[index, 0, 0].tolist())

    failures = pd.DataFrame(problems, columns=["split", "id", "problem", "value"])
    summary: dict[str, int | float | str] = {"images": total, **counts}
    if failures.empty:
        return CheckOutcome(
            True,
            summary,
            failures,
            f"All {total} images are uint8 (32, 32, 3) with labels in 0..9, unique ids "
            "and more than one colour.",
        )
    parts = [
        f"{count} {kind.replace('_', ' ')} "
        f"({_examples(failures.loc[failures['problem'] == kind, 'id'].fillna('whole split'))})"
        for kind, count in counts.items()
        if count
    ]
    return CheckOutcome(
        False,
        summary,
        _capped(failures, "problem"),
        "Integrity problems: " + "; ".join(parts) + ". Drop or fix these images at the source.",
    )


def check_class_balance(splits: Splits, tolerance: float = 0.2) -> CheckOutcome:
    """Every class count of each split within ``tolerance`` (relative) of the split's mean count.

    Labels outside 0..9 are left to :func:`check_integrity`; an empty split fails.
    """
    if not 0 <= tolerance < 1:
        raise ValueError(f"class-balance tolerance must be in [0, 1), got {tolerance}.")
    rows = []
    summary: dict[str, int | float | str] = {"tolerance": tolerance}
    worst_deviation = 0.0
    for split, part in splits.items():
        labels = np.asarray(part.labels)
        labels = labels[(labels >= 0) & (labels < len(CLASSES))]
        counts = np.bincount(labels, minlength=len(CLASSES))
        expected = len(labels) / len(CLASSES)
        lower, upper = expected * (1 - tolerance), expected * (1 + tolerance)
        summary[f"{split}_min_class_count"] = int(counts.min())
        summary[f"{split}_max_class_count"] = int(counts.max())
        for label, count in enumerate(counts):
            deviation = abs(count - expected) / expected if expected else 1.0
            worst_deviation = max(worst_deviation, deviation)
            if expected == 0 or not lower <= count <= upper:
                rows.append(
                    {
                        "split": split,
                        "label": label,
                        "class": CLASSES[label],
                        "count": int(count),
                        "expected": round(expected, 2),
                        "lower": round(lower, 2),
                        "upper": round(upper, 2),
                    }
                )
    summary["max_relative_deviation"] = round(worst_deviation, 4)
    failures = pd.DataFrame(
        rows, columns=["split", "label", "class", "count", "expected", "lower", "upper"]
    )
    summary["unbalanced_classes"] = len(failures)
    if failures.empty:
        return CheckOutcome(
            True,
            summary,
            failures,
            f"Every class count is within {tolerance:.0%} of its split's mean "
            f"(largest deviation {worst_deviation:.1%}).",
        )
    examples = _examples(
        [
            f"{r.split}/{r['class']}={r['count']} (expected {r.expected:g})"
            for _, r in failures.iterrows()
        ]
    )
    return CheckOutcome(
        False,
        summary,
        failures.head(MAX_FAILURE_ROWS),
        f"{len(failures)} class counts are more than {tolerance:.0%} from their split's mean: "
        f"{examples}; re-split with stratification or rebalance the source.",
    )


def check_leakage(
    stats: pd.DataFrame,
    near_duplicate_max_distance: int = 4,
    max_near_duplicate_fraction: float = 0.0,
) -> CheckOutcome:
    """Images shared between splits: exact (same content hash) and near (pHash within distance).

    Exact duplicates always fail. Near-duplicates fail when they exceed
    ``max_near_duplicate_fraction`` of the validation and test images: strict (0) by default,
    while a real data set with known near-duplicates (CIFAR-10's test set has a few percent) can
    be accepted knowingly with a tolerance.

    Every later split is searched against every earlier one (validation and test against train,
    test against validation) with the exact pigeonhole search of
    :func:`cifar_assets.data.statistics.near_duplicates`; pairs with equal content hashes count as
    exact duplicates only. The failure table lists example pairs, exact ones first. Distances
    between two pHashes are almost always even (the median split sets 32 of the 64 bits), so an
    odd threshold acts like the even one below it.
    """
    columns = ["kind", "split_a", "id_a", "split_b", "id_b", "phash_distance"]
    missing = {"id", "split", "content_hash", "phash"} - set(stats.columns)
    if missing:
        raise ValueError(
            f"check_leakage needs the image_statistics() table; columns {sorted(missing)} are "
            "missing. Build the table with image_statistics() and run check_schema first."
        )
    hashes = hex_to_hashes(stats["phash"])
    positions = {split: np.flatnonzero(stats["split"].to_numpy() == split) for split in SPLITS}
    content = stats["content_hash"].to_numpy()
    ids = stats["id"].astype(str).to_numpy()

    exact_pairs = 0
    exact_examples: list[dict[str, object]] = []
    near_images = 0
    near_examples: list[dict[str, object]] = []
    for earlier, later in combinations(SPLITS, 2):
        early_rows, late_rows = positions[earlier], positions[later]
        early_counts = pd.Series(content[early_rows]).value_counts()
        late_counts = pd.Series(content[late_rows]).value_counts()
        shared = early_counts.index.intersection(late_counts.index)
        exact_pairs += int((early_counts[shared] * late_counts[shared]).sum())
        first_early = dict(zip(content[early_rows][::-1], early_rows[::-1], strict=True))
        for row in late_rows:
            if len(exact_examples) >= MAX_FAILURE_ROWS:
                break
            if content[row] in first_early:
                match = first_early[content[row]]
                exact_examples.append(
                    {
                        "kind": "exact",
                        "split_a": earlier,
                        "id_a": ids[match],
                        "split_b": later,
                        "id_b": ids[row],
                        "phash_distance": 0,  # identical pixels, identical hash
                    }
                )

        matches = near_duplicates(
            hashes[late_rows],
            hashes[early_rows],
            near_duplicate_max_distance,
            exclude_equal=np.concatenate([content[late_rows], content[early_rows]]),
        )
        near_images += len(matches.query_index)
        for query, reference, distance in zip(
            matches.query_index[:MAX_FAILURE_ROWS],
            matches.reference_index[:MAX_FAILURE_ROWS],
            matches.distance[:MAX_FAILURE_ROWS],
            strict=True,
        ):
            near_examples.append(
                {
                    "kind": "near",
                    "split_a": earlier,
                    "id_a": ids[early_rows[reference]],
                    "split_b": later,
                    "id_b": ids[late_rows[query]],
                    "phash_distance": int(distance),
                }
            )

    summary: dict[str, int | float | str] = {
        "images": len(stats),
        "exact_duplicate_pairs": exact_pairs,
        "near_duplicate_images": near_images,
        "near_duplicate_max_distance": near_duplicate_max_distance,
        "max_near_duplicate_fraction": max_near_duplicate_fraction,
    }
    checked_images = len(positions["validation"]) + len(positions["test"])
    near_allowed = near_images <= max_near_duplicate_fraction * checked_images
    # both kinds stay visible in the capped table even when one of them is plentiful
    exact_rows = exact_examples[: max(MAX_FAILURE_ROWS - len(near_examples), MAX_FAILURE_ROWS // 2)]
    near_rows = near_examples[: MAX_FAILURE_ROWS - len(exact_rows)]
    failures = pd.DataFrame(exact_rows + near_rows, columns=columns)
    if exact_pairs == 0 and near_images == 0:
        return CheckOutcome(
            True,
            summary,
            failures,
            f"No image is shared between splits, exactly or within "
            f"{near_duplicate_max_distance} pHash bits.",
        )
    if exact_pairs == 0 and near_allowed:
        return CheckOutcome(
            True,
            summary,
            failures,
            f"No exact duplicates; {near_images} near-duplicate image(s) across splits, within "
            f"the tolerance of {max_near_duplicate_fraction:.2%} of {checked_images} images.",
        )
    found = []
    if exact_pairs:
        shown = [f"{r['split_a']}:{r['id_a']} = {r['split_b']}:{r['id_b']}" for r in exact_rows]
        found.append(
            f"{exact_pairs} exact duplicate pair(s) across splits "
            f"(e.g. {_examples(shown, 3, total=exact_pairs)})"
        )
    if near_images:
        shown = [f"{r['split_a']}:{r['id_a']} ~ {r['split_b']}:{r['id_b']}" for r in near_rows]
        found.append(
            f"{near_images} image(s) with a near-duplicate in an earlier split "
            f"(e.g. {_examples(shown, 3, total=near_images)})"
        )
    return CheckOutcome(
        False,
        summary,
        failures,
        "Leakage between splits: " + "; ".join(found) + ". Remove them from the later split "
        "(or deduplicate the source) and re-split.",
    )
