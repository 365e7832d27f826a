"""The latent cache: every prepared training image encoded once, so the latent stage never runs the encoder per step.

One `.npy` per (prepared data set, autoencoder weights): the key hashes the data set's fingerprint (which changes
whenever the preparation does: source, resolution, filters, cropping) with a digest of the autoencoder's config and
weights, so a retrained or swapped autoencoder, or re-prepared data, misses and is encoded afresh. It holds each
image's posterior mean and log-variance (float16, as diffusers' latent-caching examples store them); a training
step draws from that posterior with its own noise. Latents are never flipped, for the same reason pixels are not.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from ..data.decode import stored_pixels
from ..data.transforms import to_model_input
from ..lunggen_pipeline import STANDARDISATION, encode_moments, latent_shape
from ..utils import atomic_path, stable_hash, write_json

logger = logging.getLogger(__name__)
VERSION = 1  # bump when what is stored changes


def autoencoder_digest(vae: AutoencoderKL) -> str:
    """SHA-256 over the autoencoder's config and every weight, in name order: equal digests, equal encodings. The
    latent standardisation is left out: it applies when a latent is drawn, so re-measuring it re-encodes
    nothing; so are diffusers' private keys (`_name_or_path`: the same autoencoder copied elsewhere is the same)."""
    config = {k: v for k, v in dict(vae.config).items()
              if k not in STANDARDISATION and not k.startswith("_")}  # not where it was loaded from
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(dataset, vae: AutoencoderKL) -> str:
    return stable_hash({"version": VERSION, "data": dataset._fingerprint, "autoencoder": autoencoder_digest(vae)})


def cached_latents(dataset, vae: AutoencoderKL, cache_dir: Path, batch_size: int = 16,
                   progress: bool = True) -> np.ndarray:
    """(N, 2C, h, w) float16 posterior moments of `dataset`'s images, memory-mapped: read from the cache, or encoded
    now (in order, on the autoencoder's device) and written atomically. Call on one process; the others read it."""
    key = cache_key(dataset, vae)
    path = Path(cache_dir) / f"latents-{key}.npy"
    if path.exists():
        logger.info("latents of %d images from the cache (%s)", len(dataset), path.name)
        return np.load(path, mmap_mode="r")
    channels, side = latent_shape(vae, _side(dataset))
    path.parent.mkdir(parents=True, exist_ok=True)
    table = dataset.with_format("arrow", columns=["image"])
    with atomic_path(path) as temporary:
        # np.save to an open file: the name stays the temporary one until the whole array is written.
        out = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float16,
                                        shape=(len(dataset), 2 * channels, side, side))
        was_training = vae.training
        vae.eval()
        for start in tqdm(range(0, len(dataset), batch_size), desc="encode latents", disable=not progress):
            pixels = torch.from_numpy(stored_pixels(table[start:start + batch_size]["image"]))
            out[start:start + len(pixels)] = encode_moments(vae, to_model_input(pixels)).cpu().numpy()
        vae.train(was_training)
        out.flush()
        del out
    write_json(path.with_suffix(".json"), {"images": len(dataset), "shape": [2 * channels, side, side],
                                           "data_fingerprint": dataset._fingerprint, "key": key})
    logger.info("encoded %d images into %s", len(dataset), path.name)
    return np.load(path, mmap_mode="r")


def _side(dataset) -> int:
    first = stored_pixels(dataset.with_format("arrow", columns=["image"])[0:1]["image"])
    return first.shape[-1]
