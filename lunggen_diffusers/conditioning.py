"""Labels for conditional training: the vocabulary and label counts of a training split, and its condition vectors.

What is stored with a model (`label_config`) is aggregate: the label names and how many training images carry each
combination of labels. No image or patient identifier goes in.
"""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np

from .lunggen_pipeline import DEFAULT_GUIDANCE_SCALE, LabelSpace
from .vocabulary import CONDITION_COLUMNS, FINDINGS_COLUMN, finding_lists


def _row_labels(findings: list[str], extras: dict[str, str]) -> list[str]:
    return sorted(finding_lists([findings])[0]) + [f"{g}={v}" for g, v in extras.items()]


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
    findings = table[FINDINGS_COLUMN]
    rows = [_row_labels(f, {g: str(table[CONDITION_COLUMNS[g]][i]) for g in groups}) for i, f in enumerate(findings)]
    return {
        "condition_on": list(condition_on),
        "findings": sorted({f for row in finding_lists(findings) for f in row}),
        "groups": groups,
        "combination_counts": dict(sorted(Counter("|".join(r) for r in rows).items())),
        "guidance_scale": guidance_scale,
    }


def condition_vectors(dataset: datasets.Dataset, config: dict) -> np.ndarray:
    """(N, size) float32 condition vectors of every image of `dataset`, in row order (the null entry is 0)."""
    space = LabelSpace(config)
    columns = [CONDITION_COLUMNS[c] for c in config["condition_on"]]
    table = dataset.select_columns(columns).with_format(None).to_dict()
    index = {name: i for i, name in enumerate(space.names)}
    vectors = np.zeros((len(dataset), space.size), np.float32)
    for i, findings in enumerate(table[FINDINGS_COLUMN]):
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
