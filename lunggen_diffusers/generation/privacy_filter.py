"""The privacy filter: a generated image that the patient verifier matches to a training patient (or that sits too
close to a training image in pixels) is rejected and drawn again from the next seed of its own sequence.

Image i's k-th redraw starts from `noise_seed(seed, i, k)`, so a filtered folder is as reproducible as any other: the
same model, verifier and thresholds give the same rejections and the same images. Each rejection is a row of
rejected.csv (index, attempt, its noise seed, the scores, the reason); privacy_filter.json sums them up for the
dataset card. Neither names a training patient.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..cli import UsageError
from ..verifier import PatientVerifier, load_verifier

REJECTED = "rejected.csv"
SUMMARY = "privacy_filter.json"
REJECTED_FIELDS = ("index", "attempt", "noise_seed", "verifier_probability", "nearest_ncc", "reason")


@dataclass
class PrivacyFilter:
    verifier: PatientVerifier
    threshold: float
    nn_threshold: float | None = None
    max_redraws: int = 10

    @classmethod
    def load(cls, folder: str, threshold: float | None = None, nn_threshold: float | None = None,
             max_redraws: int = 10, device: str = "cpu") -> "PrivacyFilter":
        verifier = load_verifier(folder, device)
        if verifier.gallery is None:
            raise UsageError(f"--privacy_filter {folder}: the verifier has no gallery of training images to compare "
                             "with (train it with `evaluate --reid`)")
        if threshold is not None and not 0 < threshold < 1:
            raise UsageError(f"--privacy_threshold {threshold}: give a same-patient probability in (0, 1)")
        if nn_threshold is not None and not -1 < nn_threshold < 1:
            raise UsageError(f"--privacy_nn_threshold {nn_threshold}: give a pixel NCC in (-1, 1)")
        if max_redraws < 0:
            raise UsageError(f"--privacy_max_redraws {max_redraws}: give 0 or more")
        chosen = verifier.config["search_threshold"] if threshold is None else threshold
        return cls(verifier, float(chosen), nn_threshold, max_redraws)

    @property
    def recipe(self) -> str:
        """What a resume must match: the verifier and the thresholds."""
        nn = f"|ncc>{self.nn_threshold:g}" if self.nn_threshold is not None else ""
        return f"{self.verifier.identity}|p>{self.threshold:.6g}{nn}"

    def judge(self, images: np.ndarray) -> list[dict]:
        """For float (B, H, W, 1) images in [0, 1]: each one's scores and the reason it is rejected ("" if not)."""
        pixels = np.round(images[..., 0] * 255).astype(np.uint8)
        probability, _ = self.verifier.best_matches(self.verifier.embed(pixels))
        ncc = self.verifier.nearest_ncc(pixels) if self.nn_threshold is not None else None
        out = []
        for i, p in enumerate(probability):
            reasons = [f"verifier {p:.4f} > {self.threshold:.4f}"] if p > self.threshold else []
            if ncc is not None and ncc[i] > self.nn_threshold:
                reasons.append(f"NCC {ncc[i]:.4f} > {self.nn_threshold:.4f}")
            out.append({"verifier_probability": f"{p:.6f}", "nearest_ncc": "" if ncc is None else f"{ncc[i]:.6f}",
                        "reason": "; ".join(reasons)})
        return out

    def summary(self, accepted: int, rejected: list[dict], gave_up: list[int]) -> dict:
        c = self.verifier.config
        redrawn = {row["index"] for row in rejected}
        draws = accepted + len(rejected)
        return {"threshold": self.threshold, "nn_threshold": self.nn_threshold, "max_redraws": self.max_redraws,
                "threshold_is": "the verifier's: 1% of held-out strangers' best matches exceed it"
                if self.threshold == c["search_threshold"] else "given",
                "verifier_backbone": c["backbone"], "verifier_auroc": c["auroc"],
                "verifier_train_images": c["train_images"], "verifier_train_patients": c["train_patients"],
                "images": accepted, "draws": draws, "rejected_draws": len(rejected),
                "rejected_share": len(rejected) / draws if draws else 0.0, "images_redrawn": len(redrawn),
                "rejected_by_verifier": sum("verifier" in row["reason"] for row in rejected),
                "rejected_by_ncc": sum("NCC" in row["reason"] for row in rejected), "gave_up": sorted(gave_up)}
