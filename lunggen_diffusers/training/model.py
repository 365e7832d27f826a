"""The denoiser, the noise schedule and the pipeline that holds them, built from the config."""

from __future__ import annotations

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from ..cli import UsageError
from ..config import Config
from ..lunggen_pipeline import LungGenPipeline

# Fields that fix the UNet's weight shapes: resuming with any of them changed is refused.
SHAPE_FIELDS = ("resolution", "block_out_channels", "layers_per_block", "attention_resolutions", "norm_num_groups",
                "condition_on", "latent", "vae", "vae_block_out_channels", "vae_layers_per_block", "latent_channels",
                "text_encoder", "text_encoder_hidden_size", "text_encoder_layers", "tokenizer_vocab_size")


def build_unet(config: Config, label_size: int | None = None, latent: tuple[int, int] | None = None,
               text_size: int | None = None) -> UNet2DModel | UNet2DConditionModel:
    """The plain UNet2DModel, or with `label_size` a UNet2DConditionModel of the same blocks whose class embedding
    projects the label vector (an MLP added to the timestep embedding), so the projection lives in the UNet's own
    config and weights. That embedding scales and shifts each ResNet block's normalised features (FiLM, as in
    Dhariwal & Nichol's class-conditional UNet) rather than only adding a bias: on the phantom the labels were
    followed far more closely (benchmarks/HISTORY.md). No cross-attention: a few labels need no token sequence.
    `latent` (channels, side): the UNet learns an autoencoder's latents of that shape instead of 1-channel pixels;
    `attention_resolutions` then name latent sizes.
    `text_size`: a text model; the blocks at `attention_resolutions` and the middle one cross-attend to a text
    encoder's hidden states of that width (Stable Diffusion's blocks), with a head per 32 channels, and their
    attention-pooled summary joins the timestep embedding."""
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
    if label_size is None and text_size is None:
        return UNet2DModel(**blocks)
    labels = {} if label_size is None else {"class_embed_type": "projection",
                                            "projection_class_embeddings_input_dim": label_size}
    if text_size is None:
        return UNet2DConditionModel(**blocks, mid_block_type="UNetMidBlock2D", resnet_time_scale_shift="scale_shift",
                                    **labels)
    blocks["down_block_types"] = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in with_attention)
    blocks["up_block_types"] = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention))
    # The report also reaches every ResNet block as the labels do: attention-pooled into the timestep embedding
    # (diffusers' "text" addition embedding, as Kandinsky's UNet). With cross-attention alone (the 8x8 middle block)
    # the demo drew the heart as asked but effusion and consolidation no more than unprompted (benchmarks/HISTORY.md).
    return UNet2DConditionModel(**blocks, mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=text_size,
                                attention_head_dim=tuple(max(1, c // 32) for c in m.block_out_channels),
                                addition_embed_type="text", addition_embed_type_num_heads=max(1, text_size // 32),
                                resnet_time_scale_shift="scale_shift", **labels)


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


def build_pipeline(unet, scheduler, label_config: dict | None = None, vae=None, text=None
                   ) -> DDPMPipeline | LungGenPipeline:
    """A standard DDPMPipeline, or a LungGenPipeline for a conditional model (`label_config` describes its labels;
    `text` is a text model's (text_encoder, tokenizer, prompt_config)) or a latent one (`vae` decodes its output)."""
    if label_config is None and vae is None and text is None:
        return DDPMPipeline(unet=unet, scheduler=scheduler)
    text_encoder, tokenizer, prompt_config = text or (None, None, None)
    return LungGenPipeline(unet=unet, scheduler=scheduler, vae=vae, label_config=label_config,
                           text_encoder=text_encoder, tokenizer=tokenizer, prompt_config=prompt_config)


def stable_diffusion(pipe: LungGenPipeline):
    """A latent text model (no labels) as a stock `StableDiffusionPipeline`, RoentGen's format: the same UNet, text
    encoder, tokenizer and scheduler, the autoencoder with its latent standardisation folded in
    (`fold_standardisation`), no safety checker. It loads with `StableDiffusionPipeline.from_pretrained` and
    `DiffusionPipeline.from_pretrained` without remote code and draws what the LungGenPipeline draws."""
    # Imported here: the Stable Diffusion module imports transformers' image processors, which warn on stderr at
    # import when torchvision is absent.
    from diffusers import StableDiffusionPipeline

    from .autoencoder import fold_standardisation

    if pipe.vae is None or pipe.text_encoder is None or pipe.labels is not None:
        raise UsageError("only a latent text model without labels is a Stable Diffusion pipeline")
    # Stable Diffusion's pipeline rewrites a scheduler config whose steps_offset is not 1 (with a deprecation
    # warning every load): it is set here, once, so the folder is what the stock class expects.
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, steps_offset=1)
    return StableDiffusionPipeline(vae=fold_standardisation(pipe.vae), text_encoder=pipe.text_encoder,
                                   tokenizer=pipe.tokenizer, unet=pipe.unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
