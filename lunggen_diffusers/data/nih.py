"""NIH ChestX-ray14: folder layout, metadata, the plan of what to decode, and the saved, reported result.

The result is a `datasets.DatasetDict` (train / validation / test) of grayscale PNGs (`image`) plus the metadata columns
`image_index, patient_id, finding_labels, view_position, patient_age, patient_sex, follow_up, split`. Splits and
filters (`splits.py`) run on the metadata before anything is decoded (`decode.py`).
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import datasets

from ..cli import UsageError
from ..utils import files_fingerprint
from .decode import FORMAT_VERSION, decode_images
from .prepared import describe
from .splits import (
    SPLITS,
    TEST_LIST,
    TRAIN_VAL_LIST,
    active_filters,
    assign_splits,
    check_patient_disjoint,
    select_rows,
)

logger = logging.getLogger(__name__)

METADATA_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # preferred first; either may be gzipped
_CSV_COLUMNS = {
    "image_index": "Image Index",
    "finding_labels": "Finding Labels",
    "follow_up": "Follow-up #",
    "patient_id": "Patient ID",
    "patient_age": "Patient Age",
    "patient_sex": "Patient Gender",
    "view_position": "View Position",
}
# NIH ships the images as 12 archives of consecutive runs of the sorted Image Index: 4,999 images, ten of 10,000,
# then 7,121 (112,120; checked against Data_Entry_2017_v2020.csv: the first ends at 00001335_006.png).
ARCHIVES = tuple(f"images_{i:03d}" for i in range(1, 13))
ARCHIVE_SIZES = (4_999, *(10_000,) * 10, 7_121)
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


def _metadata_path(nih_dir: str | Path) -> Path | None:
    root = Path(nih_dir)
    found = [c for name in METADATA_FILES for c in (root / name, root / f"{name}.gz") if c.is_file()]
    return found[0] if found else None


def find_metadata(nih_dir: str | Path) -> Path:
    path = _metadata_path(nih_dir)
    if path is None:
        raise UsageError(f"{nih_dir}: no NIH metadata file ({' or '.join(METADATA_FILES)}, optionally .gz) in this "
                         "folder")
    return path


def is_nih_folder(path: str | Path) -> bool:
    return _metadata_path(path) is not None


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
            raise UsageError(f"{path.name}: missing column(s) {', '.join(absent)}; is this the NIH Data_Entry CSV?")
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
                raise UsageError(f"{path.name} line {line}: cannot parse {row[:7]} ({exc})") from None
    if not table["image_index"]:
        raise UsageError(f"{path.name}: no rows")
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


def archive_ranges(names: Sequence[str]) -> dict[str, tuple[str, str]] | None:
    """{archive: (first, last image name)} as NIH published them, when `names` is the whole release; else None."""
    if len(names) != sum(ARCHIVE_SIZES):
        return None
    ordered = sorted(names)
    ends = itertools.accumulate(ARCHIVE_SIZES)
    return {a: (ordered[end - size], ordered[end - 1])
            for a, size, end in zip(ARCHIVES, ARCHIVE_SIZES, ends, strict=True)}


def sort_missing(
    names: Sequence[str], missing: Sequence[str], found: Mapping[str, str], nih_dir: str | Path
) -> tuple[list[str], list[str], list[str]]:
    """(missing inside an archive folder that is present, missing with their whole archive, the absent archives).

    A present archive spans its published range (whole-release metadata) or else the names of its files found;
    an image outside every present archive's span belongs to one not downloaded. Without archive folders (one
    flattened folder) nothing is known to be absent: every missing image is a failure.
    """
    held = defaultdict(list)
    for name, path in found.items():
        top = Path(path).relative_to(nih_dir).parts[0]
        if top in ARCHIVES:
            held[top].append(name)
    if not held:
        return list(missing), [], []
    published = archive_ranges(names)
    spans = [published[a] if published else (min(held[a]), max(held[a])) for a in held]
    inside = [m for m in missing if any(first <= m <= last for first, last in spans)]
    kept = set(inside)
    return inside, [m for m in missing if m not in kept], [a for a in ARCHIVES if a not in held]


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
        raise UsageError(f"--nih_dir {nih_dir}: no such folder")
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
        raise UsageError(f"no image of {csv_path.name} is in {TEST_LIST} or {TRAIN_VAL_LIST}")

    found, folders = find_images(root)
    if not found:
        raise UsageError(f"{nih_dir}: no PNG files (looked in ., images/, images_*/ and images_*/images/)")
    missing = [table["image_index"][i] for i in rows if table["image_index"][i] not in found]
    selected = len(rows)
    missing, elsewhere, absent_archives = sort_missing(table["image_index"], missing, found, root)
    if elsewhere:
        logger.warning(
            f"found {selected - len(elsewhere) - len(missing):,} of {selected:,} images named in {csv_path.name}: "
            f"archive folder(s) {', '.join(absent_archives)} absent ({len(elsewhere):,} images); preparing the "
            "images present, the splits restricted to them"
        )
    expected = selected - len(elsewhere)
    if missing:
        fraction = len(missing) / expected
        message = (
            f"{len(missing)} of {expected} images named in {csv_path.name} are not under {nih_dir} "
            f"(looked in {', '.join(folders)}); first: {', '.join(missing[:5])}"
        )
        if fraction > settings.max_failed_fraction:
            limit = settings.max_failed_fraction
            raise UsageError(f"{message}; that is more than --max_failed_fraction {limit}")
        logger.warning(message)
    if missing or elsewhere:
        absent = set(missing) | set(elsewhere)
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
    key_source = json.dumps(
        [FORMAT_VERSION, recorded, filters, columns["split"], columns["image_index"]], sort_keys=True
    )
    report = {
        "source": "NIH ChestX-ray14",
        "metadata_file": csv_path.name,
        "image_folders": folders,
        "metadata_rows": len(table["image_index"]),
        "split_method": method,
        "settings": recorded,
        "filters": filters,
        "selected_images": selected,
        "missing_images": len(missing),
        "absent_archives": absent_archives if elsewhere else [],
        "images_in_absent_archives": len(elsewhere),
        "key": files_fingerprint(columns["image"], key_source),
    }
    return Plan(dataset, report, missing)


def decode_splits(plan: Plan, settings: Any, work_dir: str | Path) -> tuple[datasets.DatasetDict, dict, list]:
    """Decode the planned images once (cached and resumable in `work_dir`) and split them patient-wise.

    Returns the DatasetDict, the completed report and (image name, reason) for every missing or unreadable image.
    """
    started = time.perf_counter()
    prepared, failed = decode_images(
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
