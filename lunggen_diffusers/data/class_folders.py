"""Class folders (ROOT/CLASS/image, the Kaggle layout of COVID-19 / Viral Pneumonia / Normal radiograph sets): each
class name is a finding label ("Normal" is No Finding), so `--condition_on findings` and `--findings "COVID-19"`
work on them.

Such folders name no patients. Without `patients.csv` (file_name relative to ROOT, patient_id) every image is its
own patient, and a patient with several images can land in train and test: a leak that flatters every test figure.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import datasets

from ..cli import UsageError
from ..utils import list_images
from ..vocabulary import FINDINGS_COLUMN, canonical_finding

logger = logging.getLogger(__name__)

PATIENTS_CSV = "patients.csv"


def is_class_folder_tree(root: str | Path) -> bool:
    """Every image one folder down, in at least two folders, none at the top: ROOT/CLASS/image."""
    root = Path(root)
    files = list_images(root)
    depths = {len(p.relative_to(root).parts) for p in files}
    return bool(files) and depths == {2} and len({p.parent for p in files}) >= 2


def class_folder_dataset(root: str | Path) -> datasets.Dataset:
    """The images with `finding_labels` from their folder's name and a patient per image (from patients.csv when
    present, else the image itself, with one warning line naming the leak)."""
    root = Path(root)
    files = list_images(root)
    patients_csv = root / PATIENTS_CSV
    if patients_csv.is_file():
        with open(patients_csv, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"file_name", "patient_id"} <= set(rows[0]):
            raise UsageError(f"{patients_csv}: needs the columns file_name and patient_id")
        patient_of = {row["file_name"]: row["patient_id"] for row in rows}
        unnamed = [p.relative_to(root).as_posix() for p in files if p.relative_to(root).as_posix() not in patient_of]
        if unnamed:
            raise UsageError(f"{patients_csv} names no patient for {len(unnamed)} image(s); first: {unnamed[0]}")
        patients = [patient_of[p.relative_to(root).as_posix()] for p in files]
    else:
        logger.warning("class folders name no patients: each image is its own patient, so one patient's images may "
                       "land in train and test (a leak that flatters every test figure); add %s (file_name, "
                       "patient_id) to split by patient", PATIENTS_CSV)
        patients = [f"image:{p.relative_to(root).as_posix()}" for p in files]
    classes = sorted({p.parent.name for p in files})
    logger.warning("reading %d class folders as finding labels: %s", len(classes), ", ".join(classes))
    features = datasets.Features({"image": datasets.Image(decode=False), "patient_id": datasets.Value("string"),
                                  FINDINGS_COLUMN: datasets.List(datasets.Value("string"))})
    return datasets.Dataset.from_dict(
        {"image": [str(p) for p in files], "patient_id": patients,
         FINDINGS_COLUMN: [[canonical_finding(p.parent.name, "class_folders")] for p in files]}, features=features)

