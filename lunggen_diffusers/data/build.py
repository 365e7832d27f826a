"""One entry: `build_dataset(config)` -> a `datasets.Dataset` of prepared training images and its summary.

Every source (built-in phantom, NIH folder, any image folder, Hub id or `save_to_disk` folder) goes through the same
one-time decode pass (`decode.py`): decode, any mode -> L, square, antialiased resize, stored as an `image` column of
8-bit grayscale PNGs at the training resolution. That pass is cached, so training decodes small PNGs (in the
DataLoader workers) instead of resizing full-size radiographs every epoch. Scaling to [-1, 1] happens on the
training device. Which reader reads a folder is `registry.py`'s; NIH folders live in `nih.py`, splits and filters in
`splits.py`. Several folders are prepared one by one and joined (`_join_sources`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import datasets

from ..cli import UsageError
from ..config import Config, phantom_finding_scales
from ..summaries import DataSummary
from ..vocabulary import SUBGROUP_COLUMNS, subgroup_columns
from . import nih
from .decode import decode_images, prepared_resolution
from .phantom import phantom_dataset
from .prepared import write_report
from .registry import (
    SOURCES,
    cache_root,
    detect_source,
    folder_key,
    folder_source,
    root_of,
)
from .splits import filter_dataset, split_by_patient

logger = logging.getLogger(__name__)


def _cache_dir(config: Config) -> Path:
    root = cache_root(config.data)
    root.mkdir(parents=True, exist_ok=True)
    return root


def _nih_split(config: Config, root: str) -> datasets.Dataset:
    """One split of an NIH folder, prepared on first use into the cache (only there: the main process comes first)."""
    d = config.data
    work_dir = _cache_dir(config) / f"nih-{folder_key(root)}"
    dsdict, report, failures = nih.decode_splits(nih.plan_nih(root, d), d, work_dir)
    write_report(work_dir, report, failures)
    if d.split not in dsdict:
        raise UsageError(f"--split {d.split!r}: the NIH folder has no such split (has: {', '.join(dsdict)})")
    logger.info("NIH ChestX-ray14 prepared in %s: %s", work_dir, json.dumps(report["splits"]))
    return dsdict[d.split]


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
                    raise UsageError(f"--dataset_name {name}: no split {split!r} (has: {', '.join(loaded)})")
                loaded = loaded[split]
            return filter_dataset(loaded, d), "a local `save_to_disk` dataset"
        loaded = datasets.load_dataset(name, d.dataset_config_name, split=split)
        return filter_dataset(loaded, d), f"the Hub dataset {name}"
    if d.train_data_dir:
        root = root_of(d, root)
        if d.source == "nih" or (d.source == "auto" and nih.is_nih_folder(root)):
            return _nih_split(config, root), SOURCES["nih"][2]
        ds, source = folder_source(d, root)
        if "patient_id" in ds.column_names:
            ds = split_by_patient(ds, d)
        return filter_dataset(ds, d), source
    ds = phantom_dataset(
        d.num_phantom_images, d.resolution, seed=config.training.seed, finding_prob=d.phantom_finding_prob,
        finding_prob_scale=phantom_finding_scales(d.phantom_finding_scale),
        images_per_patient=d.phantom_images_per_patient,
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
        raise UsageError(f"no training images left from {source}")
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
            ds = ds.map(lambda batch, name=name: {"patient_id": [f"{name}:{p}" for p in batch["patient_id"]]},
                        batched=True)
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
    counts = ", ".join(f"{n} {len(p):,}" for n, p in zip(names, parts, strict=True))
    logger.info("%d images from %d sources: %s", len(joined), len(parts), counts)
    joined.info.description = parts[0].info.description  # the prepared-images mark every part carries
    return joined, f"{len(parts)} sources ({counts} images)"


def _prepare_one(config: Config, root: str | None = None) -> tuple[datasets.Dataset, str]:
    """One source's training split, decoded once (cached) unless prepared already."""
    d = config.data
    raw, source = load_source(config, root)
    if isinstance(raw.features.get("pixel_values"), datasets.Array2D) and d.image_column not in raw.column_names:
        raise UsageError(
            f"{source} was prepared by an earlier version (uint8 `pixel_values`, no `image` column): prepare it "
            "again with `python -m lunggen_diffusers.prepare --overwrite_output_dir ...`"
        )
    stored = prepared_resolution(raw)
    if stored is not None:  # prepared already (e.g. by `python -m lunggen_diffusers.prepare`, or an NIH folder)
        if stored != d.resolution:
            raise UsageError(
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
