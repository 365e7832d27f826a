"""The one-time decode pass every source goes through: open any PIL mode, convert to L, square, antialiased resize,
store as an `image` column of 8-bit grayscale PNGs (what diffusers' scripts, `ds[i]["image"]` and the Hub's viewer
read); and the training loader's way back from those PNG bytes to uint8 pixels.

Chunked, parallel (datasets' `map` with `num_proc`), cached and resumable: with a work folder, each chunk is cached
under a key of its files and the settings, so a second run, or the other processes of a distributed run, reuse
it, and an interrupted run resumes after the last finished chunk.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from PIL import Image
from tqdm.auto import tqdm

from ..cli import UsageError
from ..utils import files_fingerprint, is_dicom
from . import dicom, transforms
from .transforms import preprocess_image

logger = logging.getLogger(__name__)

# Images per process in each cached chunk of the prepare pass: enough that starting the worker pool per chunk costs
# little, few enough that an interruption loses little.
CHUNK_PER_PROCESS = 256
# 1: uint8 `pixel_values` (Array2D); 2: an `image` column of grayscale PNGs. Part of every cache key, so a cache or
# prepared folder of another version is never read as this one.
FORMAT_VERSION = 2
_MARK = "lunggen_diffusers prepared images"


def open_image(value, dicom_percentiles: tuple[float, float] | None = None) -> Image.Image:
    """A datasets Image cell (decoded PIL, or {"bytes", "path"} when decode=False) or a file path -> a loaded PIL
    image; a DICOM file through its grey pipeline (`dicom.read_image`)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, Path)):
        value = {"bytes": None, "path": str(value)}
    if not value.get("bytes") and is_dicom(value["path"]):
        return dicom.read_image(value["path"], dicom_percentiles)
    image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    image.load()  # surface truncation errors here, inside the try below
    return image


def _png(pixels: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _decode_batch(batch: dict, image_column: str, resolution: int, center_crop: bool, dicom_percentiles) -> dict:
    images, errors = [], []
    for value in batch[image_column]:
        try:
            images.append(_png(preprocess_image(open_image(value, dicom_percentiles), resolution, center_crop)))
            errors.append("")
        except Exception as exc:  # an unreadable file is skipped and reported, never a crash deep in a worker
            images.append(_png(np.zeros((resolution, resolution), dtype=np.uint8)))
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
    return {"image": images, "prepare_error": errors}


def _source_name(value) -> str:
    if isinstance(value, dict) and value.get("path"):
        return os.path.basename(value["path"])
    return "<in-memory image>"


# Editing the preprocessing code (or DICOM's grey pipeline) invalidates every prepared-image cache.
_TRANSFORMS_DIGEST = hashlib.sha256(Path(transforms.__file__).read_bytes()).hexdigest()[:12]
_DICOM_DIGEST = hashlib.sha256(Path(dicom.__file__).read_bytes()).hexdigest()[:12]


def decode_images(
    ds: datasets.Dataset,
    resolution: int,
    center_crop: bool = True,
    image_column: str = "image",
    num_proc: int | None = None,
    work_dir: str | Path | None = None,
    max_failed_fraction: float = 0.5,
    dicom_percentiles: tuple[float, float] | None = None,
) -> tuple[datasets.Dataset, list[tuple[str, str]]]:
    """Decode and resize once; returns the prepared dataset and (file name, reason) for each unreadable image.

    The images are decoded in chunks. With `work_dir` (file-backed images only), each chunk is cached there under a
    key of its files and the settings, written atomically by datasets: a second run, or the other processes of a
    distributed run, reuse them, and an interrupted run resumes after the last finished chunk. Without it, datasets'
    own fingerprint cache applies when the source is on disk (Hub datasets).
    """
    if image_column not in ds.column_names:
        raise UsageError(f"--image_column {image_column!r} is not a column of the dataset (has: {ds.column_names})")
    if len(ds) == 0:
        raise UsageError("the data source holds no images")
    images = ds.select_columns([image_column])
    if isinstance(images.features[image_column], datasets.Image):
        images = images.cast_column(image_column, datasets.Image(decode=False))
    features = datasets.Features({"image": datasets.Image(), "prepare_error": datasets.Value("string")})
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    salt = f"{resolution}|{center_crop}|{_TRANSFORMS_DIGEST}|{_DICOM_DIGEST}|{dicom_percentiles}|v{FORMAT_VERSION}"
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
                    key = files_fingerprint((cell["path"] for cell in part[image_column]), salt)
                    cache_file = str(Path(work_dir) / f"prepared-{resolution}px-{key}.arrow")
                parts.append(
                    part.map(
                        _decode_batch,
                        batched=True,
                        batch_size=64,
                        num_proc=num_proc if num_proc and num_proc > 1 and len(part) >= 4 * num_proc else None,
                        remove_columns=[image_column],
                        features=features,
                        fn_kwargs={"image_column": image_column, "resolution": resolution, "center_crop": center_crop,
                                   "dicom_percentiles": dicom_percentiles},
                        cache_file_name=cache_file,
                    )
                )
                bar.update(len(part))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    decoded = datasets.concatenate_datasets(parts)
    others = ds.remove_columns(image_column)
    prepared = datasets.concatenate_datasets([others, decoded], axis=1) if others.column_names else decoded

    error_column = prepared["prepare_error"]
    failed_rows = [i for i, e in enumerate(error_column) if e]
    failures = [(_source_name(images[i][image_column]), error_column[i]) for i in failed_rows]
    if failed_rows:
        fraction = len(failed_rows) / len(ds)
        if fraction > max_failed_fraction:
            raise UsageError(
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
    prepared = prepared.remove_columns("prepare_error")  # a copy: its info is its own to mark
    prepared.info.description = json.dumps({_MARK: {"version": FORMAT_VERSION, "resolution": resolution}})
    return prepared, failures


def prepared_resolution(ds: datasets.Dataset) -> int | None:
    """The side of the images `decode_images` stored in `ds` (kept through select, save_to_disk, load_from_disk);
    None for anything else (a raw source, or a copy whose metadata was dropped, e.g. by a Hub round trip)."""
    try:
        mark = json.loads(ds.info.description or "")[_MARK]
    except (ValueError, KeyError, TypeError):
        return None
    return mark["resolution"] if mark.get("version") == FORMAT_VERSION else None


def stored_pixels(cells: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Arrow cells of the stored `image` column ({bytes, path} structs of PNGs) -> uint8 (N, H, W).

    Reads the PNG bytes straight from Arrow, without datasets' per-row formatting; lossless, so the pixels are the
    ones `decode_images` stored.
    """
    if isinstance(cells, pa.ChunkedArray):
        cells = cells.combine_chunks()
    return np.stack([np.asarray(Image.open(io.BytesIO(png))) for png in cells.field("bytes").to_pylist()])
