"""The statistics the evaluation, utility and reader-study reports share, in numpy and the standard library: AUROC by
the rank formula and its patient bootstrap, Wilson intervals, the exact binomial test, Mann-Whitney U, Cohen's and
Fleiss' kappa.

The bootstrap never copies images: resampling patients with replacement gives each image a weight (how often its
patient was drawn), and the weighted Mann-Whitney statistic over tie groups equals the rank formula on the
materialised resample, for a thousand resamples at the cost of one sort per score vector.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from statistics import NormalDist

import numpy as np

# Resamples per chunk: bounds the (chunk, images) weight matrix to a few tens of MB on a 25,000-image test split.
_CHUNK = 100


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: (sum of the positives' ranks - n1(n1+1)/2) / (n1 n0), tied scores sharing their
    average rank. NaN when one class is absent."""
    labels = np.asarray(labels, bool)
    scores = np.asarray(scores, np.float64)
    n1 = int(labels.sum())
    n0 = len(labels) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    _, inverse, counts = np.unique(scores[order], return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    ranks = np.empty(len(scores))
    ranks[order] = (first_rank + (counts - 1) / 2.0)[inverse]
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def patient_weights(patients, num_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Chunks of (up to _CHUNK, N) weights: how many times each image's patient is drawn when the distinct patients
    are resampled with replacement (a patient's images always travel together). The same seed gives the same
    resamples in the same order."""
    _, code = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
    num_patients = int(code.max()) + 1
    rng = np.random.default_rng(seed)
    for start in range(0, num_resamples, _CHUNK):
        rows = min(_CHUNK, num_resamples - start)
        draws = rng.integers(0, num_patients, size=(rows, num_patients))
        flat = (draws + num_patients * np.arange(rows)[:, None]).ravel()
        counts = np.bincount(flat, minlength=rows * num_patients).reshape(rows, num_patients)
        yield counts[:, code].astype(np.float64)


def weighted_auroc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of one score vector under each row of `weights` (R, N): an image of weight w counts as w copies.

    Sum over tie groups g of P_g * (negatives below g + N_g / 2) / (P * N), with P_g, N_g the weights of the
    positives and negatives scoring exactly g: the rank formula with ties averaged. NaN where a class is absent."""
    labels = np.asarray(labels, bool)
    order = np.argsort(np.asarray(scores, np.float64), kind="mergesort")
    sorted_scores = np.asarray(scores, np.float64)[order]
    starts = np.flatnonzero(np.r_[True, np.diff(sorted_scores) != 0])
    w = np.atleast_2d(weights)[:, order]
    positive = labels[order]
    pos = np.add.reduceat(w * positive, starts, axis=1)
    neg = np.add.reduceat(w * ~positive, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    total = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (pos * (below + neg / 2.0)).sum(axis=1) / total, np.nan)


def bootstrap_aurocs(labels: np.ndarray, scores: np.ndarray, patients, num_resamples: int = 1000,
                     seed: int = 0) -> np.ndarray:
    """(num_resamples, runs, findings) AUROCs of `scores` (runs, N, findings) against `labels` (N, findings),
    every run and finding on the same patient resamples (so differences between runs are paired)."""
    scores = np.asarray(scores)
    out = np.empty((num_resamples, scores.shape[0], scores.shape[2]))
    start = 0
    for chunk in patient_weights(patients, num_resamples, seed):
        for run in range(scores.shape[0]):
            for k in range(scores.shape[2]):
                out[start:start + len(chunk), run, k] = weighted_auroc(labels[:, k], scores[run, :, k], chunk)
        start += len(chunk)
    return out


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates (NaN replicates, a class absent from a resample, left out)."""
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.nanpercentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% at z = 1.96); (nan, nan) for n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def binomial_test(hits: int, n: int) -> float:
    """Exact two-sided binomial test against p = 0.5: the probability of an outcome at most as likely as `hits`, in
    exact integers (the outcomes are symmetric, so this is also the doubled smaller tail)."""
    if n == 0:
        return 1.0
    observed = math.comb(n, hits)
    return min(1.0, sum(math.comb(n, i) for i in range(n + 1) if math.comb(n, i) <= observed) / 2**n)


def mann_whitney(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(U of `x`, two-sided p) by the normal approximation with the tie correction and a continuity correction,
    as scipy's `mannwhitneyu(method="asymptotic")`; (nan, nan) when a sample is empty."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n1, n2 = len(x), len(y)
    if not n1 or not n2:
        return float("nan"), float("nan")
    u = auroc(np.r_[np.ones(n1), np.zeros(n2)], np.r_[x, y]) * n1 * n2
    n = n1 + n2
    _, ties = np.unique(np.r_[x, y], return_counts=True)
    variance = n1 * n2 / 12 * ((n + 1) - (ties**3 - ties).sum() / (n * (n - 1)))
    if variance <= 0:
        return float(u), 1.0
    z = (abs(u - n1 * n2 / 2) - 0.5) / math.sqrt(variance)
    return float(u), float(min(1.0, 2 * (1 - NormalDist().cdf(max(z, 0.0)))))


def cohen_kappa(a: Sequence, b: Sequence) -> float:
    """Cohen's kappa of two raters' categories over the same items; nan when chance agreement is total."""
    a, b = np.asarray(a), np.asarray(b)
    categories = np.unique(np.r_[a, b])
    observed = float((a == b).mean())
    expected = float(sum((a == c).mean() * (b == c).mean() for c in categories))
    return float("nan") if expected == 1 else (observed - expected) / (1 - expected)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa from an (items, categories) table of how many raters put each item in each category (every
    item rated by the same number of raters, at least two)."""
    counts = np.asarray(counts, np.float64)
    raters = counts.sum(1)[0]
    shares = counts.sum(0) / counts.sum()
    agreement = ((counts * (counts - 1)).sum(1) / (raters * (raters - 1))).mean()
    expected = float((shares**2).sum())
    return float("nan") if expected == 1 else float((agreement - expected) / (1 - expected))
