"""Judging an autoencoder before anything is trained on it: its reconstructions are the best a latent model can do,
and a finding it loses is a finding the generator can never draw.

On held-out patients (the phantom: a seed no model trains on, each finding in half the images; a real source: its
validation split) it measures PSNR, SSIM and MS-SSIM, the Fréchet distance of reconstructions to originals on
features that see anatomy beside the real-vs-real floor at the same size, and on the phantom whether the phantom
classifier decides every finding and the heart's side alike on an image and its reconstruction (goal: >= 0.95 of
images each), and how much of a nodule's own contrast survives at the training resolution.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..cli import UsageError
from ..config import Config
from ..data.build import build_dataset
from ..data.decode import stored_pixels
from ..data.phantom import draw_phantom
from ..data.transforms import to_model_input
from ..lunggen_pipeline import (
    decode_latents,
    describe_standardisation,
    encode_moments,
    latent_shape,
    sample_latents,
)
from ..utils import image_grid, markdown_table, write_json
from .features import Extractor, get_extractor
from .metrics import frechet_distance, ms_ssim
from .phantom_classifier import BINARY_OUTPUTS, PhantomClassifier, load_classifier

# Phantoms no generator or instrument trains on (the demo trains on seed 0, the sampler benchmark holds out 12345,
# the classifier trains on 7,340,033).
HELD_OUT_SEED = 424_242
GOAL_AGREEMENT = 0.95
REPORT, REPORT_MD, RECONSTRUCTIONS = "report.json", "report.md", "reconstructions.png"


def is_phantom(config: Config) -> bool:
    return not (config.data.dataset_name or config.data.train_data_dir)


def held_out_images(config: Config, num_images: int) -> tuple[np.ndarray, str]:
    """uint8 (N, H, W) images of patients the training split never holds, and where they came from."""
    res = config.data.resolution
    if is_phantom(config):
        images = [draw_phantom(HELD_OUT_SEED, i, res, 0.5)[0] for i in range(num_images)]
        return np.stack(images), f"{num_images} held-out phantoms (seed {HELD_OUT_SEED}, each finding in half)"
    held_out = dataclasses.replace(config, data=dataclasses.replace(config.data, split="validation",
                                                                    max_train_samples=None))
    dataset, summary = build_dataset(held_out)
    n = min(num_images, len(dataset))
    pick = np.sort(np.random.default_rng(0).choice(len(dataset), n, replace=False))
    cells = dataset.with_format("arrow", columns=["image"])[pick.tolist()]["image"]
    return stored_pixels(cells), f"{n} images of the validation split's patients ({summary.source})"


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """uint8 (N, H, W) -> their reconstructions through the posterior's mean, uint8 (N, H, W)."""
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_input(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])))
        z = sample_latents(encode_moments(vae, x), vae.config)
        y = decode_latents(vae, z.to(vae.device)).float().cpu()
        out.append(((y[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy())
    return np.concatenate(out)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image, in dB, for uint8 images (peak 255); identical images give 100 (not infinity)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean((1, 2))
    return np.where(mse > 0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12)), 100.0)


def nodule_retention(vae, resolution: int, num_images: int = 32) -> float:
    """Median share of a nodule's own contrast (the same phantom drawn with and without it) that survives the
    autoencoder, over the nodule's pixels: 1 = kept as drawn, 0 = erased."""
    with_nodule, without = [], []
    index = 0
    while len(with_nodule) < num_images:
        image, findings, _ = draw_phantom(HELD_OUT_SEED + 1, index, resolution, 0.5)
        if "nodule" in findings:
            with_nodule.append(image)
            without.append(draw_phantom(HELD_OUT_SEED + 1, index, resolution, 0.5, without=("nodule",))[0])
        index += 1
    a, b = np.stack(with_nodule), np.stack(without)
    ra, rb = reconstruct(vae, a), reconstruct(vae, b)
    drawn = a.astype(np.float64) - b
    kept = ra.astype(np.float64) - rb
    shares = []
    for d, k in zip(drawn, kept, strict=True):
        mask = np.abs(d) >= 0.5 * np.abs(d).max()
        shares.append(float((k[mask] * np.sign(d[mask])).sum() / np.abs(d[mask]).sum()))
    return float(np.median(shares))


def judge(vae, config: Config, num_images: int = 256, extractor: Extractor | None = None,
          classifier: PhantomClassifier | None = None, progress: bool = True) -> tuple[dict, Image.Image]:
    """The report (a dict) and a grid of held-out originals over their reconstructions. On the phantom the
    classifier defaults to the cached one (trained once, a few minutes) and is also the feature extractor; on real
    data the extractor defaults to RAD-DINO."""
    images, where = held_out_images(config, num_images)
    if len(images) < 4:
        raise UsageError(f"{len(images)} held-out images are too few to judge an autoencoder (need >= 4)")
    recon = reconstruct(vae, images)
    phantom = is_phantom(config)
    if phantom and classifier is None:
        classifier = load_classifier(progress=progress)
    if extractor is None:
        extractor = (Extractor("phantom", classifier.identity, classifier.description, classifier.features)
                     if phantom else get_extractor("raddino", device=str(vae.device)))
    half = len(images) // 2
    f_orig, f_recon = extractor.embed(images), extractor.embed(recon)
    fd = frechet_distance(f_recon[:half], f_orig[half:2 * half])
    floor = frechet_distance(f_orig[:half], f_orig[half:2 * half])
    values = psnr(images, recon)
    report = {
        "held_out": where,
        "num_images": int(len(images)),
        "resolution": int(images.shape[-1]),
        "latent_shape": list(latent_shape(vae, int(images.shape[-1]))),
        "standardisation": describe_standardisation(vae.config),
        "psnr_db": float(values.mean()),
        "psnr_db_p5": float(np.percentile(values, 5)),
        "ssim": float(ms_ssim(images, recon, scales=1).mean()),
        "ms_ssim": float(ms_ssim(images, recon).mean()),
        "features": extractor.description,
        "fd_reconstructions": fd,
        "fd_floor": floor,
        "fd_ratio": fd / floor if floor > 0 else float("inf"),
    }
    if classifier is not None:
        before, after = classifier.predict(images) >= 0.5, classifier.predict(recon) >= 0.5
        agreement = {name: float((before[:, i] == after[:, i]).mean()) for i, name in enumerate(BINARY_OUTPUTS)}
        report["agreement"] = agreement
        report["positives"] = {name: int(before[:, i].sum()) for i, name in enumerate(BINARY_OUTPUTS)}
        report["nodule_retention"] = nodule_retention(vae, int(images.shape[-1]))
        report["goal_agreement"] = GOAL_AGREEMENT
        report["meets_goal"] = all(v >= GOAL_AGREEMENT for v in agreement.values())
    grid = image_grid([Image.fromarray(x) for x in (*images[:8], *recon[:8])], cols=min(8, len(images)))
    return report, grid


def markdown(report: dict) -> str:
    rows = [("held-out images", report["held_out"]),
            ("latent (channels, side)", f"{report['latent_shape'][0]} x {report['latent_shape'][1]}^2 at "
                                        f"{report['resolution']} px"),
            ("latents standardised (measured on the training set)", report["standardisation"]),
            ("PSNR (mean / 5th percentile)", f"{report['psnr_db']:.2f} / {report['psnr_db_p5']:.2f} dB"),
            ("SSIM / MS-SSIM", f"{report['ssim']:.4f} / {report['ms_ssim']:.4f}"),
            ("FD reconstructions vs originals / real-real floor",
             f"{report['fd_reconstructions']:.4g} / {report['fd_floor']:.4g} ({report['fd_ratio']:.2f}x)")]
    text = "# Autoencoder report\n\n" + markdown_table(("measure", "value"), rows) + \
        f"\n\nFeatures: {report['features']}.\n"
    if "agreement" in report:
        rows = [(name, report["positives"][name], f"{report['agreement'][name]:.3f}",
                 "yes" if report["agreement"][name] >= report["goal_agreement"] else "**no**")
                for name in BINARY_OUTPUTS]
        text += ("\n## Findings kept (phantom classifier, original vs reconstruction)\n\n"
                 + markdown_table(("output", "positive originals", "agreement", f">= {report['goal_agreement']}"),
                                  rows)
                 + f"\n\nA nodule keeps {report['nodule_retention']:.2f} of its own contrast (median over 32 "
                   "phantoms drawn with and without it).\n")
    return text


def write_report(folder: str | Path, report: dict, grid: Image.Image) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / REPORT, report)
    (folder / REPORT_MD).write_text(markdown(report))
    grid.save(folder / RECONSTRUCTIONS)
