"""The latent route's autoencoder: a 1-channel diffusers `AutoencoderKL`, built from the config or loaded (a
pretrained 3-channel one too), and the measured scale of its latents. The conversions between [-1, 1] images and
the scaled latents a UNet learns live in `lunggen_pipeline.py` (encode_moments, sample_latents, decode_latents), which
every stage reads and every model ships.

A 3-channel autoencoder (Stable Diffusion's, say) sees the gray image on all three input channels, and its three
output channels are averaged back to one (`lunggen_pipeline.decode_latents`, the pipeline's own decode step). The
scale of the latents is measured on the training data (`latent_statistics`) and stored in the autoencoder's own
config (`scaling_factor`, `shift_factor`), never taken from Stable Diffusion's constant.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
from diffusers import AutoencoderKL

from ..cli import UsageError
from ..config import Config
from ..lunggen_pipeline import latent_moments


def build_autoencoder(config: Config) -> AutoencoderKL:
    """A fresh 1-channel AutoencoderKL of the config's levels. No attention in the middle blocks: at the latent
    sizes used here (32-128 px) it costs the most per step and the convolutions already see the whole chest."""
    m, levels = config.model, len(config.model.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(m.vae_block_out_channels),
        layers_per_block=m.vae_layers_per_block,
        latent_channels=m.latent_channels,
        norm_num_groups=m.vae_norm_num_groups,
        sample_size=config.data.resolution,
        mid_block_add_attention=False,
    )


def autoencoder_dir(config: Config) -> str:
    """Where this run's autoencoder comes from: --vae, or the one --stage autoencoder trains."""
    return config.model.vae or os.path.join(config.training.output_dir, "autoencoder")


def load_autoencoder(path_or_id: str, **kwargs) -> AutoencoderKL:
    """An AutoencoderKL from a folder or Hub id: its root, or its `vae/` subfolder (a whole pipeline's)."""
    local = os.path.isdir(path_or_id)
    if local and not os.path.isfile(os.path.join(path_or_id, "config.json")):
        if not os.path.isfile(os.path.join(path_or_id, "vae", "config.json")):
            raise UsageError(f"--vae {path_or_id}: no autoencoder there (expected config.json, or a vae/ "
                         "subfolder; train one with --stage autoencoder)")
        return AutoencoderKL.from_pretrained(path_or_id, subfolder="vae", **kwargs)
    try:
        return AutoencoderKL.from_pretrained(path_or_id, **kwargs)
    except OSError:
        if local:
            raise
        return AutoencoderKL.from_pretrained(path_or_id, subfolder="vae", **kwargs)


def latent_statistics(means: np.ndarray, normalization: str = "global") -> dict:
    """The autoencoder config entries that standardise the training latents. global: one scale and shift
    (Rombach et al. 2022 use 1 / std; the shift, as in SD3's autoencoder, keeps a mostly black background from
    biasing every latent). channel: each channel's own mean and std (diffusers' `latents_mean` / `latents_std`,
    as in Playground v2.5's autoencoder), so that a channel with little variance is not drowned by the noise long
    before the others."""
    means = np.asarray(means, dtype=np.float64)
    per_channel = normalization == "channel"
    axes = (0, 2, 3) if per_channel else None
    std, center = means.std(axis=axes), means.mean(axis=axes)
    if not np.isfinite(std).all() or (std == 0).any():
        raise UsageError("the autoencoder's latents of the training images are constant: it has collapsed")
    if per_channel:
        return {"scaling_factor": 1.0, "shift_factor": None, "latents_mean": center.tolist(),
                "latents_std": std.tolist()}
    return {"scaling_factor": 1.0 / float(std), "shift_factor": float(center), "latents_mean": None,
            "latents_std": None}


@torch.no_grad()
def fold_standardisation(vae: AutoencoderKL) -> AutoencoderKL:
    """A copy of `vae` whose 1x1 quant convs hold the latent standardisation (`latent_statistics`: a shift, or a
    mean and spread per channel), leaving only `scaling_factor` in its config: the autoencoder Stable Diffusion's
    pipelines expect, which decode `latents / scaling_factor` and encode to `sample * scaling_factor`. Decoding and
    encoding give what `decode_latents` and `sample_latents` give with the original."""
    folded = copy.deepcopy(vae)
    like = torch.zeros(1, vae.config.latent_channels, 1, 1)
    center, spread = (v.flatten() for v in latent_moments(vae.config, like))
    center, spread = center.expand(vae.config.latent_channels), spread.expand(vae.config.latent_channels)
    if folded.post_quant_conv is None or folded.quant_conv is None:
        raise UsageError("this autoencoder has no quant convs to hold its latent standardisation")
    post = folded.post_quant_conv  # z = u * spread + center, then the conv
    post.bias += post.weight[:, :, 0, 0] @ center
    post.weight *= spread[None, :, None, None]
    quant = folded.quant_conv  # mean -> (mean - center) / spread, log-variance -> minus 2 log spread
    channels = vae.config.latent_channels
    quant.weight[:channels] /= spread[:, None, None, None]
    quant.bias[:channels] = (quant.bias[:channels] - center) / spread
    quant.bias[channels:] -= 2 * spread.log()
    folded.register_to_config(shift_factor=None, latents_mean=None, latents_std=None)
    return folded
