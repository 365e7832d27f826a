"""The denoiser and the noise schedule, built from the config (presets live in config.py)."""

from __future__ import annotations

from diffusers import DDPMScheduler, UNet2DModel

from .config import Config

# Fields that fix the UNet's weight shapes: resuming with any of them changed is refused.
SHAPE_FIELDS = ("resolution", "block_out_channels", "layers_per_block", "attention_resolutions", "norm_num_groups")


def build_unet(config: Config) -> UNet2DModel:
    m, res = config.model, config.data.resolution
    sizes = [res // 2**level for level in range(len(m.block_out_channels))]
    with_attention = [size in m.attention_resolutions for size in sizes]
    return UNet2DModel(
        sample_size=res,
        in_channels=1,
        out_channels=1,
        layers_per_block=m.layers_per_block,
        block_out_channels=tuple(m.block_out_channels),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in with_attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention)),
        norm_num_groups=m.norm_num_groups,
        dropout=m.dropout,
    )


def build_scheduler(config: Config) -> DDPMScheduler:
    m = config.model
    return DDPMScheduler(
        num_train_timesteps=m.ddpm_num_steps,
        beta_schedule=m.ddpm_beta_schedule,
        prediction_type=m.prediction_type,
    )
