"""Every evaluation figure per subgroup (sex, age bin, view), with bootstrap intervals over patients and the gap to
the overall figure.

A subgroup's Fréchet distance is biased upwards by its smaller size, so its gap is taken to the overall figure *at
the subgroup's size*: each bootstrap replicate resamples every real patient and generated image, takes the
subgroup's among them, and draws as many patients and images from everyone for the comparison. Finding rates
have no such bias: their gap is the subgroup's (generated - real) difference minus everyone's. Intervals are
Bonferroni-adjusted over every interval that can flag (FD and each finding, in every subgroup), so a report on a
set with no real difference flags nothing in at least 95% of runs however many subgroups and findings it has.
KID (20 subsets) and PRDC are given as point figures per subgroup: a bootstrap resample repeats images, and a
repeated image is its own nearest neighbour, which collapses the k-NN radii PRDC stands on. MS-SSIM diversity is
reported for the whole sets only.

Where the groups come from: the real side's dataset columns (`patient_sex`, `patient_age` binned, `view_position`,
`finding_labels`); the generated side's manifest.csv (`labels`: "Cardiomegaly|patient_sex=F|patient_age=60-79").
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from ..cli import UsageError
from ..generation.output_folder import read_manifest
from ..vocabulary import (
    FINDINGS_COLUMN,
    MANIFEST_LABELS,
    SUBGROUP_COLUMNS,
    SUBGROUPS,
    finding_lists,
    parse_label_cell,
)
from .images import ImageSource
from .metrics import frechet_distance, kernel_inception_distance, prdc

ANY_FINDING = "any finding"
_GROUP_LABEL = {"patient_sex": "patient_sex", "patient_age": "age_bin", "view_position": "view_position"}


def parse_subgroups(text: str | None) -> list[str]:
    """`--subgroups patient_sex,age_bin,view_position` -> the group names, checked."""
    if not text:
        return []
    groups = [g.strip() for g in text.split(",") if g.strip()]
    unknown = [g for g in groups if g not in SUBGROUPS]
    if unknown or not groups:
        raise UsageError(f"--subgroups {text!r}: choose a comma-separated list of {', '.join(SUBGROUPS)}")
    return groups


def dataset_metadata(source: ImageSource) -> dict[str, list]:
    """The columns of a saved dataset that subgroup figures read (those it has), one value per image."""
    dataset = source._dataset.with_format(None)
    wanted = [c for c in (*SUBGROUP_COLUMNS, FINDINGS_COLUMN) if c in dataset.column_names]
    return dataset.select_columns(wanted).to_dict()


def manifest_metadata(source: ImageSource, folder: str) -> dict[str, list]:
    """A generated folder's requests, in the order `source` reads its files: the findings asked for and the
    patient (`patient_sex`, `age_bin`, `view_position`) where the model was conditioned on it."""
    rows = {row["file"]: row for row in read_manifest(folder)}
    out = {FINDINGS_COLUMN: [], **{name: [] for name in SUBGROUPS}}
    for path in source._folder_files:
        row = rows.get(path.relative_to(folder).as_posix())
        cell = row.get(MANIFEST_LABELS) if row else None
        names = (parse_label_cell(cell) if cell else None) or []  # an unconditioned image asked for nothing
        groups = dict(name.split("=", 1) for name in names if "=" in name)
        out[FINDINGS_COLUMN].append([n for n in names if "=" not in n])
        for label, group in _GROUP_LABEL.items():
            out[group].append(groups.get(label, ""))
    return out


def finding_matrix(metadata: dict[str, list], findings: list[str]) -> np.ndarray:
    """(N, len(findings)) 0/1 of each image's finding labels."""
    names = finding_lists(metadata[FINDINGS_COLUMN])
    return np.array([[f in row for f in findings] for row in names], np.float64).reshape(len(names), len(findings))


def _draw(rows: np.ndarray, patients: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` patients drawn with replacement among those of `rows`, with all their images (rows into the set)."""
    own = patients[rows]
    chosen = rng.choice(np.unique(own), count, replace=True)
    by_patient = {p: rows[own == p] for p in np.unique(chosen)}
    return np.concatenate([by_patient[p] for p in chosen])


def normal_interval(estimate: float, replicates: np.ndarray, level: float,
                    subgroup: np.ndarray | None = None) -> tuple[float, float]:
    """estimate +- z * the replicates' standard deviation: a Bonferroni level puts the percentiles so far out
    (0.1% tails for 20 intervals) that a few hundred resamples could not place them, while their spread they can.
    NaN when `subgroup` (the subgroup's own figure per replicate) never moves: then the spread is everyone's alone,
    and a normal interval around a rate stuck at 0 would call a handful of patients significantly better off."""
    if subgroup is not None and not np.nanstd(subgroup) > 0:
        return float("nan"), float("nan")
    half = NormalDist().inv_cdf(0.5 + level / 2) * float(np.nanstd(replicates, ddof=1))
    return estimate - half, estimate + half


def subgroup_report(real_features: np.ndarray, fake_features: np.ndarray, real_groups: dict[str, list[str]],
                    fake_groups: dict[str, list[str]], real_patients: list[str] | None,
                    real_findings: np.ndarray | None = None, fake_findings: np.ndarray | None = None,
                    findings: list[str] = (), k: int = 5, num_resamples: int = 100, seed: int = 0,
                    min_images: int = 20) -> dict:
    """Per subgroup: counts, FD (with interval and the gap to everyone at the subgroup's size), PRDC, and each
    finding's rate on both sides with the gap of the (generated - real) difference to everyone's.

    `*_groups`: {group: value per image}; a subgroup is reported when both sides hold at least `min_images`
    images of it. `*_findings`: 0/1 (N, len(findings)) matrices, or None to leave finding rates out."""
    patients = np.asarray(real_patients if real_patients is not None else
                          [f"image-{i}" for i in range(len(real_features))])
    cells = []
    for group in real_groups:
        for value in sorted(set(real_groups[group]) & set(fake_groups.get(group, [])) - {""}):
            real_rows = np.flatnonzero(np.asarray(real_groups[group]) == value)
            fake_rows = np.flatnonzero(np.asarray(fake_groups[group]) == value)
            if min(len(real_rows), len(fake_rows)) >= max(min_images, 2 * (k + 1)):
                cells.append((group, value, real_rows, fake_rows))
    everyone_real, everyone_fake = np.arange(len(real_features)), np.arange(len(fake_features))
    with_findings = real_findings is not None and fake_findings is not None and len(findings) > 0
    # Every interval that can flag counts: FD and each finding, in every subgroup.
    level = 1 - 0.05 / max(len(cells) * (1 + (len(findings) if with_findings else 0)), 1)
    report = {"level": level, "num_resamples": num_resamples, "unit": "patient", "groups": {}}
    rng = np.random.default_rng(seed)
    n_all = len(np.unique(patients))
    sizes = [len(np.unique(patients[real_rows])) for _, _, real_rows, _ in cells]
    fd_sub, fd_all = (np.full((num_resamples, len(cells)), np.nan) for _ in range(2))
    rate_gap = np.full((num_resamples, len(cells), len(findings)), np.nan)
    for r in range(num_resamples):
        # One resample of everyone per replicate: each subgroup's rows are its members in it, so a subgroup's
        # finding-rate gap and everyone's move together (a paired interval).
        r_rep, f_rep = _draw(everyone_real, patients, n_all, rng), rng.choice(everyone_fake, len(everyone_fake))
        if with_findings:
            everyone_gap = fake_findings[f_rep].mean(0) - real_findings[r_rep].mean(0)
        for c, (_, _, real_rows, fake_rows) in enumerate(cells):
            r_sub, f_sub = r_rep[np.isin(r_rep, real_rows)], f_rep[np.isin(f_rep, fake_rows)]
            if min(len(r_sub), len(f_sub)) < 2 * (k + 1):
                continue
            r_size = _draw(everyone_real, patients, sizes[c], rng)
            fd_sub[r, c] = frechet_distance(real_features[r_sub], fake_features[f_sub])
            fd_all[r, c] = frechet_distance(real_features[r_size], fake_features[rng.choice(everyone_fake,
                                                                                             len(f_sub))])
            if with_findings:
                rate_gap[r, c] = fake_findings[f_sub].mean(0) - real_findings[r_sub].mean(0) - everyone_gap
    overall_gap = (fake_findings.mean(0) - real_findings.mean(0)) if with_findings else None
    for c, (group, value, real_rows, fake_rows) in enumerate(cells):
        fd = frechet_distance(real_features[real_rows], fake_features[fake_rows])
        gap = float(np.nanmedian(fd_sub[:, c] - fd_all[:, c]))
        fd_gap = normal_interval(gap, fd_sub[:, c] - fd_all[:, c], level)
        entry = {
            "num_real": int(len(real_rows)), "num_real_patients": sizes[c], "num_fake": int(len(fake_rows)),
            "fd": fd, "fd_interval": normal_interval(fd, fd_sub[:, c], level),
            "fd_everyone_same_size": float(np.nanmedian(fd_all[:, c])),
            "fd_gap": gap, "fd_gap_interval": fd_gap,
            "fd_flagged": bool(fd_gap[0] > 0 or fd_gap[1] < 0),
            "kid": kernel_inception_distance(real_features[real_rows], fake_features[fake_rows], 20, 1000, seed)[0],
            **prdc(real_features[real_rows], fake_features[fake_rows], k),
        }
        if with_findings:
            sub_real, sub_fake = real_findings[real_rows].mean(0), fake_findings[fake_rows].mean(0)
            entry["findings"] = {}
            for j, finding in enumerate(findings):
                gap = float(sub_fake[j] - sub_real[j] - overall_gap[j])
                interval = normal_interval(gap, rate_gap[:, c, j], level)
                entry["findings"][finding] = {
                    "real": float(sub_real[j]), "fake": float(sub_fake[j]), "gap": gap, "gap_interval": interval,
                    "flagged": bool(interval[0] > 0 or interval[1] < 0)}
        report["groups"].setdefault(group, {})[value] = entry
    report["flagged"] = sorted(
        f"{group}={value}: {what}" for group, values in report["groups"].items() for value, e in values.items()
        for what in (["FD"] if e["fd_flagged"] else []) + [f for f, r in e.get("findings", {}).items() if r["flagged"]])
    return report


def demographic_agreement(read: np.ndarray, requested: dict[str, list[str]]) -> dict:
    """How well generated images show the patient they were asked for, read by the phantom classifier (`read`:
    its `predict` rows): sex and view agreement, and the correlation of the read age with the requested bin's
    middle (the open top bin counts as 85)."""
    from .phantom_classifier import FEMALE, OUTPUTS, VIEW_AP, ages

    out = {}
    for group, output, positive in (("patient_sex", FEMALE, "F"), ("view_position", VIEW_AP, "AP")):
        asked = np.asarray(requested.get(group, []))
        rows = np.flatnonzero(asked != "") if len(asked) else np.array([], int)
        if len(rows):
            shown = read[rows, OUTPUTS.index(output)] >= 0.5
            out[f"{group}_agreement"] = float((shown == (asked[rows] == positive)).mean())
    asked = np.asarray(requested.get("age_bin", []))
    rows = np.flatnonzero(asked != "") if len(asked) else np.array([], int)
    if len(rows) > 2 and len(set(asked[rows])) > 1:
        middle = np.array([85.0 if b.endswith("+") else np.mean([float(x) for x in b.split("-")]) for b in asked[rows]])
        out["age_correlation"] = float(np.corrcoef(ages(read[rows]), middle)[0, 1])
        out["age_read_mean"] = float(ages(read[rows]).mean())
    return out
