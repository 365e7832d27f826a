"""One entry: `build_dataset(config)` -> a `datasets.Dataset` of prepared training images.

Every source (built-in phantom, NIH folder, any image folder, Hub id or `save_to_disk` folder) goes through the same
one-time prepare pass: decode, any mode -> L, square, antialiased resize, stored as compact uint8 `pixel_values`.
That pass is cached (datasets fingerprinting, or an explicit cache file keyed by the file listing), so training
reads small arrays instead of decoding PNGs every epoch. Scaling to [-1, 1] happens on the training device.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from ..config import Config
from .transforms import preprocess_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


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


def prepare(
    ds: datasets.Dataset,
    resolution: int,
    center_crop: bool = True,
    image_column: str = "image",
    num_proc: int | None = None,
    cache_file_name: str | None = None,
    max_failed_fraction: float = 0.5,
) -> tuple[datasets.Dataset, list[tuple[str, str]]]:
    """Decode and resize once; returns the prepared dataset and (file name, reason) for each unreadable image."""
    if image_column not in ds.column_names:
        raise ValueError(f"--image_column {image_column!r} is not a column of the dataset (has: {ds.column_names})")
    if len(ds) == 0:
        raise ValueError("the data source holds no images")
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    features = ds.features.copy()
    del features[image_column]
    features["pixel_values"] = datasets.Array2D((resolution, resolution), "uint8")
    features["prepare_error"] = datasets.Value("string")
    prepared = ds.map(
        _prepare_batch,
        batched=True,
        batch_size=64,
        num_proc=num_proc if num_proc and num_proc > 1 and len(ds) >= 4 * num_proc else None,
        remove_columns=[image_column],
        features=features,
        fn_kwargs={"image_column": image_column, "resolution": resolution, "center_crop": center_crop},
        cache_file_name=cache_file_name,
        desc=f"Preparing images at {resolution}px",
    )
    error_column = prepared["prepare_error"]
    failed_rows = [i for i, e in enumerate(error_column) if e]
    failures = [(_source_name(ds[i][image_column]), error_column[i]) for i in failed_rows]
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
        prepared = prepared.select(i for i in range(len(prepared)) if i not in bad)
    return prepared.remove_columns("prepare_error"), failures


def _cache_dir(config: Config) -> Path:
    root = config.data.cache_dir or os.path.join(datasets.config.HF_DATASETS_CACHE, "lunggen_prepared")
    Path(root).mkdir(parents=True, exist_ok=True)
    return Path(root)


def image_folder(path: str | Path) -> datasets.Dataset:
    """Every image file below `path` (recursively, sorted), lazily referenced by path."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"--train_data_dir {path}: no such folder")
    files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"--train_data_dir {path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    return datasets.Dataset.from_dict(
        {"image": files}, features=datasets.Features({"image": datasets.Image(decode=False)})
    )


def _listing_key(ds: datasets.Dataset, config: Config) -> str:
    """Cache key of an in-memory file listing: paths, sizes and mtimes, plus the preprocessing settings."""
    h = hashlib.sha256(f"{config.data.resolution}|{config.data.center_crop}".encode())
    for cell in ds.cast_column("image", datasets.Image(decode=False))["image"]:
        stat = os.stat(cell["path"])
        h.update(f"{cell['path']}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_source(config: Config) -> tuple[datasets.Dataset, str]:
    """The raw (unprepared) training split and a short, non-identifying description of where it came from."""
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
            return loaded, "a local `save_to_disk` dataset"
        return datasets.load_dataset(name, d.dataset_config_name, split=split), f"the Hub dataset {name}"
    if d.train_data_dir:
        return image_folder(d.train_data_dir), "a local image folder"
    from .phantom import phantom_dataset

    ds = phantom_dataset(d.num_phantom_images, d.resolution, seed=config.training.seed, finding_prob=d.phantom_finding_prob)
    return ds, "the built-in procedural chest phantom"


def build_dataset(config: Config) -> datasets.Dataset:
    """The prepared training set: `pixel_values` (uint8, resolution x resolution) in torch format."""
    d = config.data
    raw, source = load_source(config)
    if "pixel_values" in raw.column_names and raw.features["pixel_values"].shape == (d.resolution, d.resolution):
        prepared = raw  # already prepared at this resolution (e.g. by `python -m lunggen_diffusers.prepare`)
    else:
        cache_file = None
        if not raw.cache_files and d.train_data_dir:
            cache_file = str(_cache_dir(config) / f"folder-{_listing_key(raw, config)}.arrow")
        prepared, _ = prepare(
            raw,
            d.resolution,
            d.center_crop,
            d.image_column,
            num_proc=d.preprocessing_num_workers,
            cache_file_name=cache_file,
            max_failed_fraction=d.max_failed_fraction,
        )
    if d.max_train_samples is not None:
        prepared = prepared.select(range(min(d.max_train_samples, len(prepared))))
    if len(prepared) == 0:
        raise ValueError(f"no training images left from {source}")
    prepared.info.description = source
    return prepared.with_format("torch", columns=["pixel_values"])
