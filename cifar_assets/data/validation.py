"""Validation rules for the splits: the statistics-table schema, integrity, class balance, leakage.

Each ``check_*`` function returns a :class:`CheckOutcome` of plain values (a pass flag, a severity,
builtin-typed scalars for metadata, a failure table of at most :data:`MAX_FAILURE_ROWS` rows naming
the offending images by split, id and origin, and one sentence saying what is wrong, where and what
to do), so an orchestrator can attach them to its own check results. Messages name images by their
origin (a file path, or source and index), never by content id alone. The schema is a pandera model
run lazily, so every violation is collected at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Literal

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.typing.pandas import Series

from cifar_assets.data.imageset import CLASSES, IMAGE_SHAPE, SPLITS, Splits, content_hash
from cifar_assets.data.splits import MIN_HELD_OUT_PER_CLASS, too_small_classes, too_small_message
from cifar_assets.data.statistics import hex_to_hashes, near_duplicates, single_colour

MAX_FAILURE_ROWS = 50
MAX_STD = 127.5  # the largest standard deviation values confined to 0..255 can have
_TOLERANCE = 1e-6  # slack for float sums in the cross-column rules


class ImageStatisticsSchema(pa.DataFrameModel):
    """The table :func:`cifar_assets.data.statistics.image_statistics` produces."""

    id: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    origin: Series[str] = pa.Field(str_length={"min_value": 1})
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


Scalar = int | float | str | bool


def plain(value: object) -> Scalar:
    """``value`` as an exact builtin scalar; numpy scalars (np.float64 is a float subclass that
    type checkers accept but serializers such as Dagster's reject) become their Python value."""
    if isinstance(value, np.generic):
        value = value.item()
    if type(value) not in (int, float, str, bool):
        raise TypeError(
            f"check summary value {value!r} is a {type(value).__name__}; summaries hold only "
            "int, float, str or bool: convert it where the summary is built."
        )
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class CheckOutcome:
    """A check's verdict in plain values: ``failures`` holds at most MAX_FAILURE_ROWS rows.

    ``severity`` says what a failure means: ``"error"`` (the data must not be used) or
    ``"warning"`` (usable, but someone should look). The summary is converted to builtin scalars
    here, so no numpy scalar reaches an orchestrator's metadata.
    """

    passed: bool
    summary: dict[str, Scalar]
    failures: pd.DataFrame = field(repr=False)
    description: str
    severity: Literal["error", "warning"] = "error"

    def __post_init__(self) -> None:
        object.__setattr__(self, "passed", bool(self.passed))
        object.__setattr__(self, "summary", {str(k): plain(v) for k, v in self.summary.items()})


def _examples(values: pd.Series | list[str], limit: int = 5, total: int | None = None) -> str:
    """The first ``limit`` values joined, plus how many of ``total`` (default: all) were left out."""
    items = [str(value) for value in list(values)[:limit]]
    more = (len(values) if total is None else total) - len(items)
    return ", ".join(items) + (f" and {more} more" if more > 0 else "")


def check_schema(stats: pd.DataFrame) -> CheckOutcome:
    """Validate the statistics table against :class:`ImageStatisticsSchema`, collecting all errors.

    The failure table has one row per (violated rule, row) with the row's ``id``, ``origin`` and
    ``split`` when the table has them, so each problem points at an image.
    """
    columns = ["id", "origin", "split", "column", "check", "failure_case", "row"]
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
        empty = pd.Series(dtype=object)
        ids = stats["id"] if "id" in stats.columns else empty
        origins = stats["origin"] if "origin" in stats.columns else empty
        splits = stats["split"] if "split" in stats.columns else empty
        failures = pd.DataFrame(
            {
                "id": [_lookup(ids, row) for row in rows],
                "origin": [_lookup(origins, row) for row in rows],
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
    rows = failures[failures["check"] == check]
    origins, ids = rows["origin"].dropna(), rows["id"].dropna()
    if len(origins):
        return f"e.g. {origins.iloc[0]}"
    return f"e.g. id {ids.iloc[0]}" if len(ids) else "table-wide"


def _rule_columns(failures: pd.DataFrame, check: object) -> str:
    return ", ".join(failures.loc[failures["check"] == check, "column"].unique()[:3])


# What a person should do about each integrity problem, and how the problem reads in a sentence.
# Only duplicates within a split are a warning: the splitter keeps identical images together, so
# they leak nothing, their labels agree, and the data stays usable; each copy just weighs one
# picture twice. Every other problem makes the data wrong or unreadable: an error.
_INTEGRITY_KINDS = {
    "bad_shape": (
        "split(s) with a wrong array shape",
        "re-materialize cifar10_raw and cifar10_splits from the source",
    ),
    "bad_dtype": (
        "split(s) not stored as uint8",
        "build image sets with ImageSet.from_arrays, which stores uint8 pixels",
    ),
    "values_out_of_range": (
        "image(s) with pixels outside 0..255",
        "re-export these images as 8-bit files",
    ),
    "labels_out_of_range": (
        "image(s) with a label outside 0..9",
        "put each image in the folder of its class (or give it a label 0..9), or drop it",
    ),
    "duplicate_ids": (
        "repeated id(s)",
        "build image sets with ImageSet.from_arrays, which gives every image its own id",
    ),
    "constant_images": (
        "single-colour image(s)",
        "delete these blank files from the source, or replace them with the real pictures",
    ),
    "conflicting_labels": (
        "image(s) whose identical copy carries another label",
        "keep one copy, in the folder of its true class, and delete the others",
    ),
    "duplicates_in_split": (
        "extra copy(ies) of an image in the same split",
        "delete the extra copies from the source so each picture counts once",
    ),
}
INTEGRITY_WARNINGS = frozenset({"duplicates_in_split"})


def check_integrity(splits: Splits) -> CheckOutcome:
    """Array shapes (N, 32, 32, 3), uint8 pixels in 0..255, labels in 0..9, unique ids, no
    single-colour images, no identical images with different labels (all errors) and no identical
    images inside one split (a warning: see ``_INTEGRITY_KINDS``).

    The failure table names the split, id and origin (file path, or source and index) of every
    problem; the description names origins and says what to do about each kind.
    """
    problems: list[dict[str, object]] = []
    counts = dict.fromkeys(_INTEGRITY_KINDS, 0)
    ids_of = {split: np.asarray(part.ids) for split, part in splits.items()}
    origins_of = {split: np.asarray(part.origins) for split, part in splits.items()}

    def report(kind: str, split: str, index: int | None, value: object) -> None:
        counts[kind] += 1
        problems.append(
            {
                "split": split,
                "id": None if index is None else str(ids_of[split][index]),
                "origin": None if index is None else str(origins_of[split][index]),
                "problem": kind,
                "value": str(value),
            }
        )

    copies: list[_Copy] = []  # every image of the well-formed splits, by content
    total = 0
    for split, part in splits.items():
        images, labels, ids = np.asarray(part.images), np.asarray(part.labels), ids_of[split]
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
                report("values_out_of_range", split, int(index), "pixels outside 0..255 ints")
        for index in np.flatnonzero((labels < 0) | (labels >= len(CLASSES))):
            report("labels_out_of_range", split, int(index), int(labels[index]))
        unique, seen = np.unique(ids, return_counts=True)
        for image_id, times in zip(unique[seen > 1], seen[seen > 1], strict=True):
            first = int(np.flatnonzero(ids == image_id)[0])
            report("duplicate_ids", split, first, f"{int(times)} images share id {image_id}")
        for index in np.flatnonzero(single_colour(images)):
            report("constant_images", split, int(index), images[index, 0, 0].tolist())
        if images.dtype == np.uint8:
            copies.extend(
                _Copy(split, position, int(label), content_hash(image))
                for position, (image, label) in enumerate(zip(images, labels, strict=True))
                if 0 <= label < len(CLASSES)
            )
    for kind, split, position, value in _copy_problems(copies, origins_of):
        report(kind, split, position, value)

    failures = pd.DataFrame(problems, columns=["split", "id", "origin", "problem", "value"])
    summary: dict[str, Scalar] = {"images": total, **counts}
    if failures.empty:
        return CheckOutcome(
            True,
            summary,
            failures,
            f"All {total} images are uint8 (32, 32, 3) with labels in 0..9, unique ids and "
            "contents, and more than one colour.",
        )
    where = failures["origin"].fillna(failures["split"] + " split")
    parts = [
        f"{count} {_INTEGRITY_KINDS[kind][0]} "
        f"({_examples(where[failures['problem'] == kind])}): {_INTEGRITY_KINDS[kind][1]}"
        for kind, count in counts.items()
        if count
    ]
    errors = any(count for kind, count in counts.items() if kind not in INTEGRITY_WARNINGS)
    return CheckOutcome(
        False,
        summary,
        _capped(failures, "problem"),
        ("Integrity problems: " if errors else "Usable, but worth fixing: ")
        + "; ".join(parts)
        + ". Then re-materialize cifar10_raw.",
        severity="error" if errors else "warning",
    )


@dataclass(frozen=True)
class _Copy:
    split: str
    position: int
    label: int
    digest: str


def _copy_problems(
    copies: list[_Copy], origins_of: dict[str, np.ndarray]
) -> list[tuple[str, str, int, str]]:
    """(kind, split, position, value) for identical images with different labels (anywhere) and
    for extra identical images with the same label inside one split; identical images in
    different splits are leakage, left to :func:`check_leakage`."""
    groups: dict[str, list[_Copy]] = {}
    for copy in copies:
        groups.setdefault(copy.digest, []).append(copy)
    found = []
    for group in groups.values():
        if len(group) < 2:
            continue
        if len({copy.label for copy in group}) > 1:
            for copy in group:
                other = next(item for item in group if item.label != copy.label)
                found.append(
                    (
                        "conflicting_labels",
                        copy.split,
                        copy.position,
                        f"labelled {CLASSES[copy.label]}, but "
                        f"{origins_of[other.split][other.position]} ({other.split} split) has "
                        f"the same pixels labelled {CLASSES[other.label]}",
                    )
                )
            continue
        first_in_split: dict[str, _Copy] = {}
        for copy in group:
            first = first_in_split.setdefault(copy.split, copy)
            if first is not copy:
                found.append(
                    (
                        "duplicates_in_split",
                        copy.split,
                        copy.position,
                        f"same pixels and label ({CLASSES[copy.label]}) as "
                        f"{origins_of[first.split][first.position]}",
                    )
                )
    return found


def check_class_balance(
    splits: Splits, tolerance: float = 0.2, min_held_out: int = MIN_HELD_OUT_PER_CLASS
) -> CheckOutcome:
    """Every class count of each split within ``tolerance`` (relative) of the split's mean count,
    and every class big enough to split.

    A count outside the tolerance is an error (an empty split fails). A class with no training
    image, or fewer than ``min_held_out`` images in validation or test, is named with the size
    each split got: a warning when the counts are otherwise within tolerance, part of the error
    otherwise. Labels outside 0..9 are left to :func:`check_integrity`.
    """
    if not 0 <= tolerance < 1:
        raise ValueError(f"class-balance tolerance must be in [0, 1), got {tolerance}.")
    rows = []
    summary: dict[str, Scalar] = {"tolerance": float(tolerance)}
    worst_deviation = 0.0
    for split, part in splits.items():
        labels = np.asarray(part.labels)
        labels = labels[(labels >= 0) & (labels < len(CLASSES))]
        counts = [int(count) for count in np.bincount(labels, minlength=len(CLASSES))]
        expected = len(labels) / len(CLASSES)
        lower, upper = expected * (1 - tolerance), expected * (1 + tolerance)
        summary[f"{split}_min_class_count"] = min(counts)
        summary[f"{split}_max_class_count"] = max(counts)
        for label, count in enumerate(counts):
            deviation = abs(count - expected) / expected if expected else 1.0
            worst_deviation = max(worst_deviation, deviation)
            if expected == 0 or not lower <= count <= upper:
                rows.append(
                    {
                        "split": split,
                        "label": label,
                        "class": CLASSES[label],
                        "count": count,
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
    small = too_small_classes(splits, min_held_out)
    small_text = too_small_message(splits, min_held_out)
    summary["min_held_out_per_class"] = min_held_out
    summary["classes_too_small"] = len(small)
    summary["too_small_class_sizes"] = "; ".join(size.describe() for size in small) or "none"
    if failures.empty and not small:
        return CheckOutcome(
            True,
            summary,
            failures,
            f"Every class count is within {tolerance:.0%} of its split's mean "
            f"(largest deviation {worst_deviation:.1%}), and every class has at least "
            f"{min_held_out} images in validation and in test.",
        )
    if failures.empty:
        return CheckOutcome(
            False,
            summary,
            failures,
            f"Class counts are within {tolerance:.0%} of their split's mean, but {small_text}",
            severity="warning",
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
        (f"{small_text} " if small_text else "")
        + f"{len(failures)} class counts are more than {tolerance:.0%} from their split's mean: "
        f"{examples}; add images of the small classes or remove some of the large ones in "
        f"{splits.train.source}, or raise the class_balance_check tolerance if this imbalance "
        "is intended.",
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
    columns = [
        "kind",
        "split_a",
        "origin_a",
        "id_a",
        "split_b",
        "origin_b",
        "id_b",
        "phash_distance",
    ]
    missing = {"id", "origin", "split", "content_hash", "phash"} - set(stats.columns)
    if missing:
        raise ValueError(
            f"check_leakage needs the image_statistics() table; columns {sorted(missing)} are "
            "missing. Build the table with image_statistics() and run check_schema first."
        )
    hashes = hex_to_hashes(stats["phash"])
    positions = {split: np.flatnonzero(stats["split"].to_numpy() == split) for split in SPLITS}
    content = stats["content_hash"].to_numpy()
    ids = stats["id"].astype(str).to_numpy()
    origins = stats["origin"].astype(str).to_numpy()

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
                        "origin_a": origins[match],
                        "id_a": ids[match],
                        "split_b": later,
                        "origin_b": origins[row],
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
                    "origin_a": origins[early_rows[reference]],
                    "id_a": ids[early_rows[reference]],
                    "split_b": later,
                    "origin_b": origins[late_rows[query]],
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
        shown = [
            f"{r['origin_a']} ({r['split_a']}) = {r['origin_b']} ({r['split_b']})"
            for r in exact_rows
        ]
        found.append(
            f"{exact_pairs} exact duplicate pair(s) across splits "
            f"(e.g. {_examples(shown, 3, total=exact_pairs)})"
        )
    if near_images:
        shown = [
            f"{r['origin_a']} ({r['split_a']}) ~ {r['origin_b']} ({r['split_b']})"
            for r in near_rows
        ]
        found.append(
            f"{near_images} image(s) with a near-duplicate in an earlier split "
            f"(e.g. {_examples(shown, 3, total=near_images)})"
        )
    return CheckOutcome(
        False,
        summary,
        failures,
        "Leakage between splits: " + "; ".join(found) + ". Delete one copy of each pair from the "
        "source and re-materialize cifar10_raw, or accept a known share of near-duplicates with "
        "the leakage_check's max_near_duplicate_fraction.",
    )
