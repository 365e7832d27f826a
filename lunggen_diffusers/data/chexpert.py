"""CheXpert (v1.0 and v1.0-small): `train.csv` / `valid.csv` into the project's columns and vocabulary.

`Path` is relative to the folder above the dataset folder ("CheXpert-v1.0-small/train/patient00001/study1/
view1_frontal.jpg"), the patient is the path's `patientNNNNN` part, observations are coded 1.0 / 0.0 / -1.0
(uncertain) / blank (not mentioned: negative), and `valid.csv` (radiologist-labelled, other patients) is the test
split. Frontal images only: the project's models are frontal, and `--view_position PA|AP` narrows them further.

CheXpert Plus's report table (`df_chexpert_plus_*.csv` in the folder: `path_to_image`, `section_findings`,
`section_impression`) becomes a `report` column (findings, then impression), joined on the image's path from its
`train/` or `valid/` part. A report is patient data under the CheXpert Plus data-use agreement: never published.
"""

from __future__ import annotations

import re
from pathlib import Path

import datasets

from ..cli import UsageError
from ..utils import find_table, read_table, table_columns
from ..vocabulary import FINDINGS_COLUMN, NO_FINDING, canonical_finding
from .reports import REPORT_COLUMN

FILES = {"train.csv": False, "valid.csv": True}  # file -> its rows are the official test split
OBSERVATIONS = ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
                "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
                "Support Devices")
# The CheXpert paper's policies for an uncertain (-1) observation: U-Ones, U-Zeros; "ignore" leaves out every image
# with an uncertain observation (a condition vector has no "unknown" entry to hold one).
UNCERTAIN = ("ones", "zeros", "ignore")
SEX = {"Male": "M", "Female": "F"}
_PATIENT = re.compile(r"(patient\d+)")
_IMAGE_KEY = re.compile(r"((?:train|valid)/patient\d+/study\d+/[^/]+?)(?:\.jpg|\.png)?$")
REPORT_TABLE = "df_chexpert_plus_*.csv"


def _image_key(path: str) -> str | None:
    found = _IMAGE_KEY.search(path.replace("\\", "/"))
    return found.group(1) if found else None


def plus_reports(root: Path) -> dict[str, str]:
    """CheXpert Plus's findings and impression per image (by `_image_key`); empty without its table."""
    table = next(iter(sorted(root.glob(REPORT_TABLE))), None)
    if table is None:
        return {}
    texts = {}
    for row in read_table(table):
        text = " ".join(" ".join((row.get(f"section_{part}") or "").split()) for part in ("findings", "impression"))
        if (key := _image_key(row.get("path_to_image", ""))) and text.strip():
            texts[key] = text.strip()
    return texts


def is_chexpert_folder(root: str | Path) -> bool:
    path = find_table(root, "train.csv")
    return path is not None and {"Path", "Frontal/Lateral", "AP/PA"} <= set(table_columns(path))


def _image_path(root: Path, relative: str) -> Path:
    """`Path` names the dataset folder first; the user's folder may carry another name (a renamed copy)."""
    parts = Path(relative).parts
    return root.joinpath(*parts[1:]) if parts and parts[0].startswith("CheXpert") else root / relative


def findings(row: dict, uncertain: str) -> list[str] | None:
    """The row's findings under the uncertainty policy ([NO_FINDING] when none); None when "ignore" drops it."""
    found = []
    for name in OBSERVATIONS:
        value = row.get(name, "").strip()
        if value == "-1.0" and uncertain == "ignore":
            return None
        if value == "1.0" or (value == "-1.0" and uncertain == "ones"):
            found.append(canonical_finding(name, "chexpert"))
    return sorted(found) or [NO_FINDING]


def chexpert_dataset(root: str | Path, uncertain: str = "ones") -> tuple[datasets.Dataset, list[tuple[str, str]]]:
    """The frontal images of train.csv and valid.csv (`official_test` marks valid.csv's) with patient_id,
    patient_sex, patient_age, view_position and finding_labels; and (path, reason) for each row left out."""
    if uncertain not in UNCERTAIN:
        raise UsageError(f"--uncertain_labels {uncertain!r} is not one of: {', '.join(UNCERTAIN)}")
    root = Path(root)
    columns = {k: [] for k in ("image", "patient_id", "patient_sex", "patient_age", "view_position", FINDINGS_COLUMN,
                               "official_test", REPORT_COLUMN)}
    left_out, reports = [], plus_reports(root)
    for name, is_test in FILES.items():
        path = find_table(root, name)
        if path is None:
            if not is_test:
                raise UsageError(f"--train_data_dir {root}: no train.csv (CheXpert's labels file)")
            continue
        for row in read_table(path):
            if row["Frontal/Lateral"] != "Frontal":
                continue
            labels = findings(row, uncertain)
            if labels is None:
                left_out.append((row["Path"], "uncertain observation (--uncertain_labels ignore)"))
                continue
            image = _image_path(root, row["Path"])
            if not image.is_file():
                left_out.append((row["Path"], "file not found"))
                continue
            patient = _PATIENT.search(row["Path"])
            columns["image"].append(str(image))
            columns["patient_id"].append(patient.group(1) if patient else row["Path"])
            columns["patient_sex"].append(SEX.get(row["Sex"], ""))
            columns["patient_age"].append(float(row["Age"]) if row["Age"].strip() else None)
            columns["view_position"].append(row["AP/PA"].strip())
            columns[FINDINGS_COLUMN].append(labels)
            columns["official_test"].append(is_test)
            columns[REPORT_COLUMN].append(reports.get(_image_key(row["Path"]) or "", ""))
    report = {REPORT_COLUMN: datasets.Value("string")} if reports else {}
    if not reports:
        columns.pop(REPORT_COLUMN)
    features = datasets.Features({
        "image": datasets.Image(decode=False), "patient_id": datasets.Value("string"),
        "patient_sex": datasets.Value("string"), "patient_age": datasets.Value("float32"),
        "view_position": datasets.Value("string"), FINDINGS_COLUMN: datasets.List(datasets.Value("string")),
        "official_test": datasets.Value("bool"), **report})
    return datasets.Dataset.from_dict(columns, features=features), left_out
