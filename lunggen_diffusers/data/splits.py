"""Patient-wise splits and metadata filters, the same for every source with a `patient_id` column (NIH, a folder
with a metadata.csv, a prepared or Hub dataset).

Splits never share a patient: the test set comes from official lists or a seed-free hash of the patient ID, the
validation patients from a seeded hash. Filters and the per-patient cap read metadata only, so they run before
anything is decoded.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import datasets

from ..cli import UsageError

# The official split lists' file names (NIH ChestX-ray14's; any source may ship lists named so).
TEST_LIST, TRAIN_VAL_LIST = "test_list.txt", "train_val_list.txt"
SPLITS = ("train", "validation", "test")
VIEWS = ("PA", "AP", "all")
FILTERS = ("view_position", "include_findings", "exclude_findings", "min_age", "max_age", "max_images_per_patient")


def _unit_hash(text: str) -> float:
    """Deterministic, platform-independent uniform number in [0, 1) for a string."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise UsageError(f"--{name} {value} must be in [0, 1)")


def assign_splits(
    table: Mapping[str, Sequence],
    test_names: set[str] | None = None,
    train_val_names: set[str] | None = None,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[str | None], str]:
    """Patient-wise split of every row ("train", "validation", "test", or None when in neither official list).

    `test` comes from the official list when there is one (else everything outside train_val_list), or without
    lists from a hash of the Patient ID, seed-free so the test set never moves. Validation takes a
    `validation_fraction` of the non-test patients, chosen by a seeded hash: deterministic, never splitting a patient.
    """
    _check_fraction("validation_fraction", validation_fraction)
    _check_fraction("test_fraction", test_fraction)
    patients = table["patient_id"]
    if test_names is None and train_val_names is None:
        is_test = [_unit_hash(f"test:{p}") < test_fraction for p in patients]
        method = f"patient-ID hash ({test_fraction:.0%} of patients in test)"
    else:
        names = table["image_index"]
        if test_names is not None and train_val_names is not None:
            both = sorted(test_names & train_val_names)
            if both:
                raise UsageError(f"{len(both)} image(s) are in both {TEST_LIST} and {TRAIN_VAL_LIST}: {both[:3]}")
        if test_names is not None:
            # Without train_val_list, everything outside test_list is train_val; with both, a row in neither is out.
            is_test = [
                True if n in test_names else False if train_val_names is None or n in train_val_names else None
                for n in names
            ]
        else:
            is_test = [n not in train_val_names for n in names]
        given = ((TEST_LIST, test_names), (TRAIN_VAL_LIST, train_val_names))
        lists = [name for name, listed in given if listed is not None]
        method = f"official lists ({', '.join(lists)})"
    train_val_patients = sorted({p for p, t in zip(patients, is_test, strict=True) if t is False})
    ranked = sorted(train_val_patients, key=lambda p: _unit_hash(f"{seed}:{p}"))
    validation = set(ranked[: round(validation_fraction * len(ranked))])
    splits = [
        None if t is None else "test" if t else "validation" if p in validation else "train"
        for p, t in zip(patients, is_test, strict=True)
    ]
    return splits, method


def check_patient_disjoint(splits: Mapping[str, datasets.Dataset | Iterable]) -> dict[str, int]:
    """Raise if a patient is in two splits; returns the number of patients per split.

    `splits` maps split names to datasets (their `patient_id` column) or to iterables of patient IDs.
    """
    patients = {
        name: set(part["patient_id"] if isinstance(part, datasets.Dataset) else part) for name, part in splits.items()
    }
    names = list(patients)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = sorted(patients[a] & patients[b])
            if shared:
                raise UsageError(
                    f"{len(shared)} patient(s) are in both {a!r} and {b!r} (e.g. {', '.join(map(str, shared[:5]))}); "
                    "splits must be patient-wise"
                )
    return {name: len(ids) for name, ids in patients.items()}


def active_filters(settings: Any) -> dict[str, Any]:
    """The filters set on a DataConfig-like object: {name: value} for those not at their no-op default."""
    values = {name: getattr(settings, name, None) for name in FILTERS}
    return {k: v for k, v in values.items() if v is not None and not (k == "view_position" and v == "all")}


def select_rows(
    columns: Mapping[str, Sequence],
    view_position: str = "all",
    include_findings: Sequence[str] | None = None,
    exclude_findings: Sequence[str] | None = None,
    min_age: int | None = None,
    max_age: int | None = None,
    max_images_per_patient: int | None = None,
) -> list[int]:
    """Row indices passing every filter, then at most `max_images_per_patient` per patient.

    The cap keeps, for each patient, the images whose names hash lowest: deterministic, independent of row order,
    and spread over the follow-ups. A filter that leaves nothing raises, naming the filter.
    """
    if view_position not in VIEWS:
        raise UsageError(f"--view_position {view_position!r} is not one of: {', '.join(VIEWS)}")
    if max_images_per_patient is not None and max_images_per_patient < 1:
        raise UsageError(f"--max_images_per_patient {max_images_per_patient} must be a positive integer")
    if min_age is not None and max_age is not None and min_age > max_age:
        raise UsageError(f"--min_age {min_age} is above --max_age {max_age}")
    wanted, unwanted = set(include_findings or ()), set(exclude_findings or ())
    steps = []
    if view_position != "all":
        steps.append((f"--view_position {view_position}", "view_position", lambda v: v == view_position))
    if wanted:
        steps.append(
            (f"--include_findings {' '.join(sorted(wanted))}", "finding_labels", lambda f: not wanted.isdisjoint(f))
        )
    if unwanted:
        steps.append((f"--exclude_findings {' '.join(sorted(unwanted))}", "finding_labels", unwanted.isdisjoint))
    if min_age is not None:
        steps.append((f"--min_age {min_age}", "patient_age", lambda a: a is not None and a >= min_age))
    if max_age is not None:
        steps.append((f"--max_age {max_age}", "patient_age", lambda a: a is not None and a <= max_age))
    if max_images_per_patient is not None:
        steps.append((f"--max_images_per_patient {max_images_per_patient}", "patient_id", None))
    for flag, column, _ in steps:
        if column not in columns:
            raise UsageError(f"{flag} needs a {column!r} column; the data has: {', '.join(columns)}")
    if wanted or unwanted:
        known = {label for labels in columns["finding_labels"] for label in labels}
        unknown = sorted((wanted | unwanted) - known)
        if unknown:
            raise UsageError(f"unknown finding(s) {unknown}; the data has: {', '.join(sorted(known))}")

    rows = range(len(next(iter(columns.values()))))
    for flag, column, keep in steps:
        values = columns[column]
        if keep is None:  # the per-patient cap
            names = columns.get("image_index")
            by_patient = defaultdict(list)
            for i in rows:
                by_patient[values[i]].append(i)
            kept = set()
            for group in by_patient.values():
                group.sort(key=lambda i: _unit_hash(str(names[i] if names is not None else i)))
                kept.update(group[:max_images_per_patient])
            rows = [i for i in rows if i in kept]
        else:
            before = len(rows)
            rows = [i for i in rows if keep(values[i])]
            if not rows:
                raise UsageError(f"{flag} leaves no images (of {before})")
    return list(rows)


def filter_dataset(ds: datasets.Dataset, settings: Any) -> datasets.Dataset:
    """Apply the filters set on `settings` (a DataConfig) to any dataset with the metadata columns they need."""
    filters = active_filters(settings)
    if not filters:
        return ds
    needed = {"view_position", "finding_labels", "patient_age", "patient_id", "image_index"} & set(ds.column_names)
    columns = {name: list(ds[name]) for name in ds.column_names if name in needed}
    rows = select_rows(columns, **filters)
    return ds if len(rows) == len(ds) else ds.select(rows)


def patient_splits(ds: datasets.Dataset, settings: Any) -> list[str]:
    """Each row's split, patient-wise: by hashing the patient IDs, except that a boolean `official_test` column (a
    collection's own test set, e.g. CheXpert's valid.csv) decides which rows are test, and an `official_split`
    column (MIMIC-CXR's, by subject) is the split itself.

    `settings` is a DataConfig (validation_fraction, test_fraction, split_seed).
    """
    if "official_split" in ds.column_names:
        return list(ds["official_split"])
    table = {"patient_id": ds["patient_id"], "image_index": [str(i) for i in range(len(ds))]}
    test = train_val = None
    if "official_test" in ds.column_names:
        official = ds["official_test"]
        test = {str(i) for i, t in enumerate(official) if t}
        train_val = {str(i) for i, t in enumerate(official) if not t}
    splits, _ = assign_splits(table, test, train_val, settings.validation_fraction, settings.test_fraction,
                              settings.split_seed)
    return splits


def split_by_patient(ds: datasets.Dataset, settings: Any) -> datasets.Dataset:
    """The split `settings.split` of a dataset whose metadata names patients (`patient_splits`).

    `settings` is a DataConfig (split, validation_fraction, test_fraction, split_seed).
    """
    splits = patient_splits(ds, settings)
    if settings.split not in splits:
        have = ", ".join(sorted(set(splits)))
        raise UsageError(f"--split {settings.split!r}: not a split of this folder (has: {have})")
    return ds.select([i for i, s in enumerate(splits) if s == settings.split])
