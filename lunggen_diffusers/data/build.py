"""One entry: `build_dataset(config)` -> a `datasets.Dataset` of prepared training images and its summary.

Every source (built-in phantom, NIH folder, any image folder, Hub id or `save_to_disk` folder) goes through the same
one-time decode pass (`decode.py`): decode, any mode -> L, square, antialiased resize, stored as an `image` column of
8-bit grayscale PNGs at the training resolution. That pass is cached, so training decodes small PNGs (in the
DataLoader workers) instead of resizing full-size radiographs every epoch. Scaling to [-1, 1] happens on the
training device. NIH folders live in `nih.py`, splits and filters in `splits.py`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path

import datasets

from ..config import Config, phantom_finding_scales
from ..summaries import DataSummary
from ..utils import IMAGE_EXTENSIONS, atomic_path, is_dicom, list_images, secret_digests, write_json
from ..vocabulary import FINDINGS_COLUMN, SUBGROUP_COLUMNS, subgroup_columns
from . import chexpert, class_folders, dicom, dicom_collections, mimic, nih, padchest
from .decode import decode_images, prepared_resolution
from .phantom import phantom_dataset
from .splits import filter_dataset, split_by_patient

logger = logging.getLogger(__name__)

METADATA_CSV = "metadata.csv"
SKIPPED_CSV = "skipped_files.csv"
PHI_DIGESTS = "phi_digests.json"  # digests of the DICOM headers' identifying values (local; hub/privacy.py reads it)


def _cache_dir(config: Config) -> Path:
    root = cache_root(config.data)
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_root(d) -> Path:
    """Where prepared data of the DataConfig `d` (or any object with its cache_dir) is cached: `--cache_dir`, else
    under datasets' cache."""
    return Path(d.cache_dir or os.path.join(datasets.config.HF_DATASETS_CACHE, "lunggen_prepared"))


def image_folder(path: str | Path) -> datasets.Dataset:
    """Every image file below `path` (recursively, sorted), lazily referenced by path.

    With a `metadata.csv` (datasets' imagefolder convention: a `file_name` column of paths relative to `path`), the
    images it lists, with its other columns: `patient_id` enables patient-wise splits, and `finding_labels`
    ("|"-separated), `view_position` and `patient_age` the NIH filters. So CheXpert or MIMIC-CXR-JPG folders work
    given a CSV of file_name and patient_id.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"--train_data_dir {path}: no such folder")
    if (root / METADATA_CSV).is_file():
        return _listed_folder(root)
    files = [str(p) for p in list_images(root)]
    if not files:
        raise ValueError(f"--train_data_dir {path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
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
        raise ValueError(f"--train_data_dir {source}: no usable image among {total} {what}{first}; the list is in "
                         f"{listed}")
    if skipped:
        reasons = Counter(reason.split(" (")[0] for _, reason in skipped)
        summary = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
        if len(skipped) / total > max_fraction:
            raise ValueError(f"--train_data_dir {source}: {len(skipped)} of {total} {what} skipped ({summary}) > "
                             f"--max_failed_fraction {max_fraction}; the list is in {listed}")
        logger.warning("skipped %d of %d %s (%s); the list is in %s", len(skipped), total, what, summary, listed)


def dicom_dataset(path: str | Path, report_dir: Path, labels: dict[str, list[str]] | None = None) -> datasets.Dataset:
    """A folder of DICOM files as a dataset: the image paths and the kept header columns, and with `labels` (file
    name without suffix -> finding names) a `finding_labels` column. The files that are no usable radiograph, or
    that `labels` does not name, are listed in report_dir/skipped_files.csv and counted in one warning line."""
    phi = set()
    paths, columns, skipped = dicom.dicom_folder(path, phi)
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
        raise ValueError(f"{root / METADATA_CSV}: needs a file_name column (image paths relative to the folder)")
    files = [str(root / row["file_name"]) for row in rows]
    missing = [row["file_name"] for row, file in zip(rows, files) if not os.path.isfile(file)]
    if missing:
        raise FileNotFoundError(
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


def _folder_key(path: str) -> str:
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]


def _nih_split(config: Config, root: str) -> datasets.Dataset:
    """One split of an NIH folder, prepared on first use into the cache (only there: the main process comes first)."""
    d = config.data
    work_dir = _cache_dir(config) / f"nih-{_folder_key(root)}"
    dsdict, report, failures = nih.decode_splits(nih.plan_nih(root, d), d, work_dir)
    nih.write_report(work_dir, report, failures)
    if d.split not in dsdict:
        raise ValueError(f"--split {d.split!r}: the NIH folder has no such split (has: {', '.join(dsdict)})")
    logger.info("NIH ChestX-ray14 prepared in %s: %s", work_dir, json.dumps(report["splits"]))
    return dsdict[d.split]


def _has_images(path) -> bool:
    return any(True for _ in list_images(path))


def _plain_folder(path) -> bool:
    return not (Path(path) / METADATA_CSV).is_file() and class_folders.is_class_folder_tree(path)


# Each source a folder can be, in the order they are looked for: (how it is recognised, what that looks for, what
# the run's records call it). Label files are looked for before the recursive listing of a folder's images. NIH ChestX-ray14 comes first of all (`load_source`), with its own preparation.
SOURCES = {
    "nih": (nih.is_nih_folder, "Data_Entry_2017_v2020.csv or Data_Entry_2017.csv", "the NIH ChestX-ray14 dataset"),
    "mimic": (mimic.is_mimic_folder, "mimic-cxr-2.0.0-metadata.csv(.gz)", "the MIMIC-CXR-JPG dataset"),
    "padchest": (padchest.is_padchest_folder, f"{padchest.PATTERN}", "the PadChest dataset"),
    "chexpert": (chexpert.is_chexpert_folder, "train.csv with Path, Frontal/Lateral and AP/PA columns",
                 "the CheXpert dataset"),
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


def _root(d, root: str | None) -> str:
    """The folder a per-folder step works on: `root`, else the DataConfig's one --train_data_dir."""
    if root is not None:
        return root
    if len(d.train_data_dir) != 1:
        raise ValueError(f"give one --train_data_dir here (got {len(d.train_data_dir)})")
    return d.train_data_dir[0]


def detect_source(d, root: str | None = None) -> str:
    """The source a folder holds (`root`, else the DataConfig `d`'s one --train_data_dir): `d.source` when set
    (checked), else the first of SOURCES that matches."""
    root = _root(d, root)
    if not Path(root).is_dir():
        raise FileNotFoundError(f"--train_data_dir {root}: no such folder")
    if d.source != "auto":
        found, wanted, _ = SOURCES[d.source]
        if not found(root):
            raise ValueError(f"--source {d.source}: {root} holds no {wanted}")
        return d.source
    for name, (found, _, _) in SOURCES.items():
        if found(root):
            return name
    looked_for = "; ".join(f"{name}: {wanted}" for name, (_, wanted, _) in SOURCES.items())
    raise ValueError(f"--train_data_dir {root}: no source recognised (looked for {looked_for})")


def folder_source(d, root: str | None = None) -> tuple[datasets.Dataset, str]:
    """A folder other than NIH's (`root`, else the DataConfig `d`'s one --train_data_dir), whole and unprepared, as
    SOURCES recognises it (or `--source` says), and what the run's records call it. Files left out are listed in the
    cache (source_report_dir(d, root)/skipped_files.csv) and counted in one warning line."""
    root = _root(d, root)
    name, report_dir = detect_source(d, root), source_report_dir(d, root)
    readers = {"mimic": lambda: mimic.mimic_dataset(root, d.uncertain_labels),
               "padchest": lambda: padchest.padchest_dataset(root),
               "chexpert": lambda: chexpert.chexpert_dataset(root, d.uncertain_labels)}
    if name in readers:
        ds, left_out = readers[name]()
        report_skipped(root, report_dir, len(ds), left_out, d.max_failed_fraction)
    elif name in ("vindr", "rsna", "dicom"):
        labels = {"vindr": lambda: dicom_collections.vindr_labels(root, d.vindr_label_rule),
                  "rsna": lambda: dicom_collections.rsna_labels(root), "dicom": lambda: None}[name]()
        ds = dicom_dataset(root, report_dir, labels)
    elif name == "class_folders":
        ds = class_folders.class_folder_dataset(root)
    elif name == "image_folder":
        ds = image_folder(root)
    else:
        raise ValueError(f"--source {name}: an NIH folder is prepared with --nih_dir (or trained on directly)")
    return ds, SOURCES[name][2]


def source_report_dir(d, root: str | None = None) -> Path:
    """The cache folder of a source folder's skipped_files.csv (and a DICOM folder's phi_digests.json); `d`: a
    DataConfig, or any object with its cache_dir."""
    return cache_root(d) / f"source-{_folder_key(_root(d, root))}"


def load_source(config: Config, root: str | None = None) -> tuple[datasets.Dataset, str]:
    """The training split, filtered, and a short, non-identifying description of where it came from; `root` is the
    --train_data_dir folder to read (default: the config's one).

    Unprepared except for an NIH folder, which comes back prepared (and cached) at the configured resolution.
    """
    d = config.data
    if d.dataset_name:
        name, _, split = d.dataset_name.partition(":")
        split = split or d.split
        if Path(name).exists():
            loaded = datasets.load_from_disk(name)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"--dataset_name {name}: no split {split!r} (has: {', '.join(loaded)})")
                loaded = loaded[split]
            return filter_dataset(loaded, d), "a local `save_to_disk` dataset"
        loaded = datasets.load_dataset(name, d.dataset_config_name, split=split)
        return filter_dataset(loaded, d), f"the Hub dataset {name}"
    if d.train_data_dir:
        root = _root(d, root)
        if d.source == "nih" or (d.source == "auto" and nih.is_nih_folder(root)):
            return _nih_split(config, root), SOURCES["nih"][2]
        ds, source = folder_source(d, root)
        if "patient_id" in ds.column_names:
            ds = split_by_patient(ds, d)
        return filter_dataset(ds, d), source
    ds = phantom_dataset(
        d.num_phantom_images, d.resolution, seed=config.training.seed, finding_prob=d.phantom_finding_prob,
        finding_prob_scale=phantom_finding_scales(d.phantom_finding_scale),
    )
    return filter_dataset(ds, d), "the built-in procedural chest phantom"


def summarize(dataset: datasets.Dataset, source: str, split: str) -> DataSummary:
    plain = dataset.with_format(None)
    id_column = next((c for c in ("image_index", "patient_id") if c in plain.column_names), None)
    ids = sorted(map(str, plain[id_column])) if id_column else []
    present = [c for c in SUBGROUP_COLUMNS if c in plain.column_names]
    groups = subgroup_columns(plain.select_columns(present).to_dict()) if present else {}
    demographics = {g: {v or "unknown": n for v, n in sorted(Counter(values).items())} for g, values in groups.items()}
    return DataSummary(
        demographics=demographics,
        source=source,
        split=split,
        num_images=len(dataset),
        fingerprint=dataset._fingerprint,
        image_list_sha256=hashlib.sha256("\n".join(ids).encode()).hexdigest() if ids else None,
    )


def build_dataset(config: Config) -> tuple[datasets.Dataset, DataSummary]:
    """The prepared training set (an `image` column of resolution x resolution grayscale PNGs) and its summary;
    several --train_data_dir folders are prepared one by one and joined (`_join_sources`)."""
    d = config.data
    if d.train_data_dir and len(d.train_data_dir) > 1:
        prepared, source = _join_sources(config)
    else:
        prepared, source = _prepare_one(config)
    if d.max_train_samples is not None:
        prepared = prepared.select(range(min(d.max_train_samples, len(prepared))))
    if len(prepared) == 0:
        raise ValueError(f"no training images left from {source}")
    return prepared, summarize(prepared, source, d.split)


def _join_sources(config: Config) -> tuple[datasets.Dataset, str]:
    """Each folder's split, prepared, with a `source` column (the reader's name, numbered when two folders share
    one) and patient IDs namespaced by it, so no two sources' patients can meet; joined on the columns every source
    has (numbers as float32). Per-source counts go to the log and into the description."""
    parts, names = [], []
    for root in config.data.train_data_dir:
        kind = "nih" if config.data.source in ("auto", "nih") and nih.is_nih_folder(root) else \
            detect_source(config.data, root)
        name = kind if kind not in names else f"{kind}-{sum(n.split('-')[0] == kind for n in names) + 1}"
        ds, _ = _prepare_one(config, root)
        if "patient_id" in ds.column_names:
            ds = ds.map(lambda batch: {"patient_id": [f"{name}:{p}" for p in batch["patient_id"]]}, batched=True)
        parts.append(ds.add_column("source", [name] * len(ds)))
        names.append(name)
    common = [c for c in parts[0].column_names if all(c in p.column_names for p in parts)]
    dropped = sorted({c for p in parts for c in p.column_names} - set(common))
    if dropped:
        logger.warning("columns not in every source are left out of the joined data: %s", ", ".join(dropped))
    parts = [p.select_columns(common) for p in parts]
    for column in common:
        kinds = {p.features[column].dtype for p in parts if isinstance(p.features[column], datasets.Value)}
        if len(kinds) > 1 and all(k.startswith(("int", "float")) for k in kinds):
            parts = [p.cast_column(column, datasets.Value("float32")) for p in parts]
    joined = datasets.concatenate_datasets([p.cast(parts[0].features) for p in parts])
    counts = ", ".join(f"{n} {len(p):,}" for n, p in zip(names, parts))
    logger.info("%d images from %d sources: %s", len(joined), len(parts), counts)
    joined.info.description = parts[0].info.description  # the prepared-images mark every part carries
    return joined, f"{len(parts)} sources ({counts} images)"


def _prepare_one(config: Config, root: str | None = None) -> tuple[datasets.Dataset, str]:
    """One source's training split, decoded once (cached) unless prepared already."""
    d = config.data
    raw, source = load_source(config, root)
    if isinstance(raw.features.get("pixel_values"), datasets.Array2D) and d.image_column not in raw.column_names:
        raise ValueError(
            f"{source} was prepared by an earlier version (uint8 `pixel_values`, no `image` column): prepare it "
            "again with `python -m lunggen_diffusers.prepare --overwrite_output_dir ...`"
        )
    stored = prepared_resolution(raw)
    if stored is not None:  # prepared already (e.g. by `python -m lunggen_diffusers.prepare`, or an NIH folder)
        if stored != d.resolution:
            raise ValueError(
                f"{source} holds {stored}x{stored} prepared images but --resolution is {d.resolution}: "
                f"prepare it again with --resolution {d.resolution}"
            )
        prepared = raw
    else:
        work_dir = _cache_dir(config) / "folders" if not raw.cache_files and d.train_data_dir else None
        prepared, _ = decode_images(
            raw,
            d.resolution,
            d.center_crop,
            d.image_column,
            num_proc=d.preprocessing_num_workers,
            work_dir=work_dir,
            max_failed_fraction=d.max_failed_fraction,
            dicom_percentiles=tuple(d.dicom_percentiles) if d.dicom_percentiles else None,
        )
    return prepared, source
