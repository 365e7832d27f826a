"""A prepared dataset on disk, whatever its source: the folder `prepare` writes (the splits as a saved DatasetDict,
`prepare_report.json`, `failed_images.csv` and a dataset card), written in one rename so a folder there is always
complete, and the counts that describe its splits."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from ..utils import atomic_write_text


def describe(dsdict: Mapping[str, datasets.Dataset]) -> dict[str, dict[str, Any]]:
    """Images, patients and images per view for each split (counts only: nothing identifying)."""
    return {
        name: {
            "images": len(ds),
            "patients": len(set(ds["patient_id"])),
            "views": dict(sorted(Counter(ds["view_position"]).items())) if "view_position" in ds.column_names else {},
        }
        for name, ds in dsdict.items()
    }


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
        atomic_write_text(folder / name, text)


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
