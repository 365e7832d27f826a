"""Training a diffusion model: the pixel route (a UNet on the prepared images) and the latent route (the
autoencoder stage first, `autoencoder_training`, then a UNet on cached latents).

`train()` reads like diffusers' `train_unconditional.py`: build the accelerator, the data, the model and EMA, the
optimizer and schedule, then loop (`loop.fit`, shared with the autoencoder stage); the loss is a pure function.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel, compute_snr

from ..config import REPORT as REPORT_CONDITION
from ..config import Config, label_conditions
from ..data.build import build_dataset
from ..data.conditioning import label_config
from ..data.registry import cache_root
from ..data.reports import example_prompts, report_texts
from ..data.transforms import augment, to_model_input
from ..evaluation.autoencoder import REPORT
from ..generation.process import (
    DENOISING,
    TRAINING_PROGRESS,
    DenoisingRecorder,
    progress_frames,
)
from ..generation.sampling import (
    DEFAULT_SCHEDULER,
    generate,
    iter_batches,
    resolve_guidance,
)
from ..hub.export import export_pipeline
from ..lunggen_pipeline import (
    LabelSpace,
    describe_standardisation,
    latent_shape,
    sample_latents,
    tokenize,
)
from ..summaries import RunSummary
from ..utils import image_grid
from .autoencoder import autoencoder_dir, latent_statistics, load_autoencoder
from .autoencoder_stage import train_autoencoder
from .checkpoints import check_weights
from .latents import cached_latents
from .loop import (
    EMAWeights,
    Schedule,
    build_accelerator,
    build_dataloader,
    build_optimizer,
    fit,
    hardware,
    resume_point,
    start,
)
from .model import build_pipeline, build_scheduler, build_unet, stable_diffusion
from .text import TextConditionedUNet, build_text_model, token_table

logger = get_logger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    final_loss: float
    images_per_second: float  # measured after the first logging window (warm-up excluded), all processes together
    unet: UNet2DModel  # the raw (non-EMA) trained weights of this process; the export holds the EMA weights


def diffusion_loss(pred: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   noise_scheduler, prediction_type: str, snr_gamma: float | None,
                   pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's mean squared error to the target (epsilon, or v for v-prediction), in fp32, each image weighted
    by min-SNR (Hang et al. 2023) when `snr_gamma` is set: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v.
    `pixel_weight` scales each pixel's squared error (benchmarks/finding_loss_weight.py)."""
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(clean, noise, timesteps)
    error = F.mse_loss(pred.float(), target.float(), reduction="none")
    loss = (error if pixel_weight is None else error * pixel_weight).mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        snr = compute_snr(noise_scheduler, timesteps)
        loss = loss * (snr.clamp(max=snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1))
    return loss.mean()


def build_model(config: Config, labels: dict | None, latent: tuple[int, int] | None = None, text_encoder=None):
    """(model, noise_scheduler, ema or None); the UNet takes label vectors when `labels` describes them, `latent`
    (channels, side) when it learns an autoencoder's latents; with a `text_encoder` the model is the UNet and the
    encoder together (`TextConditionedUNet`)."""
    t = config.training
    unet = build_unet(config, LabelSpace(labels).size if labels else None, latent,
                      text_encoder.config.hidden_size if text_encoder is not None else None)
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if t.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    model = unet if text_encoder is None else TextConditionedUNet(unet, text_encoder)
    ema = None
    if t.use_ema:
        ema = EMAModel(
            model.parameters(),
            decay=t.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=t.ema_inv_gamma,
            power=t.ema_power,
            foreach=True,  # one multi-tensor update instead of a Python loop over every parameter
            model_cls=type(unet) if text_encoder is None else None,
            model_config=unet.config if text_encoder is None else None,
        )
    return model, build_scheduler(config), ema


def train_step(batch, unet, noise_scheduler, config: Config, aug_generator: torch.Generator,
               vae_config=None, null_tokens: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One (micro-)batch's loss: clean images (or a draw from their cached latent posterior), noise, predict.
    A text model (`unet` a `TextConditionedUNet`) reads the batch's report tokens, and `null_tokens` (the empty
    prompt's ids and mask) where the condition is dropped."""
    t, d = config.training, config.data
    if "latents" in batch:
        moments = batch["latents"]
        clean = sample_latents(moments, vae_config, torch.randn(moments[:, : moments.shape[1] // 2].shape,
                                                                 device=moments.device))
    else:
        clean = to_model_input(batch["pixel_values"])
        if d.augment:
            clean = augment(clean, aug_generator, d.augment_rotation, d.augment_scale, d.augment_intensity)
    # Noise and add_noise stay in fp32 whatever the mixed precision: low-noise timesteps need the bits.
    noise = torch.randn_like(clean)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    if t.channels_last:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    conditioning = {}
    if "class_labels" in batch or "input_ids" in batch:
        # Condition dropout to the null condition (the labels' null entry alone, the empty prompt), both together:
        # the same model then also learns the unconditional score that classifier-free guidance subtracts.
        dropped = torch.rand(len(clean), device=clean.device) < t.condition_dropout
    if "class_labels" in batch:
        labels = batch["class_labels"].to(clean.device)
        null = torch.zeros_like(labels)
        null[:, -1] = 1
        conditioning = {"encoder_hidden_states": None, "class_labels": torch.where(dropped[:, None], null, labels)}
    if "input_ids" in batch:
        conditioning.pop("encoder_hidden_states", None)
        for name, null_value in zip(("input_ids", "attention_mask"), null_tokens, strict=True):
            value = batch[name].to(clean.device)
            conditioning[name] = torch.where(dropped[:, None], null_value.to(clean.device), value)
    pred = unet(noisy, timesteps, **conditioning).sample
    return diffusion_loss(pred, clean, noise, timesteps, noise_scheduler, config.model.prediction_type, t.snr_gamma)


@dataclass
class TextParts:
    """What a text model's pipeline needs beside the trained module: its tokenizer and `prompt_config`."""

    tokenizer: object
    prompt_config: dict


def pipeline_of(model, noise_scheduler, labels: dict | None, vae=None, text: TextParts | None = None):
    """The pipeline of a trained module: the UNet alone, or a `TextConditionedUNet`'s UNet and text encoder."""
    if text is None:
        return build_pipeline(model, noise_scheduler, labels, vae)
    return build_pipeline(model.unet, noise_scheduler, labels, vae,
                          (model.text_encoder, text.tokenizer, text.prompt_config))


def preview_rows(labels: dict | None, text: TextParts | None) -> list[dict]:
    """The requests of a conditional model's preview rows: each example prompt of a text model; "No Finding",
    then each finding, of a label model."""
    if text is not None:
        return [{"prompts": prompt} for prompt in text.prompt_config["example_prompts"]]
    return [{"findings": request} for request in [[]] + [[finding] for finding in labels["findings"]]]


@torch.no_grad()
def render_samples(unet, noise_scheduler, num_images: int, steps: int, seed: int, labels: dict | None = None,
                   vae=None, text: TextParts | None = None):
    """A fixed-seed grid with the default fast sampler (seconds, where 1000 DDPM steps would take minutes).

    A conditional model's grid has one row per request (`preview_rows`) on the same seeds, so the rows differ by
    the request alone.
    """
    was_training = unet.training
    unet.eval()
    pipe = pipeline_of(unet, noise_scheduler, labels, vae, text)
    if labels is None and text is None:
        images, cols = generate(pipe, num_images, seed, DEFAULT_SCHEDULER, steps, progress=False), None
    else:
        rows = preview_rows(labels, text)
        cols = max(2, num_images // len(rows))
        images = [image for request in rows for image in generate(
            pipe, cols, seed, DEFAULT_SCHEDULER, steps, progress=False, **request)]
    unet.train(was_training)
    return image_grid(images, cols)


def export(accelerator, unet, ema, noise_scheduler, labels, config: Config, data_summary, run: RunSummary,
           vae=None, text: TextParts | None = None) -> None:
    """The EMA weights as a safetensors pipeline (with the autoencoder on the latent route, the text encoder and
    tokenizer of a text model), with its samples, manifest and model card (hub.export)."""
    t, output_dir = config.training, Path(config.training.output_dir)
    model = accelerator.unwrap_model(unet).eval()  # training is over: every sample below is drawn in eval mode
    with EMAWeights(ema, model):
        samples = render_samples(model, noise_scheduler, t.eval_batch_size, t.preview_inference_steps, t.seed, labels,
                                 vae, text)
        pipe = pipeline_of(model, noise_scheduler, labels, vae, text)
        animations = {DENOISING: record_denoising(pipe, t.preview_inference_steps, t.seed, labels, text)}
        progress = progress_frames(output_dir / "samples")
        if len(progress) > 1:
            animations[TRAINING_PROGRESS] = progress
        if vae is not None and text is not None and labels is None:
            pipe = stable_diffusion(pipe)
        export_pipeline(output_dir, pipe, samples, config, data_summary, run,
                        autoencoder_report(config) if vae is not None else None, animations,
                        text.prompt_config if text is not None else None)
    logger.info(f"exported the pipeline to {output_dir} ({run.global_step} steps, final loss {run.final_loss:.4f})")


def record_denoising(pipe, steps: int, seed: int, labels: dict | None, text: TextParts | None = None,
                     num_images: int = 2) -> list:
    """The frames of the export's denoising video: the first images of `seed` with the default sampler; a
    conditional model's take the preview rows' requests in turn, at the model's own guidance scale."""
    requests = prompts = None
    if labels is not None or text is not None:
        rows = preview_rows(labels, text)
        chosen = {i: rows[i % len(rows)] for i in range(num_images)}
        if text is not None:
            prompts = {i: row["prompts"] for i, row in chosen.items()}
        else:
            requests = {i: row["findings"] for i, row in chosen.items()}
    recorder = DenoisingRecorder(num_images)
    for _ in iter_batches(pipe, range(num_images), seed, DEFAULT_SCHEDULER, steps, num_images, progress=False,
                          labels=requests, guidance_scale=resolve_guidance(pipe, None), recorder=recorder,
                          prompts=prompts):
        pass
    return recorder.frames


def autoencoder_report(config: Config) -> dict | None:
    """The report the autoencoder stage wrote beside the autoencoder this run used, if there is one."""
    path = Path(autoencoder_dir(config)) / REPORT
    return json.loads(path.read_text()) if path.is_file() else None


def prepare_latents(config: Config, dataset, accelerator):
    """The latent route's autoencoder (on this process's device, frozen, its scale and shift measured on this
    training set) and the training set's cached posterior moments."""
    vae = load_autoencoder(autoencoder_dir(config)).to(accelerator.device).eval().requires_grad_(False)
    cache_dir = cache_root(config.data)
    if accelerator.is_main_process:
        cached_latents(dataset, vae, cache_dir, progress=accelerator.is_local_main_process)
    accelerator.wait_for_everyone()
    moments = cached_latents(dataset, vae, cache_dir, progress=False)
    means = moments[: min(len(moments), 4096), : moments.shape[1] // 2]
    vae.register_to_config(**latent_statistics(means, config.model.latent_normalization))
    logger.info(f"latents {tuple(moments.shape[1:])} per image, standardised on the training set "
                f"{describe_standardisation(vae.config)}")
    return vae, moments


def prepare_text(config: Config, dataset, labels: dict | None):
    """A text model's parts: (TextParts, the text encoder, the training reports' token table, the empty prompt's
    tokens). The tokenizer made from scratch learns from the training reports alone."""
    d = config.data
    reports, source = report_texts(dataset, d.caption_column, not (d.train_data_dir or d.dataset_name))
    tokenizer, text_encoder, trained = build_text_model(config, reports)
    empty = tokenize(tokenizer, [""])
    prompt_config = {"guidance_scale": config.training.guidance_scale, "text_source": source,
                     "max_length": tokenizer.model_max_length, "text_encoder_trained": trained,
                     "example_prompts": example_prompts(source, labels["findings"] if labels else
                                                        sorted({f for row in dataset["finding_labels"] for f in row}
                                                               - {"No Finding"}))}
    logger.info(f"text: {len(reports)} {source}, {type(text_encoder).__name__} "
                f"({sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M parameters, "
                f"{'trained' if trained else 'frozen'}), {len(tokenizer)} tokens, "
                f"{tokenizer.model_max_length} a prompt")
    return (TextParts(tokenizer, prompt_config), text_encoder, token_table(tokenizer, reports),
            (empty.input_ids[0], empty.attention_mask[0]))


def train(config: Config) -> TrainResult | None:
    """Train, checkpoint and export a DDPMPipeline (a LungGenPipeline when conditioned or latent) to `output_dir`;
    on the latent route the autoencoder stage runs first (`--stage`), and `--stage autoencoder` stops after it
    (returning None)."""
    t, start_time, output_dir = config.training, time.time(), Path(config.training.output_dir)
    if config.model.latent and t.stage in ("all", "autoencoder"):
        train_autoencoder(config)
        if t.stage == "autoencoder":
            return None
    accelerator = build_accelerator(config)
    resume_from = resume_point(config)
    with accelerator.main_process_first():
        dataset, data_summary = build_dataset(config)
    vae = moments = None
    if config.model.latent:
        vae, moments = prepare_latents(config, dataset, accelerator)
    on_labels = label_conditions(config)
    labels = label_config(dataset, on_labels, t.guidance_scale) if on_labels else None
    set_seed(t.seed)  # same initial weights on every process
    text = text_encoder = tokens = null_tokens = None
    if REPORT_CONDITION in (config.data.condition_on or []):
        text, text_encoder, tokens, null_tokens = prepare_text(config, dataset, labels)
    unet, noise_scheduler, ema = build_model(config, labels,
                                             latent_shape(vae, config.data.resolution) if vae is not None else None,
                                             text_encoder)
    dataloader = accelerator.prepare(build_dataloader(dataset, labels, config, accelerator, moments, tokens))
    schedule = Schedule.of(len(dataloader), config, accelerator.num_processes)
    optimizer, lr_scheduler = build_optimizer(unet, schedule, config, accelerator)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if resume_from is not None:
        check_weights(resume_from, unet)  # the prepared model, as save_state wrote it (before any compile)
    set_seed(t.seed, device_specific=True)  # each process draws its own noise; the data order stays shared
    if t.torch_compile:
        unet = torch.compile(unet)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    global_step = start(accelerator, resume_from, config, "lunggen")
    logger.info(f"{len(dataset)} images from {data_summary.source}; {schedule.max_steps} steps of "
                f"{schedule.images_per_step} images on {accelerator.num_processes} process(es), {accelerator.device}, "
                f"precision {t.mixed_precision}" + (f", conditioned on {', '.join(config.data.condition_on)}"
                                                    if config.data.condition_on else "")
                + (", on latents" if vae is not None else ""))
    # The global CPU generator (seeded per process above): its state is in every checkpoint, so a resumed
    # --augment run draws the augmentations the uninterrupted run would have drawn.
    aug_generator = torch.default_generator
    vae_config = vae.config if vae is not None else None

    def step_fn(batch):
        return train_step(batch, unet, noise_scheduler, config, aug_generator, vae_config, null_tokens)

    def preview(step):
        model = accelerator.unwrap_model(unet)
        with EMAWeights(ema, model):
            return render_samples(model, noise_scheduler, t.eval_batch_size, t.preview_inference_steps, t.seed,
                                  labels, vae, text)

    global_step, last_loss, meter = fit(accelerator, unet, ema, dataloader, schedule, optimizer, lr_scheduler, config,
                                        global_step, step_fn, preview)
    if accelerator.is_main_process:
        run = RunSummary(global_step, last_loss, round(time.time() - start_time, 1), hardware(accelerator))
        export(accelerator, unet, ema, noise_scheduler, labels, config, data_summary, run, vae, text)
    accelerator.end_training()
    return TrainResult(output_dir, global_step, last_loss, meter.images_per_second, accelerator.unwrap_model(unet))
