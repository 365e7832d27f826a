"""Reading the generic folders a source can be: a folder of images (with datasets' `metadata.csv`, or without),
a folder of DICOM files (with a labels file or without); and the `skipped_files.csv` report of what a reader left
out and why."""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from pathlib import Path

import datasets

from ..cli import UsageError
from ..utils import (
    IMAGE_EXTENSIONS,
    atomic_path,
    is_dicom,
    list_images,
    secret_digests,
    write_json,
)
from ..vocabulary import FINDINGS_COLUMN
from . import dicom

logger = logging.getLogger(__name__)

METADATA_CSV = "metadata.csv"
SKIPPED_CSV = "skipped_files.csv"
PHI_DIGESTS = "phi_digests.json"  # digests of the DICOM headers' identifying values (local; hub/privacy.py reads it)


def image_folder(path: str | Path) -> datasets.Dataset:
    """Every image file below `path` (recursively, sorted), lazily referenced by path.

    With a `metadata.csv` (datasets' imagefolder convention: a `file_name` column of paths relative to `path`), the
    images it lists, with its other columns: `patient_id` enables patient-wise splits, and `finding_labels`
    ("|"-separated), `view_position` and `patient_age` the NIH filters. So CheXpert or MIMIC-CXR-JPG folders work
    given a CSV of file_name and patient_id.
    """
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"--train_data_dir {path}: no such folder")
    if (root / METADATA_CSV).is_file():
        return _listed_folder(root)
    files = [str(p) for p in list_images(root)]
    if not files:
        raise UsageError(f"--train_data_dir {path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    return datasets.Dataset.from_dict(
        {"image": files}, features=datasets.Features({"image": datasets.Image(decode=False)})
    )


def is_dicom_folder(path: str | Path) -> bool:
    """A folder (recursive) whose image files include DICOM files (`dicom_folder` refuses a mixed one)."""
    return Path(path).is_dir() and any(is_dicom(p) for p in list_images(path))


def write_skipped(folder: Path, skipped: list[tuple[str, str]]) -> Path:
    """skipped_files.csv: each file left out and why (paths relative to the source folder; no header value)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SKIPPED_CSV
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "reason"])
        writer.writerows(skipped)
    return path


def report_skipped(source: str | Path, report_dir: Path, kept: int, skipped: list[tuple[str, str]],
                   max_fraction: float, what: str = "images") -> None:
    """Write skipped_files.csv and say how many were skipped and why in one warning line; one error line when
    nothing is left or more than `max_fraction` were skipped."""
    listed = write_skipped(report_dir, skipped)
    total = kept + len(skipped)
    if not kept:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise UsageError(f"--train_data_dir {source}: no usable image among {total} {what}{first}; the list is in "
                         f"{listed}")
    if skipped:
        reasons = Counter(reason.split(" (")[0] for _, reason in skipped)
        summary = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
        if len(skipped) / total > max_fraction:
            raise UsageError(f"--train_data_dir {source}: {len(skipped)} of {total} {what} skipped ({summary}) > "
                             f"--max_failed_fraction {max_fraction}; the list is in {listed}")
        logger.warning("skipped %d of %d %s (%s); the list is in %s", len(skipped), total, what, summary, listed)


def dicom_dataset(path: str | Path, report_dir: Path, labels: dict[str, list[str]] | None = None,
                  key: bytes | None = None) -> datasets.Dataset:
    """A folder of DICOM files as a dataset: the image paths and the kept header columns (patients pseudonymised
    under `key`, default this installation's own: `dicom.pseudonym_key`), and with `labels` (file name without
    suffix -> finding names) a `finding_labels` column. The files that are no usable radiograph, or that `labels`
    does not name, are listed in report_dir/skipped_files.csv and counted in one warning line."""
    phi = set()
    paths, columns, skipped = dicom.dicom_folder(path, key if key is not None else dicom.pseudonym_key(), phi)
    report_dir.mkdir(parents=True, exist_ok=True)
    write_json(report_dir / PHI_DIGESTS, secret_digests(phi))
    if labels is not None:
        keep = [i for i, p in enumerate(paths) if Path(p).stem in labels]
        skipped += [(str(Path(paths[i]).relative_to(path)), "not in the labels file")
                    for i in sorted(set(range(len(paths))) - set(keep))]
        paths, columns = [paths[i] for i in keep], {k: [v[i] for i in keep] for k, v in columns.items()}
        columns[FINDINGS_COLUMN] = [labels[Path(p).stem] for p in paths]
    report_skipped(path, report_dir, len(paths), skipped, 1.0, "DICOM files")
    if not all(columns["patient_id"]):
        logger.warning("%d of %d DICOM images have no Patient ID: each is its own patient, so the split is image-wise "
                       "for them (a patient's images may land in two splits)",
                       columns["patient_id"].count(""), len(paths))
        columns["patient_id"] = [p or f"dicom-image-{i}" for i, p in enumerate(columns["patient_id"])]
    features = {"image": datasets.Image(decode=False), "patient_age": datasets.Value("float32"),
                **{name: datasets.Value("string") for name in ("patient_id", "patient_sex", "view_position")}}
    if labels is not None:
        features[FINDINGS_COLUMN] = datasets.List(datasets.Value("string"))
    return datasets.Dataset.from_dict({"image": paths, **columns}, features=datasets.Features(features))


def _listed_folder(root: Path) -> datasets.Dataset:
    with open(root / METADATA_CSV, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "file_name" not in rows[0]:
        raise UsageError(f"{root / METADATA_CSV}: needs a file_name column (image paths relative to the folder)")
    files = [str(root / row["file_name"]) for row in rows]
    missing = [row["file_name"] for row, file in zip(rows, files, strict=True) if not os.path.isfile(file)]
    if missing:
        raise UsageError(
            f"{len(missing)} of {len(rows)} images listed in {METADATA_CSV} are not under {root}; "
            f"first: {', '.join(missing[:5])}"
        )
    columns, features = {"image": files}, {"image": datasets.Image(decode=False)}
    for name in rows[0]:
        values = [row[name].strip() for row in rows]
        if name == "finding_labels":
            columns[name] = [v.split("|") if v else [] for v in values]
            features[name] = datasets.List(datasets.Value("string"))
        elif name == "patient_age":
            columns[name], features[name] = [int(float(v)) if v else None for v in values], datasets.Value("int32")
        elif name != "file_name":
            columns[name], features[name] = values, datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))
