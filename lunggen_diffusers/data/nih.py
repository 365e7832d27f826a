"""NIH ChestX-ray14: folder layout, metadata, patient-wise splits, filters, and the one-time prepare pass.

The result is a `datasets.DatasetDict` (train / validation / test) of uint8 `pixel_values` plus the metadata columns
`image_index, patient_id, finding_labels, view_position, patient_age, patient_sex, follow_up, split`. Filters and the
per-patient cap run on the metadata before anything is decoded; they also work on an already prepared dataset (any
source with those columns), through `filter_dataset`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import datasets

from .build import listing_key, prepare

logger = logging.getLogger(__name__)

METADATA_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # preferred first; either may be gzipped
TEST_LIST, TRAIN_VAL_LIST = "test_list.txt", "train_val_list.txt"
SPLITS = ("train", "validation", "test")
VIEWS = ("PA", "AP", "all")
FILTERS = ("view_position", "include_findings", "exclude_findings", "min_age", "max_age", "max_images_per_patient")
_CSV_COLUMNS = {
    "image_index": "Image Index",
    "finding_labels": "Finding Labels",
    "follow_up": "Follow-up #",
    "patient_id": "Patient ID",
    "patient_age": "Patient Age",
    "patient_sex": "Patient Gender",
    "view_position": "View Position",
}
# The 2017 CSV has typos such as 414 (corrected in v2020, whose oldest patient is 95): unknown, not a filter match.
MAX_PLAUSIBLE_AGE = 120

FEATURES = datasets.Features(
    {
        "image": datasets.Image(decode=False),
        "image_index": datasets.Value("string"),
        "patient_id": datasets.Value("int64"),
        "finding_labels": datasets.List(datasets.Value("string")),
        "view_position": datasets.Value("string"),
        "patient_age": datasets.Value("int32"),
        "patient_sex": datasets.Value("string"),
        "follow_up": datasets.Value("int32"),
        "split": datasets.Value("string"),
    }
)


def find_metadata(nih_dir: str | Path) -> Path:
    root = Path(nih_dir)
    for name in METADATA_FILES:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"{nih_dir}: no NIH metadata file ({' or '.join(METADATA_FILES)}, optionally .gz) in this folder"
    )


def is_nih_folder(path: str | Path) -> bool:
    try:
        find_metadata(path)
    except FileNotFoundError:
        return False
    return True


def _age(text: str) -> int | None:
    age = int(text.strip().rstrip("Yy"))  # early releases wrote "058Y"
    return age if 0 <= age <= MAX_PLAUSIBLE_AGE else None


def read_metadata(path: str | Path) -> dict[str, list]:
    """The Data_Entry CSV (plain or .gz, 2017 or v2020 release) as columns named like the dataset's."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        absent = [h for h in _CSV_COLUMNS.values() if h not in header]
        if absent:
            raise ValueError(f"{path.name}: missing column(s) {', '.join(absent)}; is this the NIH Data_Entry CSV?")
        where = {column: header.index(h) for column, h in _CSV_COLUMNS.items()}
        table: dict[str, list] = {column: [] for column in _CSV_COLUMNS}
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                cell = {column: row[i].strip() for column, i in where.items()}
                table["image_index"].append(cell["image_index"])
                table["finding_labels"].append(cell["finding_labels"].split("|"))
                table["follow_up"].append(int(cell["follow_up"]))
                table["patient_id"].append(int(cell["patient_id"]))
                table["patient_age"].append(_age(cell["patient_age"]))
                table["patient_sex"].append(cell["patient_sex"])
                table["view_position"].append(cell["view_position"])
            except (ValueError, IndexError) as exc:
                raise ValueError(f"{path.name} line {line}: cannot parse {row[:7]} ({exc})") from None
    if not table["image_index"]:
        raise ValueError(f"{path.name}: no rows")
    return table


def read_split_lists(nih_dir: str | Path) -> tuple[set[str] | None, set[str] | None]:
    """(test names, train_val names) from the official lists; None for a list that is absent."""

    def read(name: str) -> set[str] | None:
        path = Path(nih_dir) / name
        return set(path.read_text().split()) if path.is_file() else None

    return read(TEST_LIST), read(TRAIN_VAL_LIST)


def find_images(nih_dir: str | Path) -> tuple[dict[str, str], list[str]]:
    """{file name: path} of the PNGs in any NIH layout, and the folders (relative) that held them.

    Layouts: `images_001/images/ ... images_012/images/` (as unpacked from the 12 archives), one `images/` folder,
    or the PNGs directly in `nih_dir`. The first copy of a name wins.
    """
    root = Path(nih_dir)
    numbered = sorted(p for p in root.glob("images_*") if p.is_dir())
    found: dict[str, str] = {}
    used = []
    for folder in [root, root / "images", *numbered, *(p / "images" for p in numbered)]:
        if not folder.is_dir():
            continue
        before = len(found)
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.lower().endswith(".png") and entry.is_file():
                    found.setdefault(entry.name, entry.path)
        if len(found) > before:
            used.append(folder.relative_to(root).as_posix())
    return found, used


def _unit_hash(text: str) -> float:
    """Deterministic, platform-independent uniform number in [0, 1) for a string."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"--{name} {value} must be in [0, 1)")


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
                raise ValueError(f"{len(both)} image(s) are in both {TEST_LIST} and {TRAIN_VAL_LIST}: {both[:3]}")
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
    train_val_patients = sorted({p for p, t in zip(patients, is_test) if t is False})
    ranked = sorted(train_val_patients, key=lambda p: _unit_hash(f"{seed}:{p}"))
    validation = set(ranked[: round(validation_fraction * len(ranked))])
    splits = [
        None if t is None else "test" if t else "validation" if p in validation else "train"
        for p, t in zip(patients, is_test)
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
                raise ValueError(
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
        raise ValueError(f"--view_position {view_position!r} is not one of: {', '.join(VIEWS)}")
    if max_images_per_patient is not None and max_images_per_patient < 1:
        raise ValueError(f"--max_images_per_patient {max_images_per_patient} must be a positive integer")
    if min_age is not None and max_age is not None and min_age > max_age:
        raise ValueError(f"--min_age {min_age} is above --max_age {max_age}")
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
            raise ValueError(f"{flag} needs a {column!r} column; the data has: {', '.join(columns)}")
    if wanted or unwanted:
        known = {label for labels in columns["finding_labels"] for label in labels}
        unknown = sorted((wanted | unwanted) - known)
        if unknown:
            raise ValueError(f"unknown finding(s) {unknown}; the data has: {', '.join(sorted(known))}")

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
                raise ValueError(f"{flag} leaves no images (of {before})")
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


class Plan(NamedTuple):
    """What a prepare pass will decode: selected rows (with image paths and split), a report, and missing names."""

    dataset: datasets.Dataset
    report: dict[str, Any]
    missing: list[str]


def plan_nih(nih_dir: str | Path, settings: Any) -> Plan:
    """Read the layout and metadata, split, filter and locate the images; cheap (nothing is decoded).

    `settings` is a DataConfig (resolution, center_crop, filters, fractions, split_seed, max_failed_fraction).
    """
    root = Path(nih_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--nih_dir {nih_dir}: no such folder")
    csv_path = find_metadata(root)
    table = read_metadata(csv_path)
    test_names, train_val_names = read_split_lists(root)
    splits, method = assign_splits(
        table, test_names, train_val_names, settings.validation_fraction, settings.test_fraction, settings.split_seed
    )
    filters = active_filters(settings)
    rows = [i for i in select_rows(table, **filters) if splits[i] is not None]
    unlisted = sum(s is None for s in splits)
    if unlisted:
        logger.warning("%d image(s) of %s are in neither split list and are left out", unlisted, csv_path.name)
    if not rows:
        raise ValueError(f"no image of {csv_path.name} is in {TEST_LIST} or {TRAIN_VAL_LIST}")

    found, folders = find_images(root)
    if not found:
        raise FileNotFoundError(f"{nih_dir}: no PNG files (looked in ., images/, images_*/ and images_*/images/)")
    missing = [table["image_index"][i] for i in rows if table["image_index"][i] not in found]
    if missing:
        fraction = len(missing) / len(rows)
        message = (
            f"{len(missing)} of {len(rows)} images named in {csv_path.name} are not under {nih_dir} "
            f"(looked in {', '.join(folders)}); first: {', '.join(missing[:5])}"
        )
        if fraction > settings.max_failed_fraction:
            limit = settings.max_failed_fraction
            raise FileNotFoundError(f"{message}; that is more than --max_failed_fraction {limit}")
        logger.warning(message)
        absent = set(missing)
        rows = [i for i in rows if table["image_index"][i] not in absent]

    # Grouped by split, each split is one contiguous slice: no index mapping to read through while training.
    rows.sort(key=lambda i: SPLITS.index(splits[i]))
    columns = {name: [values[i] for i in rows] for name, values in table.items()}
    columns["split"] = [splits[i] for i in rows]
    columns["image"] = [found[name] for name in columns["image_index"]]
    dataset = datasets.Dataset.from_dict(columns, features=FEATURES)
    recorded = {
        "resolution": settings.resolution,
        "center_crop": settings.center_crop,
        "validation_fraction": settings.validation_fraction,
        "split_seed": settings.split_seed,
        **({"test_fraction": settings.test_fraction} if method.startswith("patient-ID") else {}),
    }
    key_source = json.dumps([recorded, filters, columns["split"], columns["image_index"]], sort_keys=True)
    report = {
        "source": "NIH ChestX-ray14",
        "metadata_file": csv_path.name,
        "image_folders": folders,
        "metadata_rows": len(table["image_index"]),
        "split_method": method,
        "settings": recorded,
        "filters": filters,
        "selected_images": len(rows) + len(missing),
        "missing_images": len(missing),
        "key": listing_key(columns["image"], key_source),
    }
    return Plan(dataset, report, missing)


def describe(dsdict: Mapping[str, datasets.Dataset]) -> dict[str, dict[str, Any]]:
    """Images, patients and images per view for each split (counts only: nothing identifying)."""
    return {
        name: {
            "images": len(ds),
            "patients": len(set(ds["patient_id"])),
            "views": dict(sorted(Counter(ds["view_position"]).items())),
        }
        for name, ds in dsdict.items()
    }


def prepare_nih(plan: Plan, settings: Any, work_dir: str | Path) -> tuple[datasets.DatasetDict, dict, list]:
    """Decode the planned images once (cached and resumable in `work_dir`) and split them patient-wise.

    Returns the DatasetDict, the completed report and (image name, reason) for every missing or unreadable image.
    """
    started = time.perf_counter()
    prepared, failed = prepare(
        plan.dataset,
        settings.resolution,
        settings.center_crop,
        num_proc=settings.preprocessing_num_workers,
        work_dir=work_dir,
        max_failed_fraction=settings.max_failed_fraction,
    )
    counts = Counter(prepared["split"])
    dsdict, start = datasets.DatasetDict(), 0
    for name in SPLITS:  # the plan grouped the rows by split, in this order
        if counts[name]:
            dsdict[name] = prepared.select(range(start, start + counts[name]))
            start += counts[name]
    check_patient_disjoint(dsdict)
    seconds = time.perf_counter() - started
    report = {
        **plan.report,
        "failed_images": len(failed),
        "prepared_images": len(prepared),
        "splits": describe(dsdict),
        "patient_overlap_between_splits": 0,
        "seconds": round(seconds, 1),
    }
    failures = [(name, "file not found") for name in plan.missing] + failed
    return dsdict, report, failures


def write_report(folder: str | Path, report: dict, failures: Sequence[tuple[str, str]]) -> None:
    """`prepare_report.json` and `failed_images.csv` (image name, reason) into `folder`.

    Each file is replaced in one step, so processes sharing a cache folder never see half a file.
    """
    folder = Path(folder)
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["image", "reason"])
    writer.writerows(failures)
    files = {"prepare_report.json": json.dumps(report, indent=2) + "\n", "failed_images.csv": rows.getvalue()}
    for name, text in files.items():
        temporary = folder / f".{name}.{os.getpid()}"
        temporary.write_text(text)
        os.replace(temporary, folder / name)


def read_report(folder: str | Path) -> dict | None:
    """The report of a complete prepared folder, or None (a folder without one is not a finished preparation)."""
    path = Path(folder) / "prepare_report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def save_prepared(
    dsdict: datasets.DatasetDict,
    folder: str | Path,
    work_dir: str | Path,
    report: dict,
    failures: Sequence[tuple[str, str]],
    extra_files: Mapping[str, str] | None = None,
) -> None:
    """Save with the report (and e.g. a README.md) into `work_dir`, then move it to `folder` in one rename.

    So a folder at `folder` is always complete; the work folder, with its chunk caches, is removed afterwards.
    """
    folder, work_dir = Path(folder), Path(work_dir)
    staging = work_dir / "saving"
    if staging.exists():
        shutil.rmtree(staging)
    dsdict.save_to_disk(str(staging))
    write_report(staging, report, failures)
    for name, text in (extra_files or {}).items():
        (staging / name).write_text(text)
    if folder.exists():
        folder.rename(work_dir / "replaced")
    staging.rename(folder)
    shutil.rmtree(work_dir)
