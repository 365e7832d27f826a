"""MIMIC-CXR-JPG: `files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg` with PhysioNet's metadata, label and split files.

- `mimic-cxr-2.0.0-metadata.csv(.gz)`: one row per image (dicom_id, subject_id, study_id, ViewPosition, ...);
- `mimic-cxr-2.0.0-chexpert.csv(.gz)` (or `-negbio`): one row per study, CheXpert's 14 observations coded as in
  CheXpert (`--uncertain_labels` applies), joined onto every image of the study;
- `mimic-cxr-2.0.0-split.csv(.gz)`: the official train / validate / test split by subject, kept as it is.
Frontal images only (PA, AP), as for CheXpert.

The free-text reports (PhysioNet's `mimic-cxr-reports.zip`, extracted into the same folder: `files/pXX/pSUBJECT/
sSTUDY.txt` beside each study's folder) become a `report` column, their FINDINGS and IMPRESSION sections, when any is
there. A report is patient data under the MIMIC-CXR data-use agreement: used locally, never published.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from ..cli import UsageError
from ..utils import find_table, read_table
from ..vocabulary import FINDINGS_COLUMN
from .chexpert import findings
from .reports import REPORT_COLUMN, report_sections

PREFIX = "mimic-cxr-2.0.0-"
METADATA, SPLIT, LABELERS = "metadata", "split", ("chexpert", "negbio")
FRONTAL = ("PA", "AP")
SPLIT_NAMES = {"train": "train", "validate": "validation", "test": "test"}


def _find(root: Path, part: str) -> Path | None:
    return find_table(root, f"{PREFIX}{part}.csv")


def _report(root: Path, subject: str, study: str) -> str:
    path = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
    return report_sections(path.read_text(errors="replace")) if path.is_file() else ""


def is_mimic_folder(root: str | Path) -> bool:
    return Path(root).is_dir() and _find(Path(root), METADATA) is not None


def mimic_dataset(root: str | Path, uncertain: str = "ones") -> tuple[datasets.Dataset, list[tuple[str, str]]]:
    """The frontal images with patient_id (the subject), view_position, finding_labels (their study's) and
    official_split; and (image path relative to root, reason) for each image left out."""
    root = Path(root)
    labels_path = next((path for part in LABELERS if (path := _find(root, part))), None)
    for what, path in (("labels", labels_path), ("split", _find(root, SPLIT))):
        if path is None:
            wanted = " or ".join(f"{PREFIX}{p}.csv(.gz)" for p in (LABELERS if what == "labels" else (SPLIT,)))
            raise UsageError(f"--train_data_dir {root}: no {wanted} (MIMIC-CXR-JPG's {what} file)")
    studies = {(r["subject_id"], r["study_id"]): r for r in read_table(labels_path)}
    split_of = {r["dicom_id"]: SPLIT_NAMES.get(r["split"], r["split"]) for r in read_table(_find(root, SPLIT))}
    columns = {k: [] for k in ("image", "patient_id", "view_position", FINDINGS_COLUMN, "official_split",
                                REPORT_COLUMN)}
    left_out = []
    for row in read_table(_find(root, METADATA)):
        subject, study, image_id = row["subject_id"], row["study_id"], row["dicom_id"]
        name = f"files/p{subject[:2]}/p{subject}/s{study}/{image_id}.jpg"
        view = row.get("ViewPosition", "").strip()
        study_row = studies.get((subject, study))
        labels = findings(study_row, uncertain) if study_row else None
        if view not in FRONTAL:
            left_out.append((name, f"view {view or 'missing'}"))
        elif study_row is None:
            left_out.append((name, "study not in the labels file"))
        elif labels is None:
            left_out.append((name, "uncertain observation (--uncertain_labels ignore)"))
        elif image_id not in split_of:
            left_out.append((name, "not in the split file"))
        elif not (root / name).is_file():
            left_out.append((name, "file not found"))
        else:
            columns["image"].append(str(root / name))
            columns["patient_id"].append(subject)
            columns["view_position"].append(view)
            columns[FINDINGS_COLUMN].append(labels)
            columns["official_split"].append(split_of[image_id])
            columns[REPORT_COLUMN].append(_report(root, subject, study))
    report = {REPORT_COLUMN: datasets.Value("string")} if any(columns[REPORT_COLUMN]) else {}
    if not report:
        columns.pop(REPORT_COLUMN)
    features = datasets.Features({
        "image": datasets.Image(decode=False), "patient_id": datasets.Value("string"),
        "view_position": datasets.Value("string"), FINDINGS_COLUMN: datasets.List(datasets.Value("string")),
        "official_split": datasets.Value("string"), **report})
    return datasets.Dataset.from_dict(columns, features=features), left_out
