"""The latent route's first stage: train the 1-channel AutoencoderKL on the prepared images, with the same config,
Accelerate loop, atomic checkpoints and exact resume as the diffusion stage (`loop.fit`), then measure its latent
scale on the training set and judge it on held-out patients (`evaluation.autoencoder`).

Everything goes to OUTPUT_DIR/autoencoder: the autoencoder itself (`config.json` +
`diffusion_pytorch_model.safetensors`: the trained weights, no EMA), `report.json` / `report.md`,
`reconstructions.png`, `training_config.json`, `checkpoint-*/`. Loss: L1, a (1 - SSIM) term and a KL term of
weight `vae_kl_weight`, on random crops with `--vae_crop_size` (benchmarks/HISTORY.md, "Autoencoder", measures each
choice; it also says why no perceptual or adversarial term).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from PIL import Image

from ..config import Config
from ..data.build import build_dataset
from ..data.decode import stored_pixels
from ..data.transforms import augment, to_model_input
from ..evaluation.autoencoder import judge, write_report
from ..evaluation.metrics import ssim
from ..lunggen_pipeline import decode_latents, encode_moments, sample_latents
from ..utils import image_grid
from .autoencoder import build_autoencoder, latent_statistics, load_autoencoder
from .checkpoints import check_weights
from .loop import (
    Schedule,
    build_accelerator,
    build_dataloader,
    build_optimizer,
    fit,
    resume_point,
    start,
)

logger = get_logger(__name__)
STAGE_DIR = "autoencoder"


class Reconstruction(torch.nn.Module):
    """The autoencoder's training forward as one module, so Accelerate's wrappers (DDP) see the whole pass:
    image -> posterior -> a draw -> reconstruction, and the KL of the posterior to N(0, I) per image."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images.expand(-1, self.vae.config.in_channels, -1, -1)).latent_dist
        return self.vae.decode(posterior.sample()).sample.mean(1, keepdim=True), posterior.kl()


def stage_config(config: Config) -> Config:
    """The autoencoder stage's view of the config: its own folder, steps, batch size and learning rate, no EMA; a
    --resume_from_checkpoint folder of the other stage means `latest` here."""
    t = config.training
    folder = Path(t.output_dir) / STAGE_DIR
    resume = t.resume_from_checkpoint
    if resume and resume != "latest" and Path(resume).resolve().parent != folder.resolve():
        resume = "latest"
    return dataclasses.replace(config, training=dataclasses.replace(
        t, output_dir=str(folder), max_train_steps=t.vae_max_train_steps, train_batch_size=t.vae_train_batch_size,
        learning_rate=t.vae_learning_rate, use_ema=False, stage="autoencoder", resume_from_checkpoint=resume))


def is_trained(folder: Path) -> bool:
    return (folder / "diffusion_pytorch_model.safetensors").is_file() and (folder / "report.json").is_file()


def random_crops(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """One random size x size window of each image (from the global generator: a resumed run draws the same ones);
    shifted, never flipped."""
    if size is None or size == images.shape[-1]:
        return images
    corners = torch.randint(0, images.shape[-1] - size + 1, (len(images), 2))
    return torch.stack([image[:, y:y + size, x:x + size]
                        for image, (y, x) in zip(images, corners.tolist(), strict=True)])


def reconstruction_loss(model: Reconstruction, images: torch.Tensor, kl_weight: float,
                        ssim_weight: float = 0.0) -> torch.Tensor:
    """L1 + ssim_weight * (1 - SSIM) + kl_weight * KL, the batch's mean, in fp32."""
    reconstruction, kl = model(images)
    reconstruction = reconstruction.float()
    loss = (reconstruction - images).abs().mean() + kl_weight * kl.float().mean()
    if ssim_weight:
        loss = loss + ssim_weight * (1 - ssim(reconstruction, images).mean())
    return loss


@torch.no_grad()
def preview_grid(vae, pixels: torch.Tensor) -> Image.Image:
    """Originals (top row) over their reconstructions through the posterior mean."""
    was_training = vae.training
    vae.eval()
    x = to_model_input(pixels).to(vae.device)
    y = decode_latents(vae, sample_latents(encode_moments(vae, x), vae.config))
    vae.train(was_training)
    both = torch.cat([x, y.float().clamp(-1, 1)])[:, 0].add(1).mul(127.5).round().byte().cpu().numpy()
    return image_grid([Image.fromarray(a) for a in both], cols=len(pixels))


def measure_scale(vae, dataset, normalization: str = "global", num_images: int = 1024, batch_size: int = 16) -> dict:
    """The latent standardisation (`latent_statistics`) on up to `num_images` training images, for the
    autoencoder's config."""
    table = dataset.with_format("arrow", columns=["image"])
    means = []
    for first in range(0, min(num_images, len(dataset)), batch_size):
        pixels = torch.from_numpy(stored_pixels(table[first:first + batch_size]["image"]))
        means.append(encode_moments(vae, to_model_input(pixels)).chunk(2, dim=1)[0].cpu())
    return latent_statistics(torch.cat(means).numpy(), normalization)


def judge_and_save(vae, config: Config, folder: Path, dataset) -> dict:
    """Measure the scale on the training set, save the autoencoder with it, and write its report beside it."""
    vae.eval()
    vae.register_to_config(**measure_scale(vae, dataset, config.model.latent_normalization))
    vae.save_pretrained(folder, safe_serialization=True)
    report, grid = judge(vae, config)
    write_report(folder, report, grid)
    logger.info(f"autoencoder report: PSNR {report['psnr_db']:.2f} dB, MS-SSIM {report['ms_ssim']:.4f}, FD ratio "
                f"{report['fd_ratio']:.2f}" + (f", findings kept: {report['agreement']}" if "agreement" in report
                                               else "") + f" ({folder / 'report.md'})")
    return report


def train_autoencoder(config: Config) -> Path:
    """Train (or, with --vae and --stage all, only judge) the autoencoder into OUTPUT_DIR/autoencoder; a finished
    one there is kept. Returns the folder."""
    stage = stage_config(config)
    t, folder = stage.training, Path(stage.training.output_dir)
    if is_trained(folder):
        logger.info(f"{folder} holds a trained, judged autoencoder: kept (delete it, or run --stage autoencoder, to "
                    "train again)")
        return folder
    accelerator = build_accelerator(stage)
    with accelerator.main_process_first():
        dataset, _ = build_dataset(stage)
    if config.model.vae and config.training.stage == "all":  # a pretrained autoencoder: judged, not trained
        if accelerator.is_main_process:
            judge_and_save(load_autoencoder(config.model.vae).to(accelerator.device), stage, folder, dataset)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return folder
    start_time, resume_from = time.time(), resume_point(stage)
    set_seed(t.seed)
    vae = load_autoencoder(config.model.vae) if config.model.vae else build_autoencoder(stage)
    model = Reconstruction(vae)
    dataloader = accelerator.prepare(build_dataloader(dataset, None, stage, accelerator))
    schedule = Schedule.of(len(dataloader), stage, accelerator.num_processes)
    optimizer, lr_scheduler = build_optimizer(model, schedule, stage, accelerator)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if resume_from is not None:
        check_weights(resume_from, model)
    set_seed(t.seed, device_specific=True)
    global_step = start(accelerator, resume_from, stage, "lunggen-autoencoder")
    logger.info(f"autoencoder: {len(dataset)} images, {schedule.max_steps} steps of {schedule.images_per_step} on "
                f"{accelerator.num_processes} process(es), {accelerator.device}")
    d = stage.data
    fixed = torch.from_numpy(stored_pixels(dataset.with_format("arrow", columns=["image"])[:8]["image"]))

    def step_fn(batch):
        images = to_model_input(batch["pixel_values"])
        if d.augment:
            images = augment(images, torch.default_generator, d.augment_rotation, d.augment_scale,
                             d.augment_intensity)
        return reconstruction_loss(model, random_crops(images, t.vae_crop_size), t.vae_kl_weight,
                                   t.vae_ssim_weight)

    def preview(step):
        return preview_grid(accelerator.unwrap_model(model).vae, fixed)

    global_step, last_loss, _ = fit(accelerator, model, None, dataloader, schedule, optimizer, lr_scheduler, stage,
                                    global_step, step_fn, preview, desc="autoencoder")
    if accelerator.is_main_process:
        judge_and_save(accelerator.unwrap_model(model).vae, stage, folder, dataset)
        logger.info(f"autoencoder: {global_step} steps in {time.time() - start_time:.0f} s, final L1+KL loss "
                    f"{last_loss:.4f}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.free_memory()
    return folder
