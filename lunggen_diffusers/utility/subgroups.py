"""Utility per subgroup: macro AUROC and the underdiagnosis rate in each subgroup of the real test split, for every
regime, with patient-bootstrap intervals and the gap to the whole test split.

Underdiagnosis follows Seyyed-Kalantari et al. (Nature Medicine 2021): the share of patients' images that carry a
finding but that the classifier calls "No Finding" (no finding's score at or above its threshold). The thresholds
are one operating point per finding and run, chosen by Youden's J on the real validation split (the point a deployed
model would use for everyone, fixed before the test split is seen), never per subgroup: a group the classifier
scores lower then shows up as more underdiagnosed. A finding with no positive image in validation has no operating
point and is never called. Intervals are the gap's bootstrap standard deviation times the normal quantile at the
Bonferroni-adjusted level (over every subgroup and regime), the same resamples for every regime and subgroup.
"""

from __future__ import annotations

import numpy as np

from ..evaluation.stats import auroc, patient_weights, weighted_auroc
from ..evaluation.subgroups import normal_interval
from ..utils import markdown_table


def youden_thresholds(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per finding, the score threshold maximising sensitivity + specificity - 1 on (labels, scores) (N, findings)."""
    out = np.empty(labels.shape[1])
    for k in range(labels.shape[1]):
        order = np.argsort(-scores[:, k], kind="mergesort")
        positive = labels[order, k] > 0
        tpr = np.cumsum(positive) / max(positive.sum(), 1)
        fpr = np.cumsum(~positive) / max((~positive).sum(), 1)
        best = int(np.argmax(tpr - fpr))
        out[k] = scores[order[best], k] if positive.any() else np.inf
    return out


def _underdiagnosed(labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per image: 1 if it carries a finding and none is called, 0 if it carries one and one is called, NaN if it
    carries none (not in the rate's denominator)."""
    diseased = labels.max(1) > 0
    called = (scores >= thresholds).any(1)
    return np.where(diseased, (~called).astype(float), np.nan)


def subgroup_summary(labels: np.ndarray, patients: list[str], groups: dict[str, list[str]],
                     scores: dict[str, list[np.ndarray]], num_resamples: int, seed: int,
                     validation_labels: np.ndarray, validation_scores: dict[str, list[np.ndarray]],
                     min_images: int = 20) -> dict:
    """{"groups": {group: {value: {regime: figures}}}, "flagged": [...], "level": ...} (see the module docstring).

    `scores`: per regime, one (N, findings) array per seed on the test split, `validation_scores` the same runs'
    on the validation split (the operating points); every figure is the mean over seeds."""
    cells = [(g, v, np.flatnonzero(np.asarray(values) == v)) for g, values in groups.items()
             for v in sorted(set(values) - {""})]
    cells = [c for c in cells if len(c[2]) >= min_images and (labels[c[2]].max(1) > 0).any()]
    level = 1 - 0.05 / max(len(cells) * len(scores) * 2, 1)
    every = np.arange(len(labels))
    figures = {}
    for name, runs in scores.items():
        under = np.stack([_underdiagnosed(labels, s, youden_thresholds(validation_labels, v))
                          for s, v in zip(runs, validation_scores[name], strict=True)])  # (seeds, N)
        boot_auc = {key: [] for key in ["all", *range(len(cells))]}
        boot_under = {key: [] for key in ["all", *range(len(cells))]}
        for chunk in patient_weights(patients, num_resamples, seed):  # the same resamples for every regime
            for key, rows in [("all", every), *enumerate(c[2] for c in cells)]:
                w = chunk[:, rows]
                aucs = [weighted_auroc(labels[rows, k], s[rows, k], w) for s in runs for k in range(labels.shape[1])]
                boot_auc[key].append(np.nanmean(np.stack(aucs, 1), 1))
                diseased = ~np.isnan(under[0, rows])
                rates = [(w[:, diseased] * u[rows][diseased]).sum(1) / w[:, diseased].sum(1) for u in under]
                boot_under[key].append(np.mean(rates, 0))
        boot_auc = {k: np.concatenate(v) for k, v in boot_auc.items()}
        boot_under = {k: np.concatenate(v) for k, v in boot_under.items()}

        def macro(rows, runs=runs):
            return float(np.nanmean([auroc(labels[rows, k], s[rows, k]) for s in runs
                                     for k in range(labels.shape[1])]))

        overall_auc, overall_under = macro(every), float(np.nanmean(under))
        for c, (group, value, rows) in enumerate(cells):
            auc, rate = macro(rows), float(np.nanmean(under[:, rows]))
            auc_gap, under_gap = auc - overall_auc, rate - overall_under
            auc_interval = normal_interval(auc_gap, boot_auc[c] - boot_auc["all"], level)
            under_interval = normal_interval(under_gap, boot_under[c] - boot_under["all"], level, boot_under[c])
            figures.setdefault(group, {}).setdefault(value, {"num_images": int(len(rows)),
                                                             "num_diseased": int((labels[rows].max(1) > 0).sum())})
            figures[group][value][name] = {
                "macro_auroc": auc, "macro_auroc_gap": auc_gap, "macro_auroc_gap_interval": auc_interval,
                "underdiagnosis": rate, "underdiagnosis_gap": under_gap,
                "underdiagnosis_gap_interval": under_interval,
                "flagged": [what for what, (low, high) in (("AUROC", auc_interval), ("underdiagnosis", under_interval))
                            if low > 0 or high < 0]}  # NaN compares False: never flagged
        figures.setdefault("everyone", {})[name] = {"macro_auroc": overall_auc, "underdiagnosis": overall_under}
    flagged = sorted(f"{g}={v} {name}: {what}" for g, values in figures.items() if g != "everyone"
                     for v, entry in values.items() for name in scores for what in entry[name]["flagged"])
    return {"groups": figures, "flagged": flagged, "level": level, "num_resamples": num_resamples,
            "operating_point": "Youden's J per finding and run, on the real validation split"}


def subgroup_markdown(summary: dict, descriptions: dict[str, str]) -> list[str]:
    """The report's and the card's subgroup section; `descriptions`: each regime's name in the table."""
    regimes = list(summary["groups"]["everyone"])
    rows = [["everyone", "", *(f"{summary['groups']['everyone'][r]['macro_auroc']:.3f} / "
                               f"{summary['groups']['everyone'][r]['underdiagnosis']:.3f}" for r in regimes)]]
    for group, values in summary["groups"].items():
        if group == "everyone":
            continue
        for value, entry in values.items():
            cells = []
            for r in regimes:
                e = entry[r]
                low, high = e["underdiagnosis_gap_interval"]
                interval = "too few to tell" if np.isnan(low) else f"[{low:+.3f}, {high:+.3f}]"
                mark = " **(flagged)**" if e["flagged"] else ""
                cells.append(f"{e['macro_auroc']:.3f} ({e['macro_auroc_gap']:+.3f}) / {e['underdiagnosis']:.3f} "
                             f"({e['underdiagnosis_gap']:+.3f} {interval}){mark}")
            rows.append([f"{group}={value}", f"{entry['num_images']:,} ({entry['num_diseased']:,})", *cells])
    return [
        "### Per subgroup", "",
        "Macro AUROC (gap to everyone) / underdiagnosis rate: the share of test images with a finding called "
        f"\"No Finding\" (gap [{summary['level']:.2%} interval, Bonferroni over every subgroup and regime]). "
        f"Operating point: {summary['operating_point']}. Flagged: an interval that excludes 0.", "",
        markdown_table(["subgroup", "test images (with a finding)", *(descriptions[r] for r in regimes)], rows), "",
        f"Flagged: {'; '.join(summary['flagged']) or 'none'}.", "",
    ]
