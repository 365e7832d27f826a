"""The source registry: what each folder can be (`SOURCES`, in the order they are looked for), how a folder is
recognised (`detect_source`, or `--source` to force one), and which reader reads it (`folder_source`)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import datasets

from ..cli import UsageError
from ..utils import IMAGE_EXTENSIONS, list_images
from . import chexpert, class_folders, dicom, dicom_collections, iu_xray, mimic, nih, padchest
from .folders import (
    METADATA_CSV,
    dicom_dataset,
    image_folder,
    is_dicom_folder,
    report_skipped,
)


def cache_root(d) -> Path:
    """Where prepared data of the DataConfig `d` (or any object with its cache_dir) is cached: `--cache_dir`, else
    under datasets' cache."""
    return Path(d.cache_dir or os.path.join(datasets.config.HF_DATASETS_CACHE, "lunggen_prepared"))


def folder_key(path: str) -> str:
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]


def _has_images(path) -> bool:
    return any(True for _ in list_images(path))


def _plain_folder(path) -> bool:
    return not (Path(path) / METADATA_CSV).is_file() and class_folders.is_class_folder_tree(path)


# Each source a folder can be, in the order they are looked for: (how it is recognised, what that looks for, what
# the run's records call it). Label files are looked for before the recursive listing of a folder's images. NIH
# ChestX-ray14 comes first of all (`load_source`), with its own preparation.
SOURCES = {
    "nih": (nih.is_nih_folder, "Data_Entry_2017_v2020.csv or Data_Entry_2017.csv", "the NIH ChestX-ray14 dataset"),
    "mimic": (mimic.is_mimic_folder, "mimic-cxr-2.0.0-metadata.csv(.gz)", "the MIMIC-CXR-JPG dataset"),
    "padchest": (padchest.is_padchest_folder, f"{padchest.PATTERN}", "the PadChest dataset"),
    "chexpert": (chexpert.is_chexpert_folder, "train.csv with Path, Frontal/Lateral and AP/PA columns",
                 "the CheXpert dataset"),
    "iu_xray": (iu_xray.is_iu_xray_folder, f"{iu_xray.REPORTS} and {iu_xray.PROJECTIONS}",
                "the IU X-ray (OpenI) collection"),
    "vindr": (lambda p: dicom_collections.is_vindr_folder(p) and is_dicom_folder(p),
              "DICOM files with train.csv (image_id, class_name, rad_id) or image_labels_train.csv",
              "the VinDr-CXR dataset"),
    "rsna": (lambda p: dicom_collections.is_rsna_folder(p) and is_dicom_folder(p),
             "DICOM files with stage_2_train_labels.csv(.gz)", "the RSNA Pneumonia Detection Challenge data"),
    "dicom": (is_dicom_folder, "DICOM files (.dcm, .dicom, or a file with the DICM mark)", "a local DICOM folder"),
    "class_folders": (_plain_folder, "images one folder down, in two or more folders, and no metadata.csv",
                      "a local folder of image classes"),
    "image_folder": (_has_images, f"image files ({', '.join(IMAGE_EXTENSIONS)})", "a local image folder"),
}


# Sources known by the shape of a folder alone, not by a collection's label file: the folder one level above an
# unzipped collection (`/data/chexpert` holding `CheXpert-v1.0-small/`) has that shape too.
GENERIC = ("dicom", "class_folders", "image_folder")


def collection_below(root: str | Path) -> tuple[str, str] | None:
    """(subfolder, source) of the first named collection one folder down, or None."""
    for sub in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        for name, (found, _, _) in SOURCES.items():
            if name in GENERIC:
                break
            if found(sub):
                return str(sub), name
    return None


def root_of(d, root: str | None) -> str:
    """The folder a per-folder step works on: `root`, else the DataConfig's one --train_data_dir."""
    if root is not None:
        return root
    if len(d.train_data_dir) != 1:
        raise UsageError(f"give one --train_data_dir here (got {len(d.train_data_dir)})")
    return d.train_data_dir[0]


def detect_source(d, root: str | None = None) -> str:
    """The source a folder holds (`root`, else the DataConfig `d`'s one --train_data_dir): `d.source` when set
    (checked), else the first of SOURCES that matches."""
    root = root_of(d, root)
    if not Path(root).is_dir():
        raise UsageError(f"--train_data_dir {root}: no such folder")
    if d.source != "auto":
        found, wanted, _ = SOURCES[d.source]
        if d.source in GENERIC or not found(root):
            _refuse_the_folder_above(root)
        if not found(root):
            raise UsageError(f"--source {d.source}: {root} holds no {wanted}")
        return d.source
    name = next((name for name, (found, _, _) in SOURCES.items() if found(root)), None)
    if name is None or name in GENERIC:
        _refuse_the_folder_above(root)
    if name is None:
        looked_for = "; ".join(f"{name}: {wanted}" for name, (_, wanted, _) in SOURCES.items())
        raise UsageError(f"--train_data_dir {root}: no source recognised (looked for {looked_for})")
    return name


def _refuse_the_folder_above(root: str) -> None:
    """Read as a plain folder, a collection's parent would train on its images without their patients or labels."""
    below = collection_below(root)
    if below is not None:
        raise UsageError(f"--train_data_dir {root} holds {SOURCES[below[1]][2]} one folder down: pass "
                         f"--train_data_dir {below[0]}")


def folder_source(d, root: str | None = None) -> tuple[datasets.Dataset, str]:
    """A folder other than NIH's (`root`, else the DataConfig `d`'s one --train_data_dir), whole and unprepared, as
    SOURCES recognises it (or `--source` says), and what the run's records call it. Files left out are listed in the
    cache (source_report_dir(d, root)/skipped_files.csv) and counted in one warning line."""
    root = root_of(d, root)
    name, report_dir = detect_source(d, root), source_report_dir(d, root)
    readers = {"mimic": lambda: mimic.mimic_dataset(root, d.uncertain_labels),
               "padchest": lambda: padchest.padchest_dataset(root),
               "chexpert": lambda: chexpert.chexpert_dataset(root, d.uncertain_labels),
               "iu_xray": lambda: iu_xray.iu_xray_dataset(root)}
    if name in readers:
        ds, left_out = readers[name]()
        report_skipped(root, report_dir, len(ds), left_out, d.max_failed_fraction)
    elif name in ("vindr", "rsna", "dicom"):
        labels = {"vindr": lambda: dicom_collections.vindr_labels(root, d.vindr_label_rule),
                  "rsna": lambda: dicom_collections.rsna_labels(root), "dicom": lambda: None}[name]()
        ds = dicom_dataset(root, report_dir, labels, dicom.pseudonym_key(d.pseudonym_key))
    elif name == "class_folders":
        ds = class_folders.class_folder_dataset(root)
    elif name == "image_folder":
        ds = image_folder(root)
    else:
        raise UsageError(f"--source {name}: an NIH folder is prepared with --nih_dir (or trained on directly)")
    return ds, SOURCES[name][2]


def source_report_dir(d, root: str | None = None) -> Path:
    """The cache folder of a source folder's skipped_files.csv (and a DICOM folder's phi_digests.json); `d`: a
    DataConfig, or any object with its cache_dir."""
    return cache_root(d) / f"source-{folder_key(root_of(d, root))}"
