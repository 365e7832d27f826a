"""The denoiser, the noise schedule and the pipeline that holds them, built from the config."""

from __future__ import annotations

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from ..config import Config
from ..lunggen_pipeline import LungGenPipeline

# Fields that fix the UNet's weight shapes: resuming with any of them changed is refused.
SHAPE_FIELDS = ("resolution", "block_out_channels", "layers_per_block", "attention_resolutions", "norm_num_groups",
                "condition_on", "latent", "vae", "vae_block_out_channels", "vae_layers_per_block", "latent_channels")


def build_unet(config: Config, label_size: int | None = None,
               latent: tuple[int, int] | None = None) -> UNet2DModel | UNet2DConditionModel:
    """The plain UNet2DModel, or with `label_size` a UNet2DConditionModel of the same blocks whose class embedding
    projects the label vector (an MLP added to the timestep embedding), so the projection lives in the UNet's own
    config and weights. That embedding scales and shifts each ResNet block's normalised features (FiLM, as in
    Dhariwal & Nichol's class-conditional UNet) rather than only adding a bias: on the phantom the labels were
    followed far more closely (benchmarks/HISTORY.md). No cross-attention: a few labels need no token sequence.
    `latent` (channels, side): the UNet learns an autoencoder's latents of that shape instead of 1-channel pixels;
    `attention_resolutions` then name latent sizes."""
    m = config.model
    channels, res = latent or (1, config.data.resolution)
    sizes = [res // 2**level for level in range(len(m.block_out_channels))]
    with_attention = [size in m.attention_resolutions for size in sizes]
    blocks = dict(
        sample_size=res,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=m.layers_per_block,
        block_out_channels=tuple(m.block_out_channels),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in with_attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention)),
        norm_num_groups=m.norm_num_groups,
        dropout=m.dropout,
    )
    if label_size is None:
        return UNet2DModel(**blocks)
    return UNet2DConditionModel(
        **blocks,
        mid_block_type="UNetMidBlock2D",
        resnet_time_scale_shift="scale_shift",
        class_embed_type="projection",
        projection_class_embeddings_input_dim=label_size,
    )


def build_scheduler(config: Config) -> DDPMScheduler:
    m = config.model
    return DDPMScheduler(
        num_train_timesteps=m.ddpm_num_steps,
        beta_schedule=m.ddpm_beta_schedule,
        prediction_type=m.prediction_type,
        # Pixels live in [-1, 1], so clipping the predicted clean image there is free help; scaled latents have
        # unit variance and no such bound (clipped, the demo's latent samples came out washed out and streaked).
        clip_sample=not m.latent,
        rescale_betas_zero_snr=m.rescale_betas_zero_snr,
        # A zero-SNR schedule must be sampled from its last timestep, where the image is pure noise; diffusers'
        # default ("leading") starts short of it.
        timestep_spacing="trailing" if m.rescale_betas_zero_snr else "leading",
    )


def build_pipeline(unet, scheduler, label_config: dict | None = None, vae=None) -> DDPMPipeline | LungGenPipeline:
    """A standard DDPMPipeline, or a LungGenPipeline for a conditional model (`label_config` describes its labels)
    or a latent one (`vae` decodes its output)."""
    if label_config is None and vae is None:
        return DDPMPipeline(unet=unet, scheduler=scheduler)
    return LungGenPipeline(unet=unet, scheduler=scheduler, vae=vae, label_config=label_config)
