"""PadChest: `PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz)` into the project's columns and vocabulary.

Images are 16-bit PNGs in numbered folders (`ImageDir/ImageID`), decoded by their real value range like every
16-bit source. Labels are a Python-list string of finding names from the Spanish reports; those the vocabulary
knows map to its names ("normal" is No Finding), the others are kept as they are and reported once.
"""

from __future__ import annotations

import ast
import logging
from collections import Counter
from pathlib import Path

import datasets

from ..utils import read_table
from ..vocabulary import (
    FINDINGS,
    FINDINGS_COLUMN,
    NO_FINDING,
    canonical_finding,
    is_no_finding,
    normalize,
)
from .reports import REPORT_COLUMN

logger = logging.getLogger(__name__)

PATTERN = "PADCHEST_chest_x_ray_images_labels_160K*.csv*"
# Projection -> the project's view_position; other projections (COSTAL, EXCLUDE, UNK) are left out.
PROJECTIONS = {"PA": "PA", "AP": "AP", "AP_horizontal": "AP", "L": "LL"}
_KNOWN = {normalize(name) for name in FINDINGS}


def labels_file(root: str | Path) -> Path | None:
    return next(iter(sorted(Path(root).glob(PATTERN))), None)


def is_padchest_folder(root: str | Path) -> bool:
    return Path(root).is_dir() and labels_file(root) is not None


def findings(cell: str) -> list[str] | None:
    """A `Labels` cell -> canonical finding names ([NO_FINDING] for "normal" or none); None when unparsable."""
    try:
        names = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(names, list):
        return None
    found = {canonical_finding(str(n).strip(), "padchest") for n in names if str(n).strip()}
    return sorted(n for n in found if not is_no_finding(n)) or [NO_FINDING]


def _age(row: dict) -> float | None:
    try:
        return float(row["StudyDate_DICOM"][:4]) - float(row["PatientBirth"])
    except (ValueError, TypeError, KeyError):
        return None


def padchest_dataset(root: str | Path) -> tuple[datasets.Dataset, list[tuple[str, str]]]:
    """Every image with a known projection and parsable labels, with patient_id, patient_sex, patient_age,
    view_position and finding_labels; and (ImageDir/ImageID, reason) for each row left out."""
    root = Path(root)
    columns = {k: [] for k in ("image", "patient_id", "patient_sex", "patient_age", "view_position", FINDINGS_COLUMN,
                               REPORT_COLUMN)}
    left_out, unmapped = [], Counter()
    rows = read_table(labels_file(root))
    has_reports = bool(rows) and "Report" in rows[0]
    for row in rows:
        name = f"{row['ImageDir']}/{row['ImageID']}"
        view = PROJECTIONS.get(row["Projection"])
        labels = findings(row["Labels"])
        if view is None:
            left_out.append((name, f"projection {row['Projection']}"))
        elif labels is None:
            left_out.append((name, "labels not readable"))
        elif not (root / name).is_file():
            left_out.append((name, "file not found"))
        else:
            columns["image"].append(str(root / name))
            columns["patient_id"].append(row["PatientID"])
            columns["patient_sex"].append(row["PatientSex_DICOM"] if row["PatientSex_DICOM"] in ("M", "F") else "")
            columns["patient_age"].append(_age(row))
            columns["view_position"].append(view)
            columns[FINDINGS_COLUMN].append(labels)
            columns[REPORT_COLUMN].append(" ".join((row.get("Report") or "").split()))
            unmapped.update(n for n in labels if normalize(n) not in _KNOWN and n != NO_FINDING)
    if unmapped:
        logger.warning("%d PadChest finding names have no canonical name and are kept as they are (most frequent: "
                       "%s)", len(unmapped), ", ".join(f"{n} {c}" for n, c in unmapped.most_common(5)))
    features = datasets.Features({
        "image": datasets.Image(decode=False), "patient_id": datasets.Value("string"),
        "patient_sex": datasets.Value("string"), "patient_age": datasets.Value("float32"),
        "view_position": datasets.Value("string"), FINDINGS_COLUMN: datasets.List(datasets.Value("string")),
        **({REPORT_COLUMN: datasets.Value("string")} if has_reports else {})})
    if not has_reports:
        columns.pop(REPORT_COLUMN)
    return datasets.Dataset.from_dict(columns, features=features), left_out
