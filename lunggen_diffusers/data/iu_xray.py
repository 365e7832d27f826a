"""IU X-ray (Indiana University chest X-ray collection, OpenI), as Kaggle ships it: `indiana_reports.csv` (uid,
MeSH, Problems, image, indication, comparison, findings, impression) and `indiana_projections.csv` (uid, filename,
projection), the PNGs in `images/images_normalized/` (or `images_normalized/`, or beside the tables).

Frontal images only. A report's uid is its patient (the collection has one study per patient); its `Problems`
("normal", or ";"-separated MeSH-like terms) are the finding labels, and its findings and impression sections the
`report` column. The reports are de-identified but remain patient data under the collection's licence: used locally,
never published.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from ..cli import UsageError
from ..utils import find_table, read_table
from ..vocabulary import FINDINGS_COLUMN, canonical_finding
from .reports import REPORT_COLUMN

REPORTS, PROJECTIONS = "indiana_reports.csv", "indiana_projections.csv"
IMAGE_FOLDERS = ("images/images_normalized", "images_normalized", "images", ".")


def is_iu_xray_folder(root: str | Path) -> bool:
    return Path(root).is_dir() and find_table(root, REPORTS) is not None and find_table(root, PROJECTIONS) is not None


def findings(problems: str) -> list[str]:
    names = [canonical_finding(p.strip(), "iu_xray") for p in problems.split(";") if p.strip()]
    return sorted(set(names)) or ["No Finding"]


def iu_xray_dataset(root: str | Path) -> tuple[datasets.Dataset, list[tuple[str, str]]]:
    """The frontal images with patient_id (the uid), finding_labels and report; and (filename, reason) for each
    projection left out."""
    root = Path(root)
    if not is_iu_xray_folder(root):
        raise UsageError(f"--train_data_dir {root}: no {REPORTS} and {PROJECTIONS} (IU X-ray's tables)")
    folder = next((root / f for f in IMAGE_FOLDERS if (root / f).is_dir()), root)
    studies = {row["uid"]: row for row in read_table(find_table(root, REPORTS))}
    columns = {k: [] for k in ("image", "patient_id", FINDINGS_COLUMN, REPORT_COLUMN)}
    left_out = []
    for row in read_table(find_table(root, PROJECTIONS)):
        name, study = row["filename"], studies.get(row["uid"])
        if row["projection"].strip().lower() != "frontal":
            left_out.append((name, f"projection {row['projection'] or 'missing'}"))
        elif study is None:
            left_out.append((name, "uid not in the reports table"))
        elif not (folder / name).is_file():
            left_out.append((name, "file not found"))
        else:
            columns["image"].append(str(folder / name))
            columns["patient_id"].append(f"iu-{row['uid']}")
            columns[FINDINGS_COLUMN].append(findings(study.get("Problems", "")))
            columns[REPORT_COLUMN].append(" ".join(" ".join((study.get(part) or "").split())
                                                   for part in ("findings", "impression")).strip())
    features = datasets.Features({
        "image": datasets.Image(decode=False), "patient_id": datasets.Value("string"),
        FINDINGS_COLUMN: datasets.List(datasets.Value("string")), REPORT_COLUMN: datasets.Value("string")})
    return datasets.Dataset.from_dict(columns, features=features), left_out
