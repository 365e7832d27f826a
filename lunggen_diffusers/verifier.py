"""The patient verifier: do two radiographs show the same patient? A Siamese network (Packhäuser et al., Sci Rep
2022) embeds each image on the unit sphere; the probability that two images share a patient is
sigmoid(scale * cosine + bias), learnt on same- and different-patient pairs. Comparing N images with M is one matrix
product, so a generated set is scored against every training patient at once.

A verifier folder holds `config.json` (the recipe, the fingerprint of the training set, the held-out AUROC and the
threshold at a 1% false-match rate), `model.safetensors` and `gallery.npz`: the training images' embeddings, their
patients and 32x32 pixel vectors for the nearest-neighbour check. The gallery is derived from patient images and
names training patients: the folder stays on this machine.

In the foundation because both ends use it: `evaluation/` trains it and measures the re-identification risk, the
generation command filters its images with it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .cli import UsageError
from .networks import conv_block, encoder_embedder, to_input
from .utils import stable_hash

BACKBONES = ("cnn", "raddino")
CONFIG, WEIGHTS, GALLERY = "config.json", "model.safetensors", "gallery.npz"
NN_SIZE = 32  # side of the pixel vectors the nearest-neighbour check correlates


class VerifierNet(nn.Module):
    """`cnn`: images (N, 1, R, R) in [-1, 1] -> a unit embedding; strided down to a 4x4 map that is flattened, not
    pooled, because where the heart, domes and ribs sit is what identifies a patient. `raddino`: a two-layer head
    over a frozen encoder's features (N, in_features)."""

    def __init__(self, width: int, dim: int, in_features: int = 0):
        super().__init__()
        w = width
        if in_features:
            self.body = nn.Sequential(nn.Linear(in_features, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        else:
            self.body = nn.Sequential(*conv_block(1, w), nn.MaxPool2d(2), *conv_block(w, 2 * w), nn.MaxPool2d(2),
                                      *conv_block(2 * w, 4 * w), nn.MaxPool2d(2), *conv_block(4 * w, 4 * w, stride=2),
                                      nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(4 * w * 16, dim))
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.bias = nn.Parameter(torch.tensor(-5.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.body(x), dim=1)

    def pair_logits(self, cosine: torch.Tensor) -> torch.Tensor:
        return self.scale * cosine + self.bias


def nn_vectors(images) -> np.ndarray:
    """float16 (N, NN_SIZE**2): area-downsampled pixels, centred and unit-normed, so a dot product is the NCC."""
    x = F.adaptive_avg_pool2d(torch.as_tensor(np.asarray(images)).float()[:, None], NN_SIZE).flatten(1)
    x = x - x.mean(1, keepdim=True)
    return F.normalize(x, dim=1).numpy().astype(np.float16)


@dataclass
class Gallery:
    """The training set as the verifier sees it: one embedding and one NCC vector per image, and its patient."""

    embeddings: np.ndarray   # float32 (M, dim), unit rows
    pixels: np.ndarray       # float16 (M, NN_SIZE**2), unit rows
    patient_index: np.ndarray  # int32 (M,), into patients
    patients: list[str]


class PatientVerifier:
    """A trained verifier and its recipe (`config`); `gallery` when it was built with its training set."""

    def __init__(self, net: VerifierNet, config: dict, gallery: Gallery | None = None, device: str = "cpu",
                 batch_size: int = 256):
        self.net, self.config, self.gallery = net.to(device).eval(), config, gallery
        self.device, self.batch_size = torch.device(device), batch_size
        self._encoder = None
        # The weights' bytes name it (a feature cache key): a verifier retrained on other data never reads another's.
        weights = hashlib.sha256()
        for name, tensor in sorted(self.net.state_dict().items()):
            weights.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        recipe = [config.get("backbone"), config.get("feature_model"), config.get("resolution"), weights.hexdigest()]
        self.identity = f"patient-verifier:{stable_hash(recipe)}"

    @property
    def threshold(self) -> float:
        """Pair probability at a 1% false-match rate on held-out patients."""
        return float(self.config["threshold"])

    def _encode(self, images: np.ndarray) -> torch.Tensor:
        if self.config["backbone"] == "cnn":
            return to_input(images, self.config["resolution"])
        if self._encoder is None:
            self._encoder = encoder_embedder(self.config["feature_model"], str(self.device), self.batch_size)[0]
        return torch.from_numpy(self._encoder(np.asarray(images)))

    @torch.inference_mode()
    def embed(self, images) -> np.ndarray:
        """float32 (N, dim) unit embeddings of uint8 (N, H, W) images."""
        x = self._encode(images)
        out = [self.net(x[s:s + self.batch_size].to(self.device)).float().cpu() for s in range(0, len(x),
                                                                                                self.batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.config["dim"]), np.float32)

    @torch.inference_mode()
    def probability(self, cosine) -> np.ndarray:
        """Same-patient probability of pairs with these embedding cosines."""
        return torch.sigmoid(self.net.pair_logits(torch.as_tensor(np.asarray(cosine, np.float32)))).numpy()

    def best_matches(self, embeddings: np.ndarray, gallery: np.ndarray | None = None,
                     chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """For each embedding, the highest same-patient probability against the gallery (the training set's
        embeddings unless given) and the gallery row that gave it: one matrix product per chunk."""
        gallery = self.gallery.embeddings if gallery is None else gallery
        g = torch.from_numpy(np.ascontiguousarray(gallery, np.float32))
        cos, rows = [], []
        for start in range(0, len(embeddings), chunk):
            best = (torch.from_numpy(np.ascontiguousarray(embeddings[start:start + chunk], np.float32)) @ g.T).max(1)
            cos.append(best.values)
            rows.append(best.indices)
        if not cos:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        return self.probability(torch.cat(cos)), torch.cat(rows).numpy()

    def nearest_ncc(self, images) -> np.ndarray:
        """Each image's highest pixel NCC (32x32, no shift) against the gallery's training images."""
        mine = torch.from_numpy(nn_vectors(images).astype(np.float32))
        theirs = torch.from_numpy(self.gallery.pixels.astype(np.float32))
        return (mine @ theirs.T).max(1).values.numpy() if len(theirs) else np.zeros(len(mine), np.float32)

    def save(self, folder: str | Path) -> None:
        """Write the folder whole or not at all: into a sibling, then renamed over it."""
        folder = Path(folder)
        temporary = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        (temporary / CONFIG).write_text(json.dumps(self.config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, temporary / WEIGHTS)
        if self.gallery is not None:
            g = self.gallery
            np.savez(temporary / GALLERY, embeddings=g.embeddings, pixels=g.pixels, patient_index=g.patient_index,
                     patients=np.asarray(g.patients, dtype=str))
        if folder.exists():
            shutil.rmtree(folder)
        temporary.rename(folder)


def is_verifier(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG).is_file() and (Path(folder) / WEIGHTS).is_file()


def load_verifier(folder: str | Path, device: str = "cpu") -> PatientVerifier:
    folder = Path(folder)
    if not is_verifier(folder):
        raise UsageError(f"{folder}: not a patient verifier (no {CONFIG} and {WEIGHTS}); train one with "
                         "`python -m lunggen_diffusers.evaluate --reid FOLDER --train ... --real ...`")
    config = json.loads((folder / CONFIG).read_text())
    net = VerifierNet(config["width"], config["dim"], config.get("in_features", 0))
    net.load_state_dict(load_file(folder / WEIGHTS))
    gallery = None
    if (folder / GALLERY).is_file():
        with np.load(folder / GALLERY) as saved:
            gallery = Gallery(saved["embeddings"], saved["pixels"], saved["patient_index"],
                              saved["patients"].tolist())
    return PatientVerifier(net, config, gallery, device)
