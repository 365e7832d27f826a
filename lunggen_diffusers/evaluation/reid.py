"""Re-identification risk: can a generated image be matched to a training patient, though it copies no one image?

The instrument is the patient verifier (`..verifier`), trained here on the training split's patients (pairs of
their images: same patient or not) and judged on held-out patients: its verification AUROC, and the pair
probability that 1% of held-out different-patient pairs exceed (the threshold). The risk is, for each generated
image, its best probability against every training image; the share above the threshold is set beside the same
share for held-out real images of patients not in training (the null: what a stranger scores). A set is flagged
when its share's lower 95% bound lies above the null's upper bound.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..cli import UsageError
from ..networks import fit, to_input
from ..verifier import (
    Gallery,
    PatientVerifier,
    VerifierNet,
    is_verifier,
    load_verifier,
    nn_vectors,
)
from .features import DEFAULT_FEATURE_MODEL, Extractor, extract, get_extractor
from .images import ImageSource
from .stats import auroc, wilson

FALSE_MATCH_RATE = 0.01
NN_READ_SIZE = 64  # images are read at this side for the gallery's pixel vectors (pooled to 32)


@dataclass
class VerifierRecipe:
    backbone: Literal["cnn", "raddino"] = "cnn"
    feature_model: str = DEFAULT_FEATURE_MODEL  # raddino: Hub id or local folder of the frozen encoder
    resolution: int = 64
    width: int = 16
    dim: int = 64
    steps: int = 1000
    patients_per_batch: int = 32
    learning_rate: float = 2e-3
    seed: int = 0


def _by_patient(patient_ids: list[str]) -> tuple[np.ndarray, list[str]]:
    names = sorted(set(patient_ids))
    lookup = {name: i for i, name in enumerate(names)}
    return np.array([lookup[p] for p in patient_ids], np.int64), names


def _check_patients(source: ImageSource, flag: str) -> None:
    if not source.patient_ids:
        raise UsageError(f"--reid needs patient IDs: {flag} {source.spec} has no patient_id column (give a prepared "
                         "dataset, PATH[:SPLIT])")


def _inputs(source: ImageSource, recipe: VerifierRecipe, image_size: int, cache_dir: str | None,
            device: str) -> torch.Tensor:
    if recipe.backbone == "cnn":
        return to_input(source.read(range(len(source)), recipe.resolution), recipe.resolution)
    encoder = get_extractor("raddino", recipe.feature_model, device)
    return torch.from_numpy(extract(source, {"raddino": encoder}, image_size, cache_dir=cache_dir)["raddino"])


def _pair_batches(patient: np.ndarray, recipe: VerifierRecipe, rng: np.random.Generator):
    """Each step: `patients_per_batch` patients with two or more images, two of each, so every batch holds as many
    same-patient pairs as patients and all the other pairs are different patients."""
    order = np.argsort(patient, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(patient))[:-1])
    several = [m for m in members if len(m) > 1]
    if len(several) < 2:
        raise UsageError(f"the training set has {len(several)} patient(s) with two or more images; the verifier "
                         "learns from same-patient pairs and needs at least 2 (phantom: --phantom_images_per_patient)")
    per_batch = min(recipe.patients_per_batch, len(several))
    for _ in range(recipe.steps):
        chosen = rng.choice(len(several), per_batch, replace=False)
        yield np.concatenate([rng.choice(several[c], 2, replace=False) for c in chosen])


def _fit(x: torch.Tensor, patient: np.ndarray, recipe: VerifierRecipe, progress: bool) -> VerifierNet:
    with torch.random.fork_rng(devices=[]):  # fixed initialisation without moving the caller's global RNG
        torch.manual_seed(recipe.seed)
        net = VerifierNet(recipe.width, recipe.dim, x.shape[1] if x.ndim == 2 else 0)

    def loss(rows: np.ndarray) -> torch.Tensor:
        embeddings = net(x[torch.from_numpy(rows)])
        same = torch.from_numpy(patient[rows][:, None] == patient[rows][None, :]).float()
        off_diagonal = 1 - torch.eye(len(rows))
        # Both kinds of pair weigh half: there are 2P - 2 different-patient pairs to each same-patient one.
        weights = off_diagonal * (same / (same * off_diagonal).sum() + (1 - same) / ((1 - same) * off_diagonal).sum())
        return (F.binary_cross_entropy_with_logits(net.pair_logits(embeddings @ embeddings.T), same,
                                                   reduction="none") * weights).sum() / 2

    batches = _pair_batches(patient, recipe, np.random.default_rng(recipe.seed))
    return fit(net, batches, loss, recipe.learning_rate, recipe.steps, weight_decay=1e-4, one_cycle=True,
               desc="patient verifier", disable=not progress)


def held_out_pairs(verifier: PatientVerifier, embeddings: np.ndarray, patient_ids: list[str],
                   max_pairs: int = 20000, seed: int = 0) -> dict:
    """Verification on held-out patients: every same-patient pair (up to `max_pairs`) and as many random
    different-patient pairs; AUROC, the threshold at a 1% false-match rate and the share of same-patient pairs
    above it."""
    patient, _ = _by_patient(patient_ids)
    rng = np.random.default_rng(seed)
    i, j = np.triu_indices(len(patient), 1) if len(patient) <= 4000 else (None, None)
    if i is None:  # too many images to list every pair: sample them
        i, j = rng.integers(0, len(patient), (2, 40 * max_pairs))
        keep = i != j
        i, j = i[keep], j[keep]
    same = patient[i] == patient[j]
    pairs = {}
    for name, mask in (("same", same), ("different", ~same)):
        rows = np.flatnonzero(mask)
        rows = rng.choice(rows, min(max_pairs, len(rows)), replace=False)
        pairs[name] = verifier.probability(np.einsum("nd,nd->n", embeddings[i[rows]], embeddings[j[rows]]))
    if min(len(p) for p in pairs.values()) == 0:
        raise UsageError("the held-out set needs patients with two or more images and at least two patients to "
                         "measure verification")
    threshold = float(np.quantile(pairs["different"], 1 - FALSE_MATCH_RATE))
    labels = np.r_[np.ones(len(pairs["same"])), np.zeros(len(pairs["different"]))]
    return {"auroc": auroc(labels, np.r_[pairs["same"], pairs["different"]]), "threshold": threshold,
            "false_match_rate": FALSE_MATCH_RATE, "true_match_rate": float((pairs["same"] > threshold).mean()),
            "same_pairs": len(pairs["same"]), "different_pairs": len(pairs["different"])}


def train_verifier(train: ImageSource, held_out: ImageSource, recipe: VerifierRecipe, image_size: int = 256,
                   cache_dir: str | None = None, device: str = "cpu", progress: bool = True) -> PatientVerifier:
    """Train on `train`'s patients, measure on `held_out`'s (patient-disjoint), and keep `train` as the gallery."""
    _check_patients(train, "--train")
    _check_patients(held_out, "--real")
    patient, names = _by_patient(train.patient_ids)
    x = _inputs(train, recipe, image_size, cache_dir, device)
    net = _fit(x, patient, recipe, progress)
    config = {**asdict(recipe), "in_features": x.shape[1] if x.ndim == 2 else 0,
              "train_fingerprint": train.fingerprint, "train_images": len(train), "train_patients": len(names),
              "held_out_fingerprint": held_out.fingerprint, "held_out_images": len(held_out),
              "held_out_patients": len(set(held_out.patient_ids)), "threshold": 0.5}
    if recipe.backbone == "cnn":
        config.pop("feature_model")
    verifier = PatientVerifier(net, config, device=device)
    with torch.inference_mode():
        embeddings = torch.cat([net(x[s:s + 256]) for s in range(0, len(x), 256)]).numpy()
    pixels = np.concatenate([nn_vectors(b) for b in train.batches(NN_READ_SIZE, 256)])
    verifier.gallery = Gallery(embeddings, pixels, patient.astype(np.int32), names)
    held = _inputs(held_out, recipe, image_size, cache_dir, device)
    with torch.inference_mode():
        held_embeddings = torch.cat([net(held[s:s + 256]) for s in range(0, len(held), 256)]).numpy()
    config.update(held_out_pairs(verifier, held_embeddings, held_out.patient_ids, seed=recipe.seed))
    # What the privacy filter compares a generated image with: a stranger's best match against the training set.
    config["search_threshold"] = search_threshold(verifier.best_matches(held_embeddings)[0])
    return PatientVerifier(net, config, verifier.gallery, device)


def verifier_for(folder: str, train: ImageSource, held_out: ImageSource, recipe: VerifierRecipe, image_size: int,
                 cache_dir: str | None, device: str) -> PatientVerifier:
    """The verifier in `folder`, which must have been trained on `train`; trained and saved there when absent."""
    _check_patients(train, "--train")
    _check_patients(held_out, "--real")
    if is_verifier(folder):
        verifier = load_verifier(folder, device)
        if verifier.config["train_fingerprint"] != train.fingerprint:
            raise UsageError(f"--reid {folder} was trained on another training set than --train {train.spec} "
                             "(fingerprints differ); give an empty folder to train one on it")
        return verifier
    verifier = train_verifier(train, held_out, recipe, image_size, cache_dir, device)
    verifier.save(folder)
    return verifier


def extractor(verifier: PatientVerifier) -> Extractor:
    recipe = verifier.config
    what = f"frozen {recipe['feature_model']} + head" if recipe["backbone"] == "raddino" else "a CNN"
    return Extractor("verifier", verifier.identity, f"patient verifier ({what}, {recipe['dim']}-d)", verifier.embed)


def patient_interval(hits: np.ndarray, patients: list[str], num_resamples: int = 1000,
                     seed: int = 0) -> tuple[float, float]:
    """95% interval of a share of images over patients: the percentile interval of a patient bootstrap, widened to
    the Wilson interval with as many trials as patients (images of one patient are not independent; and a share of
    0 still has an upper bound, which no resample of zeros shows)."""
    patient, names = _by_patient(patients)
    per_hits = np.bincount(patient, hits.astype(np.float64), len(names))
    per_count = np.bincount(patient, minlength=len(names)).astype(np.float64)
    weights = np.random.default_rng(seed).multinomial(len(names), np.full(len(names), 1 / len(names)), num_resamples)
    shares = (weights @ per_hits) / (weights @ per_count)
    low, high = wilson(hits.mean() * len(names), len(names))
    return max(0.0, min(float(np.quantile(shares, 0.025)), low)), max(float(np.quantile(shares, 0.975)), high)


def _patient_halves(patients: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    patient, names = _by_patient(patients)
    first = np.random.default_rng(seed).permutation(len(names))[: len(names) // 2]
    in_first = np.isin(patient, first)
    return np.flatnonzero(in_first), np.flatnonzero(~in_first)


def search_threshold(best: np.ndarray) -> float:
    """The best-match probability that a share FALSE_MATCH_RATE of strangers' images exceed."""
    return float(np.quantile(best, 1 - FALSE_MATCH_RATE))


def reid_risk(verifier: PatientVerifier, fake: np.ndarray, null: np.ndarray, null_patients: list[str],
              train: np.ndarray, train_patients: list[str], fake_names: list[str],
              seed: int = 0) -> tuple[dict, list[dict]]:
    """The summary (aggregates only) and the local rows: each generated image above the threshold with the training
    patient it matched and its probability, highest first.

    A search against M training images is M comparisons, so the pair threshold (1% of single different-patient
    pairs) is exceeded by almost every stranger's best match. The threshold here is the search's: the best-match
    probability 1% of held-out images exceed, calibrated on half of the held-out patients; the null share is
    measured on the other half, so its 1% is observed, not assumed."""
    fake_best, fake_row = verifier.best_matches(fake, train)
    null_best, _ = verifier.best_matches(null, train)
    calibrate, measure = _patient_halves(null_patients, seed)
    threshold = search_threshold(null_best[calibrate])
    fake_hits, null_hits = fake_best > threshold, null_best[measure] > threshold
    fake_interval = tuple(max(0.0, bound) for bound in wilson(int(fake_hits.sum()), len(fake_hits)))
    null_interval = patient_interval(null_hits, [null_patients[i] for i in measure], seed=seed)
    rows = sorted(({"image": fake_names[i], "training_patient": train_patients[fake_row[i]],
                    "probability": round(float(fake_best[i]), 6)} for i in np.flatnonzero(fake_hits)),
                  key=lambda row: -row["probability"])
    c = verifier.config
    summary = {
        "share_generated": float(fake_hits.mean()), "share_generated_interval": list(fake_interval),
        "share_null": float(null_hits.mean()), "share_null_interval": list(null_interval),
        "flagged": bool(fake_interval[0] > null_interval[1]),
        "num_generated": len(fake), "num_above": int(fake_hits.sum()), "num_null": len(measure),
        "num_null_patients": len({null_patients[i] for i in measure}), "num_calibration": len(calibrate),
        "num_train": len(train), "num_train_patients": len(set(train_patients)),
        "patients_matched": len({row["training_patient"] for row in rows}),
        "median_best_generated": float(np.median(fake_best)), "median_best_null": float(np.median(null_best)),
        "threshold": threshold, "false_match_rate": FALSE_MATCH_RATE, "pair_threshold": c["threshold"],
        "verifier_auroc": c["auroc"], "verifier_true_match_rate": c["true_match_rate"],
        "verifier_backbone": c["backbone"], "verifier_held_out_patients": c["held_out_patients"],
    }
    return summary, rows
