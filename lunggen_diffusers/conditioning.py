"""Labels for conditional training: the vocabulary and label counts of a training split, and its label vectors.

What is stored with a model (`label_config`) is aggregate: the label names and how many training images carry each
combination of labels. No image or patient identifier goes in.
"""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np

from .config import CONDITIONS
from .lunggen_pipeline import DEFAULT_GUIDANCE_SCALE, LabelSpace

# --condition_on choice -> the dataset column it reads (NIH metadata, metadata.csv folders and the phantom alike).
CONDITION_COLUMNS = dict(zip(CONDITIONS, ("finding_labels", "view_position", "patient_sex")))
NO_FINDING = "No Finding"


def _row_labels(findings: list[str], extras: dict[str, str]) -> list[str]:
    return sorted(f for f in findings if f != NO_FINDING) + [f"{g}={v}" for g, v in extras.items()]


def label_config(dataset: datasets.Dataset, condition_on: list[str],
                 guidance_scale: float = DEFAULT_GUIDANCE_SCALE) -> dict:
    """The vocabulary (every label seen in `dataset`) and the count of each label combination."""
    columns = [CONDITION_COLUMNS[c] for c in condition_on]
    missing = [c for c, column in zip(condition_on, columns) if column not in dataset.column_names]
    if missing:
        raise ValueError(f"--condition_on {' '.join(missing)}: the training data has no "
                         f"{', '.join(CONDITION_COLUMNS[c] for c in missing)} column "
                         f"(it has: {', '.join(dataset.column_names)})")
    table = dataset.select_columns(columns).with_format(None).to_dict()
    groups = {c: sorted(set(map(str, table[CONDITION_COLUMNS[c]]))) for c in condition_on if c != "findings"}
    findings = table["finding_labels"]
    rows = [_row_labels(f, {g: str(table[CONDITION_COLUMNS[g]][i]) for g in groups}) for i, f in enumerate(findings)]
    return {
        "condition_on": list(condition_on),
        "findings": sorted({f for row in findings for f in row} - {NO_FINDING}),
        "groups": groups,
        "combination_counts": dict(sorted(Counter("|".join(r) for r in rows).items())),
        "guidance_scale": guidance_scale,
    }


def label_vectors(dataset: datasets.Dataset, config: dict) -> np.ndarray:
    """(N, size) float32 label vectors of every image of `dataset`, in row order (the null entry is 0)."""
    space = LabelSpace(config)
    columns = [CONDITION_COLUMNS[c] for c in config["condition_on"]]
    table = dataset.select_columns(columns).with_format(None).to_dict()
    index = {name: i for i, name in enumerate(space.names)}
    vectors = np.zeros((len(dataset), space.size), np.float32)
    for i, findings in enumerate(table["finding_labels"]):
        extras = {g: str(table[CONDITION_COLUMNS[g]][i]) for g in space.groups}
        vectors[i, [index[name] for name in _row_labels(findings, extras)]] = 1.0
    return vectors


def prevalence(config: dict) -> dict[str, float]:
    """Share of training images carrying each label (for the model card)."""
    space = LabelSpace(config)
    total = sum(space.counts.values())
    shares = dict.fromkeys(space.names, 0)
    for combination, count in space.counts.items():
        for name in filter(None, combination.split("|")):
            shares[name] += count
    return {name: n / total for name, n in shares.items()}
