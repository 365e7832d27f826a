"""The Accelerate training loop: loss, EMA, atomic checkpoints, exact resume, previews, export.

`train()` reads like diffusers' `train_unconditional.py`: build the accelerator, the data, the model and EMA, the
optimizer and schedule, then loop; each of those is a named step below, and the loss is a pure function.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from .checkpoints import (
    check_compatible,
    check_weights,
    checkpoint_step,
    find_checkpoint,
    list_checkpoints,
    save_checkpoint,
)
from .conditioning import condition_vectors, label_config
from .config import Config, save_config
from .data.build import build_dataset
from .data.decode import stored_pixels
from .data.transforms import augment, to_model_input
from .hub.export import export_pipeline
from .lunggen_pipeline import LabelSpace
from .model import build_pipeline, build_scheduler, build_unet
from .runtime import check_world_size, keep_freed_memory, set_cpu_threads
from .sampling import DEFAULT_SCHEDULER, generate, make_scheduler
from .summaries import RunSummary
from .utils import image_grid

logger = get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    final_loss: float
    images_per_second: float  # measured after the first logging window (warm-up excluded), all processes together
    unet: UNet2DModel  # the raw (non-EMA) trained weights of this process; the export holds the EMA weights


@dataclass
class Schedule:
    """How many optimizer steps an epoch holds and the run takes, from the data size and the launch."""

    updates_per_epoch: int
    max_steps: int
    num_epochs: int
    images_per_step: int  # all processes, all accumulated batches

    @classmethod
    def of(cls, num_images: int, config: Config, num_processes: int) -> Schedule:
        t = config.training
        per_step = t.train_batch_size * num_processes
        updates_per_epoch = math.ceil(math.ceil(num_images / per_step) / t.gradient_accumulation_steps)
        max_steps = t.max_train_steps or t.num_epochs * updates_per_epoch
        return cls(updates_per_epoch, max_steps, math.ceil(max_steps / updates_per_epoch),
                   per_step * t.gradient_accumulation_steps)


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


class LossMeter:
    """The loss summed on the device between reads, and images per second between reads.

    Reading syncs with the device (`.item()`), so it happens every logging_steps, not every step; that is also
    where a non-finite loss stops the run. The first window (warm-up, heap growth) is left out of the overall rate.
    """

    def __init__(self, device, step: int, images_per_step: int):
        self.total, self.start, self.images_per_step = torch.zeros((), device=device), step, images_per_step
        self.first = self.last = None  # (time, step) of the first and the latest read

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach()

    def read(self, accelerator: Accelerator, step: int, output_dir: Path) -> dict[str, float]:
        mean = accelerator.reduce(self.total, reduction="mean").item() / max(step - self.start, 1)
        if not math.isfinite(mean):
            good = list_checkpoints(output_dir)
            raise NonFiniteLossError(
                f"the loss became {mean} between steps {self.start + 1} and {step}; stopped. "
                + (f"The last good checkpoint is {good[-1].name}." if good else "No checkpoint was written yet.")
            )
        now, logs = time.perf_counter(), {"loss": mean}
        if self.last is not None:
            logs["images_per_second"] = (step - self.start) * self.images_per_step / (now - self.last[0])
        self.first, self.last = self.first or (now, step), (now, step)
        self.total, self.start = torch.zeros_like(self.total), step
        return logs

    @property
    def images_per_second(self) -> float:
        if self.first is None or self.last[1] <= self.first[1]:
            return float("nan")
        return (self.last[1] - self.first[1]) * self.images_per_step / (self.last[0] - self.first[0])


def build_accelerator(config: Config) -> Accelerator:
    """The Accelerator, checked against the launcher, with the run's config saved and the device tuned."""
    t = config.training
    output_dir = Path(t.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        log_with=None if t.logger == "none" else t.logger,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / t.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=t.seed),
    )
    check_world_size(accelerator)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "training_config.json")
    if accelerator.device.type == "cpu":
        set_cpu_threads(t.cpu_threads, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
        keep_freed_memory()
    if accelerator.device.type == "cuda" and t.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def resume_point(config: Config) -> Path | None:
    """The checkpoint to resume from, checked against the config; None starts a new run."""
    spec = config.training.resume_from_checkpoint
    if not spec:
        return None
    found = find_checkpoint(Path(config.training.output_dir), spec)
    if found is None:
        logger.info(f"no checkpoint in {config.training.output_dir} yet: starting a new run")
    else:
        check_compatible(found, config)
    return found


def build_model(config: Config, labels: dict | None):
    """(unet, noise_scheduler, ema or None); the UNet takes label vectors when `labels` describes them."""
    t = config.training
    unet = build_unet(config, LabelSpace(labels).size if labels else None)
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if t.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    ema = None
    if t.use_ema:
        ema = EMAModel(
            unet.parameters(),
            decay=t.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=t.ema_inv_gamma,
            power=t.ema_power,
            foreach=True,  # one multi-tensor update instead of a Python loop over every parameter
            model_cls=type(unet),
            model_config=unet.config,
        )
    return unet, build_scheduler(config), ema


class _WholeBatches(torch.utils.data.Dataset):
    """A batch as one Arrow `take` of the stored PNG bytes, decoded to uint8 here (in the DataLoader workers with
    --dataloader_num_workers). datasets' formatter would decode row by row into PIL images and the default collate
    would split a batch into rows and stack them again: slow enough to show next to a small model."""

    def __init__(self, dataset, labels: np.ndarray | None = None):
        self.table = dataset.with_format("arrow", columns=["image"])
        self.labels = labels

    def __len__(self) -> int:
        return len(self.table)

    def __getitems__(self, indices: list[int]) -> dict:
        batch = {"pixel_values": torch.from_numpy(stored_pixels(self.table[indices]["image"]))}
        if self.labels is not None:
            batch["class_labels"] = torch.from_numpy(self.labels[indices])
        return batch


def _as_is(batch):
    return batch


def build_dataloader(dataset, labels: dict | None, config: Config, accelerator: Accelerator):
    t = config.training
    return torch.utils.data.DataLoader(
        _WholeBatches(dataset, condition_vectors(dataset, labels) if labels else None),
        batch_size=t.train_batch_size,
        collate_fn=_as_is,
        shuffle=True,
        num_workers=t.dataloader_num_workers,
        drop_last=len(dataset) >= t.train_batch_size * accelerator.num_processes,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=t.dataloader_num_workers > 0,
        # Its own generator: otherwise starting an epoch's iterator draws from the global RNG, and a resumed run
        # (which starts an iterator at a different moment) would see different noise from then on.
        generator=torch.Generator().manual_seed(t.seed),
    )


def build_optimizer(unet, schedule: Schedule, config: Config, accelerator: Accelerator):
    t = config.training
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
        fused=t.use_fused_adam and accelerator.device.type == "cuda",
    )
    # The prepared scheduler steps once per process per optimizer step, hence the num_processes factors.
    lr_scheduler = get_scheduler(
        t.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=t.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=schedule.max_steps * accelerator.num_processes,
    )
    return optimizer, lr_scheduler


def train_step(batch, unet, noise_scheduler, optimizer, lr_scheduler, accelerator, config: Config,
               aug_generator: torch.Generator) -> torch.Tensor:
    """One (micro-)batch: noise, predict, loss, backward; the optimizer steps when accumulation says so."""
    t, d = config.training, config.data
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
    if "class_labels" in batch:
        # Condition dropout to the null condition (only its last entry set): the same model then also learns the
        # unconditional score that classifier-free guidance subtracts.
        labels = batch["class_labels"].to(clean.device)
        null = torch.zeros_like(labels)
        null[:, -1] = 1
        dropped = torch.rand(len(labels), device=clean.device) < t.condition_dropout
        conditioning = {"encoder_hidden_states": None,
                        "class_labels": torch.where(dropped[:, None], null, labels)}
    with accelerator.accumulate(unet):
        pred = unet(noisy, timesteps, **conditioning).sample
        loss = diffusion_loss(pred, clean, noise, timesteps, noise_scheduler, config.model.prediction_type,
                              t.snr_gamma)
        accelerator.backward(loss)
        if accelerator.sync_gradients and t.max_grad_norm > 0:
            accelerator.clip_grad_norm_(unet.parameters(), t.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss


class _EMAWeights:
    """Temporarily swap the EMA weights into the model (previews, export)."""

    def __init__(self, ema: EMAModel | None, model: torch.nn.Module):
        self.ema, self.model = ema, model

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())
        return self.model

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.model.parameters())


@torch.no_grad()
def render_samples(unet, noise_scheduler, num_images: int, steps: int, seed: int, labels: dict | None = None):
    """A fixed-seed grid with the default fast sampler (seconds, where 1000 DDPM steps would take minutes).

    A conditional model's grid has one row per finding ("No Finding" first) on the same seeds, so the rows differ
    by the request alone.
    """
    was_training = unet.training
    unet.eval()
    pipe = build_pipeline(unet, make_scheduler(DEFAULT_SCHEDULER, noise_scheduler.config), labels)
    pipe.set_progress_bar_config(disable=True)
    if labels is None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        images = pipe(batch_size=num_images, generator=generator, num_inference_steps=steps).images
        cols = None
    else:
        rows = [[]] + [[finding] for finding in labels["findings"]]
        cols = max(2, num_images // len(rows))
        images = [image for request in rows for image in generate(
            pipe, cols, seed, DEFAULT_SCHEDULER, steps, progress=False, findings=request)]
    unet.train(was_training)
    return image_grid(images, cols)


def _tracker_config(config: Config) -> dict:
    # TensorBoard's hparams take scalars and strings only.
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}


def _hardware(accelerator: Accelerator) -> str:
    n = accelerator.num_processes
    if accelerator.device.type == "cuda":
        return f"{n} x {torch.cuda.get_device_name(accelerator.device)}"
    return f"{n} process(es) on CPU ({platform.machine()}, {os.cpu_count()} cores)"


def export(accelerator, unet, ema, noise_scheduler, labels, config: Config, data_summary, run: RunSummary) -> None:
    """The EMA weights as a safetensors pipeline, with its samples, manifest and model card (hub.export)."""
    t, output_dir = config.training, Path(config.training.output_dir)
    model = accelerator.unwrap_model(unet)
    with _EMAWeights(ema, model):
        samples = render_samples(model, noise_scheduler, t.eval_batch_size, t.preview_inference_steps, t.seed, labels)
        export_pipeline(output_dir, build_pipeline(model, noise_scheduler, labels), samples, config, data_summary,
                        run)
    logger.info(f"exported the pipeline to {output_dir} ({run.global_step} steps, final loss {run.final_loss:.4f})")


def train(config: Config) -> TrainResult:
    """Train, checkpoint and export a DDPMPipeline (a LungGenPipeline when conditioned) to `output_dir`."""
    t, start_time, output_dir = config.training, time.time(), Path(config.training.output_dir)
    accelerator = build_accelerator(config)
    resume_from = resume_point(config)
    with accelerator.main_process_first():
        dataset, data_summary = build_dataset(config)
    labels = label_config(dataset, config.data.condition_on, t.guidance_scale) if config.data.condition_on else None
    set_seed(t.seed)  # same initial weights on every process
    unet, noise_scheduler, ema = build_model(config, labels)
    dataloader = build_dataloader(dataset, labels, config, accelerator)
    schedule = Schedule.of(len(dataset), config, accelerator.num_processes)
    optimizer, lr_scheduler = build_optimizer(unet, schedule, config, accelerator)
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    if resume_from is not None:
        check_weights(resume_from, unet)  # the prepared model, as save_state wrote it (before any compile)
    set_seed(t.seed, device_specific=True)  # each process draws its own noise; the data order stays shared
    if t.torch_compile:
        unet = torch.compile(unet)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if accelerator.is_main_process:
        accelerator.init_trackers("lunggen", config=_tracker_config(config))
    global_step = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        global_step = checkpoint_step(resume_from)
        logger.info(f"resumed from {resume_from.name} at step {global_step}")
    logger.info(f"{len(dataset)} images from {data_summary.source}; {schedule.max_steps} steps of "
                f"{schedule.images_per_step} images on {accelerator.num_processes} process(es), {accelerator.device}, "
                f"precision {t.mixed_precision}" + (f", conditioned on {', '.join(labels['condition_on'])}"
                                                    if labels else ""))
    progress = tqdm(total=schedule.max_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc="train")
    # The global CPU generator (seeded per process above): its state is in every checkpoint, so a resumed
    # --augment run draws the augmentations the uninterrupted run would have drawn.
    aug_generator = torch.default_generator
    meter, last_loss = LossMeter(accelerator.device, global_step, schedule.images_per_step), float("nan")
    first_epoch, skip = divmod(global_step, schedule.updates_per_epoch)
    for epoch in range(first_epoch, schedule.num_epochs):
        unet.train()
        dataloader.set_epoch(epoch)
        batches = dataloader
        if epoch == first_epoch and skip:
            batches = accelerator.skip_first_batches(dataloader, skip * t.gradient_accumulation_steps)
        for batch in batches:
            loss = train_step(batch, unet, noise_scheduler, optimizer, lr_scheduler, accelerator, config,
                              aug_generator)
            meter.add(loss / t.gradient_accumulation_steps)
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(unet.parameters())
            global_step += 1
            progress.update(1)
            last_loss = after_step(accelerator, unet, ema, noise_scheduler, labels, meter, lr_scheduler, progress,
                                   config, global_step, schedule.max_steps, last_loss)
            if global_step >= schedule.max_steps:
                break
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run = RunSummary(global_step, last_loss, round(time.time() - start_time, 1), _hardware(accelerator))
        export(accelerator, unet, ema, noise_scheduler, labels, config, data_summary, run)
    accelerator.end_training()
    return TrainResult(output_dir, global_step, last_loss, meter.images_per_second, accelerator.unwrap_model(unet))


def after_step(accelerator, unet, ema, noise_scheduler, labels, meter: LossMeter, lr_scheduler, progress,
               config: Config, step: int, max_steps: int, last_loss: float) -> float:
    """What is due after optimizer step `step`: logging (and the loss check), a checkpoint, a preview grid.
    Returns the latest logged loss."""
    t, output_dir = config.training, Path(config.training.output_dir)
    due_checkpoint = step % t.checkpointing_steps == 0
    if step % t.logging_steps == 0 or due_checkpoint or step == max_steps:
        logs = meter.read(accelerator, step, output_dir)
        logs["lr"] = lr_scheduler.get_last_lr()[0]
        last_loss = logs["loss"]
        progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{logs['lr']:.2e}")
        accelerator.log(logs, step=step)
    if due_checkpoint:
        save_checkpoint(accelerator, config, step)
    if t.save_images_steps and step % t.save_images_steps == 0 and accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        with _EMAWeights(ema, model):
            grid = render_samples(model, noise_scheduler, t.eval_batch_size, t.preview_inference_steps, t.seed, labels)
        (output_dir / "samples").mkdir(exist_ok=True)
        grid.save(output_dir / "samples" / f"step-{step:07d}.png")
    return last_loss
