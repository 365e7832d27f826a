"""Labels for conditional training: the vocabulary and label counts of a training split, and its condition vectors.

What is stored with a model (`label_config`) is aggregate: the label names and how many training images carry each
combination of labels. No image or patient identifier goes in.
"""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np

from ..cli import UsageError
from ..lunggen_pipeline import DEFAULT_GUIDANCE_SCALE, LabelSpace
from ..vocabulary import (
    AGE_BIN_NAMES,
    CONDITION_COLUMNS,
    FINDINGS_COLUMN,
    condition_value,
    finding_lists,
)


def _row_labels(findings: list[str], extras: dict[str, str]) -> list[str]:
    return sorted(finding_lists([findings])[0]) + [f"{g}={v}" for g, v in extras.items()]


def label_config(dataset: datasets.Dataset, condition_on: list[str],
                 guidance_scale: float = DEFAULT_GUIDANCE_SCALE) -> dict:
    """The vocabulary (every label seen in `dataset`) and the count of each label combination."""
    columns = [CONDITION_COLUMNS[c] for c in condition_on]
    missing = [c for c, column in zip(condition_on, columns, strict=True) if column not in dataset.column_names]
    if missing:
        raise UsageError(f"--condition_on {' '.join(missing)}: the training data has no "
                         f"{', '.join(CONDITION_COLUMNS[c] for c in missing)} column "
                         f"(it has: {', '.join(dataset.column_names)})")
    table = dataset.select_columns(columns).with_format(None).to_dict()
    values = {c: [condition_value(c, cell) for cell in table[CONDITION_COLUMNS[c]]] for c in condition_on
              if c != "findings"}
    # Age bins keep their natural order (sorted text would put "80+" before "0-17" only by luck).
    groups = {c: sorted(set(v), key=lambda x: (AGE_BIN_NAMES.index(x) if x in AGE_BIN_NAMES else len(AGE_BIN_NAMES), x))
              for c, v in values.items()}
    findings = table[FINDINGS_COLUMN]
    rows = [_row_labels(f, {g: values[g][i] for g in groups}) for i, f in enumerate(findings)]
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
        extras = {g: condition_value(g, table[CONDITION_COLUMNS[g]][i]) for g in space.groups}
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
