"""The data of a utility run: the real patient-wise splits, the labeled synthetic set, and the low-data subset.

Everything becomes an `ImageSet`: uint8 images at one size, a multi-hot label matrix over the real data's findings,
and a patient per image. Real labels come from `finding_labels`; synthetic labels from the `labels` column of a
`pipeline.py` manifest, matched to the real findings case-insensitively (`pleural effusion` = `Pleural_Effusion`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..cli import UsageError
from ..config import from_dict
from ..data.build import build_dataset
from ..data.phantom import phantom_dataset
from ..data.splits import check_patient_disjoint
from ..evaluation.images import IMAGE_COLUMNS, to_eval_image
from ..generation.output_folder import read_manifest
from ..utils import stable_hash
from ..vocabulary import (
    FINDINGS_COLUMN,
    MANIFEST_LABELS,
    NO_FINDING,
    SUBGROUP_COLUMNS,
    finding_lists,
    normalize,
    parse_label_cell,
    subgroup_columns,
)

SPLITS = ("train", "validation", "test")
PATIENT_COLUMNS = ("patient_id", "Patient ID")
LABEL_COLUMNS = (FINDINGS_COLUMN, "Finding Labels")
# Held-out phantoms (never in the demo's 2,000 training images): at the conditional demo's 0.5 per finding, 1,000
# test patients give about 500 positives per finding, a 95% interval about +-0.02 wide at AUROC 0.9.
PHANTOM_HELD_OUT = {"validation": 500, "test": 1000}
_READ_BATCH = 256


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 (N, size, size)
    labels: np.ndarray  # float32 (N, findings), multi-hot
    patients: list[str]
    groups: dict[str, list[str]] = field(default_factory=dict)  # subgroup name -> value per image ("" unknown)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, rows) -> ImageSet:
        rows = np.asarray(rows, dtype=np.int64)
        return ImageSet(self.images[rows], self.labels[rows], [self.patients[i] for i in rows],
                        {g: [values[i] for i in rows] for g, values in self.groups.items()})


def read_images(dataset: datasets.Dataset, size: int, desc: str) -> np.ndarray:
    """Every image of a dataset as uint8 (N, size, size), from a datasets `image` column or prepared `pixel_values`
    (whichever it has), through the evaluation preprocessing (any mode -> L, centre crop, antialiased resize)."""
    column = next((c for c in IMAGE_COLUMNS if c in dataset.column_names), None)
    if column is None:
        raise UsageError(f"the real data has no image column; expected one of {IMAGE_COLUMNS}, "
                         f"got {dataset.column_names}")
    cells = dataset.select_columns([column])
    cells = cells.with_format("numpy") if column == "pixel_values" else cells.with_format(None)
    out = np.empty((len(dataset), size, size), np.uint8)
    for start in tqdm(range(0, len(dataset), _READ_BATCH), desc=desc, unit="batch", leave=False):
        batch = cells[start:start + _READ_BATCH][column]
        out[start:start + len(batch)] = [to_eval_image(image, size) for image in batch]
    return out


def _column(dataset: datasets.Dataset, names: tuple[str, ...], what: str, split: str) -> list:
    name = next((c for c in names if c in dataset.column_names), None)
    if name is None:
        raise UsageError(f"the real {split!r} split has no {what} column; expected one of {', '.join(names)} "
                         f"(it has: {', '.join(dataset.column_names)})")
    return dataset.select_columns([name]).with_format(None)[name]


def _subgroups(dataset: datasets.Dataset) -> dict[str, list[str]]:
    present = [c for c in SUBGROUP_COLUMNS if c in dataset.column_names]
    return subgroup_columns(dataset.select_columns(present).with_format(None).to_dict()) if present else {}


def multi_hot(findings: list[list[str]], vocabulary: list[str]) -> np.ndarray:
    index = {normalize(name): k for k, name in enumerate(vocabulary)}
    out = np.zeros((len(findings), len(vocabulary)), np.float32)
    for i, names in enumerate(findings):
        out[i, [index[normalize(name)] for name in names]] = 1.0
    return out


def _phantom_splits() -> dict[str, datasets.Dataset]:
    """The conditional demo's training set, through the project's builder, and held-out phantoms after it."""
    config = from_dict({"preset": "demo", "condition_on": ["findings"]})
    d = config.data
    train, _ = build_dataset(config)
    splits = {"train": train.with_format(None)}
    start = d.num_phantom_images
    for name, count in PHANTOM_HELD_OUT.items():
        splits[name] = phantom_dataset(count, d.resolution, seed=config.training.seed,
                                       finding_prob=d.phantom_finding_prob, start_index=start)
        start += count
    return splits


def _saved_splits(path: str) -> dict[str, datasets.Dataset]:
    if not Path(path).is_dir():
        raise UsageError(f"--real {path}: no such folder (expected 'phantom' or a prepared dataset folder)")
    loaded = datasets.load_from_disk(path)
    missing = [s for s in SPLITS if not isinstance(loaded, datasets.DatasetDict) or s not in loaded]
    if missing:
        has = ", ".join(loaded) if isinstance(loaded, datasets.DatasetDict) else "a single Dataset"
        raise UsageError(f"--real {path}: needs the splits {', '.join(SPLITS)} (missing {', '.join(missing)}; "
                         f"has: {has}); prepare it with python -m lunggen_diffusers.prepare")
    return {s: loaded[s] for s in SPLITS}


def real_splits(spec: str, size: int) -> tuple[dict[str, ImageSet], list[str], str]:
    """The real train/validation/test `ImageSet`s (patient-disjoint, checked), their findings, and a description."""
    raw = _phantom_splits() if spec == "phantom" else _saved_splits(spec)
    findings = {s: finding_lists(_column(raw[s], LABEL_COLUMNS, "finding labels", s)) for s in SPLITS}
    vocabulary = sorted({name for names in findings["train"] for name in names}, key=normalize)
    if not vocabulary:
        raise UsageError(f"--real {spec}: the train split carries no finding labels (only '{NO_FINDING}')")
    out = {}
    for s in SPLITS:
        unknown = sorted({n for names in findings[s] for n in names if normalize(n) not in map(normalize, vocabulary)})
        if unknown:
            raise UsageError(f"--real {spec}: the {s!r} split has finding(s) {', '.join(unknown)} that the train "
                             f"split never has (train has: {', '.join(vocabulary)})")
        patients = [str(p) for p in _column(raw[s], PATIENT_COLUMNS, "patient", s)]
        out[s] = ImageSet(read_images(raw[s], size, f"real {s}"), multi_hot(findings[s], vocabulary), patients,
                          _subgroups(raw[s]))
    check_patient_disjoint({s: out[s].patients for s in SPLITS})
    description = "the built-in procedural chest phantom" if spec == "phantom" else "a prepared real dataset"
    return out, vocabulary, description


def synthetic_set(folder: str, vocabulary: list[str], size: int) -> ImageSet:
    """A `pipeline.py` output folder as an `ImageSet`; every image its own 'patient'. Refuses a folder without
    labels, unconditioned images and labels the real data does not have."""
    try:
        rows = read_manifest(folder)
    except UsageError as err:
        raise UsageError(f"--synthetic {err}") from None
    if not rows or MANIFEST_LABELS not in rows[0]:
        raise UsageError(f"--synthetic {folder}: manifest.csv has no {MANIFEST_LABELS} column; generate the set with "
                         f"a conditional model and --labels_from train (or --findings)")
    known = {normalize(name) for name in vocabulary}
    findings = []
    for row in rows:
        names = parse_label_cell(row[MANIFEST_LABELS])
        if names is not None:  # a model conditioned on the patient too asks for "patient_sex=F" beside findings
            names = [name for name in names if "=" not in name]
        if names is None:
            raise UsageError(f"--synthetic {folder}: {row['file']} was sampled unconditioned and has no labels; "
                             f"generate with --labels_from train (or --findings)")
        unknown = [name for name in names if normalize(name) not in known]
        if unknown:
            raise UsageError(f"--synthetic {folder}: label {unknown[0]!r} ({row['file']}) is not a finding of the "
                             f"real data (accepted: {', '.join(vocabulary)}, {NO_FINDING})")
        findings.append(names)
    images = np.empty((len(rows), size, size), np.uint8)
    for i, row in enumerate(tqdm(rows, desc="synthetic images", unit="img", leave=False)):
        path = Path(folder) / row["file"]
        if not path.is_file():
            raise UsageError(f"--synthetic {folder}: {row['file']} is in manifest.csv but not in the folder")
        with Image.open(path) as image:
            images[i] = to_eval_image(image, size)
    return ImageSet(images, multi_hot(findings, vocabulary), [f"synthetic-{row['index']}" for row in rows])


def patient_rows(patients: list[str], fraction: float, seed: int) -> np.ndarray:
    """Rows of a fixed `fraction` of the patients (at least one), all images of each, chosen by a seeded hash of
    their IDs: the same patients for every training seed, so the regimes with and without synthetic are paired."""
    ranked = sorted(set(patients), key=lambda p: stable_hash([seed, p]))
    keep = set(ranked[:max(1, math.ceil(fraction * len(ranked)))])
    return np.array([i for i, p in enumerate(patients) if p in keep], dtype=np.int64)
