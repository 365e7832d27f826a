"""One entry: `build_dataset(config)` -> a `datasets.Dataset` of prepared training images and its summary.

Every source (built-in phantom, NIH folder, any image folder, Hub id or `save_to_disk` folder) goes through the same
one-time prepare pass: decode, any mode -> L, square, antialiased resize, stored as compact uint8 `pixel_values`.
That pass is cached (datasets fingerprinting, or cache files per chunk keyed by the files' listing, which also make
an interrupted pass resumable), so training reads small arrays instead of decoding PNGs every epoch. Scaling to
[-1, 1] happens on the training device. NIH folders and filters live in `nih.py`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..config import Config
from ..summaries import DataSummary
from . import transforms
from .transforms import preprocess_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
METADATA_CSV = "metadata.csv"
# Images per process in each cached chunk of the prepare pass: enough that starting the worker pool per chunk costs
# little, few enough that an interruption loses little.
CHUNK_PER_PROCESS = 256


def _open(value) -> Image.Image:
    """A datasets Image cell (decoded PIL, or {"bytes", "path"} when decode=False) -> a loaded PIL image."""
    if isinstance(value, Image.Image):
        return value
    image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    image.load()  # surface truncation errors here, inside the try below
    return image


def _prepare_batch(batch: dict, image_column: str, resolution: int, center_crop: bool) -> dict:
    pixels, errors = [], []
    for value in batch[image_column]:
        try:
            pixels.append(preprocess_image(_open(value), resolution, center_crop))
            errors.append("")
        except Exception as exc:  # an unreadable file is skipped and reported, never a crash deep in a worker
            pixels.append(np.zeros((resolution, resolution), dtype=np.uint8))
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
    return {"pixel_values": pixels, "prepare_error": errors}


def _source_name(value) -> str:
    if isinstance(value, dict) and value.get("path"):
        return os.path.basename(value["path"])
    return "<in-memory image>"


def listing_key(paths, salt: str = "") -> str:
    """Short digest of files (path, size, mtime) and `salt`: a cache key that changes when any file does."""
    h = hashlib.sha256(salt.encode())
    for path in paths:
        stat = os.stat(path)
        h.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# Editing the preprocessing code invalidates every prepared-image cache.
_TRANSFORMS_DIGEST = hashlib.sha256(Path(transforms.__file__).read_bytes()).hexdigest()[:12]


def prepare(
    ds: datasets.Dataset,
    resolution: int,
    center_crop: bool = True,
    image_column: str = "image",
    num_proc: int | None = None,
    work_dir: str | Path | None = None,
    max_failed_fraction: float = 0.5,
) -> tuple[datasets.Dataset, list[tuple[str, str]]]:
    """Decode and resize once; returns the prepared dataset and (file name, reason) for each unreadable image.

    The images are decoded in chunks. With `work_dir` (file-backed images only), each chunk is cached there under a
    key of its files and the settings, written atomically by datasets: a second run, or the other processes of a
    distributed run, reuse them, and an interrupted run resumes after the last finished chunk. Without it, datasets'
    own fingerprint cache applies when the source is on disk (Hub datasets).
    """
    if image_column not in ds.column_names:
        raise ValueError(f"--image_column {image_column!r} is not a column of the dataset (has: {ds.column_names})")
    if len(ds) == 0:
        raise ValueError("the data source holds no images")
    images = ds.select_columns([image_column])
    if isinstance(images.features[image_column], datasets.Image):
        images = images.cast_column(image_column, datasets.Image(decode=False))
    features = datasets.Features(
        {"pixel_values": datasets.Array2D((resolution, resolution), "uint8"), "prepare_error": datasets.Value("string")}
    )
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    salt = f"{resolution}|{center_crop}|{_TRANSFORMS_DIGEST}"
    chunk = CHUNK_PER_PROCESS * max(1, num_proc or 1)
    parts = []
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar over all chunks instead of one per chunk
    try:
        desc = f"Preparing images at {resolution}px"
        with tqdm(total=len(ds), unit="img", desc=desc, disable=not bars_were_on) as bar:
            for start in range(0, len(ds), chunk):
                part = images.select(range(start, min(start + chunk, len(ds))))
                cache_file = None
                if work_dir is not None:
                    key = listing_key((cell["path"] for cell in part[image_column]), salt)
                    cache_file = str(Path(work_dir) / f"prepared-{resolution}px-{key}.arrow")
                parts.append(
                    part.map(
                        _prepare_batch,
                        batched=True,
                        batch_size=64,
                        num_proc=num_proc if num_proc and num_proc > 1 and len(part) >= 4 * num_proc else None,
                        remove_columns=[image_column],
                        features=features,
                        fn_kwargs={"image_column": image_column, "resolution": resolution, "center_crop": center_crop},
                        cache_file_name=cache_file,
                    )
                )
                bar.update(len(part))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    pixels = datasets.concatenate_datasets(parts)
    others = ds.remove_columns(image_column)
    prepared = datasets.concatenate_datasets([others, pixels], axis=1) if others.column_names else pixels

    error_column = prepared["prepare_error"]
    failed_rows = [i for i, e in enumerate(error_column) if e]
    failures = [(_source_name(images[i][image_column]), error_column[i]) for i in failed_rows]
    if failed_rows:
        fraction = len(failed_rows) / len(ds)
        if fraction > max_failed_fraction:
            raise ValueError(
                f"{len(failed_rows)} of {len(ds)} images could not be read ({fraction:.0%} > --max_failed_fraction "
                f"{max_failed_fraction}); first: {', '.join(name for name, _ in failures[:3])}"
            )
        logger.warning(
            "skipped %d unreadable image(s) of %d; first: %s",
            len(failed_rows),
            len(ds),
            "; ".join(f"{n} ({r})" for n, r in failures[:3]),
        )
        bad = set(failed_rows)
        prepared = prepared.select([i for i in range(len(prepared)) if i not in bad])
    return prepared.remove_columns("prepare_error"), failures


def _cache_dir(config: Config) -> Path:
    root = config.data.cache_dir or os.path.join(datasets.config.HF_DATASETS_CACHE, "lunggen_prepared")
    Path(root).mkdir(parents=True, exist_ok=True)
    return Path(root)


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
    files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"--train_data_dir {path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    return datasets.Dataset.from_dict(
        {"image": files}, features=datasets.Features({"image": datasets.Image(decode=False)})
    )


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


def _patient_split(ds: datasets.Dataset, config: Config) -> datasets.Dataset:
    """The configured split of a folder whose metadata names patients, split patient-wise by hashing their IDs."""
    from .nih import assign_splits

    d = config.data
    splits, _ = assign_splits(
        {"patient_id": ds["patient_id"]}, None, None, d.validation_fraction, d.test_fraction, d.split_seed
    )
    if d.split not in splits:
        raise ValueError(f"--split {d.split!r}: not a split of this folder (has: {', '.join(sorted(set(splits)))})")
    return ds.select([i for i, s in enumerate(splits) if s == d.split])


def _nih_split(config: Config) -> datasets.Dataset:
    """One split of an NIH folder, prepared on first use into the cache (only there: the main process comes first)."""
    from . import nih

    d = config.data
    folder_key = hashlib.sha256(str(Path(d.train_data_dir).resolve()).encode()).hexdigest()[:12]
    work_dir = _cache_dir(config) / f"nih-{folder_key}"
    dsdict, report, failures = nih.prepare_nih(nih.plan_nih(d.train_data_dir, d), d, work_dir)
    nih.write_report(work_dir, report, failures)
    if d.split not in dsdict:
        raise ValueError(f"--split {d.split!r}: the NIH folder has no such split (has: {', '.join(dsdict)})")
    logger.info("NIH ChestX-ray14 prepared in %s: %s", work_dir, json.dumps(report["splits"]))
    return dsdict[d.split]


def load_source(config: Config) -> tuple[datasets.Dataset, str]:
    """The training split, filtered, and a short, non-identifying description of where it came from.

    Unprepared except for an NIH folder, which comes back prepared (and cached) at the configured resolution.
    """
    from .nih import filter_dataset, is_nih_folder

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
        if is_nih_folder(d.train_data_dir):
            return _nih_split(config), "the NIH ChestX-ray14 dataset"
        ds = image_folder(d.train_data_dir)
        if "patient_id" in ds.column_names:
            ds = _patient_split(ds, config)
        return filter_dataset(ds, d), "a local image folder"
    from .phantom import phantom_dataset

    ds = phantom_dataset(
        d.num_phantom_images, d.resolution, seed=config.training.seed, finding_prob=d.phantom_finding_prob
    )
    return filter_dataset(ds, d), "the built-in procedural chest phantom"


def summarize(dataset: datasets.Dataset, source: str, split: str) -> DataSummary:
    plain = dataset.with_format(None)
    id_column = next((c for c in ("image_index", "patient_id") if c in plain.column_names), None)
    ids = sorted(map(str, plain[id_column])) if id_column else []
    return DataSummary(
        source=source,
        split=split,
        num_images=len(dataset),
        fingerprint=dataset._fingerprint,
        image_list_sha256=hashlib.sha256("\n".join(ids).encode()).hexdigest() if ids else None,
    )


def build_dataset(config: Config) -> tuple[datasets.Dataset, DataSummary]:
    """The prepared training set (`pixel_values`, uint8, resolution x resolution, torch format) and its summary."""
    d = config.data
    raw, source = load_source(config)
    if "pixel_values" in raw.column_names:  # already prepared (e.g. by `python -m lunggen_diffusers.prepare`)
        shape = tuple(raw.features["pixel_values"].shape)
        if shape != (d.resolution, d.resolution):
            raise ValueError(
                f"{source} holds {shape[0]}x{shape[1]} prepared images but --resolution is {d.resolution}: "
                f"prepare it again with --resolution {d.resolution}"
            )
        prepared = raw
    else:
        work_dir = _cache_dir(config) / "folders" if not raw.cache_files and d.train_data_dir else None
        prepared, _ = prepare(
            raw,
            d.resolution,
            d.center_crop,
            d.image_column,
            num_proc=d.preprocessing_num_workers,
            work_dir=work_dir,
            max_failed_fraction=d.max_failed_fraction,
        )
    if d.max_train_samples is not None:
        prepared = prepared.select(range(min(d.max_train_samples, len(prepared))))
    if len(prepared) == 0:
        raise ValueError(f"no training images left from {source}")
    return prepared.with_format("torch", columns=["pixel_values"]), summarize(prepared, source, d.split)
