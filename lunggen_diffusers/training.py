"""The Accelerate training loop: loss, EMA, atomic checkpoints, exact resume, previews, export."""

from __future__ import annotations

import logging
import math
import os
import platform
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import DDPMPipeline, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm

from . import hub
from .config import Config, load_config, save_config
from .data.build import build_dataset
from .data.transforms import augment, to_model_input
from .model import SHAPE_FIELDS, build_scheduler, build_unet
from .runtime import keep_freed_memory, set_cpu_threads
from .sampling import DEFAULT_SCHEDULER, make_scheduler
from .summaries import RunSummary

logger = get_logger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    final_loss: float
    images_per_second: float  # measured after the first logging window (warm-up excluded), all processes together
    unet: UNet2DModel  # the raw (non-EMA) trained weights of this process; the export holds the EMA weights


def check_world_size(accelerator: Accelerator) -> None:
    """A launch where Accelerate and the launcher disagree runs N independent trainings over one output folder."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"the launcher started WORLD_SIZE={launched} processes but Accelerate sees {accelerator.num_processes}; "
            "launch with `accelerate launch --num_processes N train.py` (or torchrun) so they agree"
        )


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written ones live under a dot-name and never match."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def find_checkpoint(output_dir: Path, spec: str) -> Path | None:
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path.is_dir() and CHECKPOINT_RE.match(path.name)):
        raise FileNotFoundError(
            f"--resume_from_checkpoint {spec}: not a checkpoint folder (expected `latest` or .../checkpoint-<step>)"
        )
    return path


def check_compatible(checkpoint: Path, config: Config) -> None:
    saved_path = checkpoint / "training_config.json"
    if not saved_path.is_file():
        return
    saved, now = load_config(saved_path).to_dict(), config.to_dict()
    changed = [f"{k}: {saved[k]} -> {now[k]}" for k in SHAPE_FIELDS if saved[k] != now[k]]
    if changed:
        raise ValueError(
            f"cannot resume from {checkpoint.name}: the model shape changed ({'; '.join(changed)}); "
            "resume with the original settings or start a new --output_dir"
        )


def save_checkpoint(accelerator: Accelerator, config: Config, step: int) -> Path:
    """Write to a hidden folder, then rename: a run killed mid-write leaves nothing `latest` would pick up."""
    output_dir = Path(config.training.output_dir)
    final, partial = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_config(config, partial / "training_config.json")
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)
        limit = config.training.checkpoints_total_limit
        if limit is not None:
            for old in list_checkpoints(output_dir)[:-limit]:
                shutil.rmtree(old)
        logger.info(f"saved {final.name}")
    accelerator.wait_for_everyone()
    return final


def _tracker_config(config: Config) -> dict:
    # TensorBoard's hparams take scalars and strings only.
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}


@torch.no_grad()
def render_samples(unet: UNet2DModel, noise_scheduler, num_images: int, steps: int, seed: int):
    """A fixed-seed grid with the default fast sampler (seconds, where 1000 DDPM steps would take minutes)."""
    was_training = unet.training
    unet.eval()
    pipe = DDPMPipeline(unet=unet, scheduler=make_scheduler(DEFAULT_SCHEDULER, noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = pipe(batch_size=num_images, generator=generator, num_inference_steps=steps).images
    unet.train(was_training)
    cols = math.ceil(math.sqrt(num_images))
    rows = math.ceil(num_images / cols)
    images += [images[0].point(lambda _: 0)] * (rows * cols - num_images)
    return make_image_grid(images, rows, cols)


class _WholeBatches(torch.utils.data.Dataset):
    """A batch as one Arrow `take` of uint8 pixels. datasets' torch formatter turns uint8 into int64 and the default
    collate splits a batch into rows and stacks them again: together 4-5x slower, visible next to a small model."""

    def __init__(self, dataset):
        self.table = dataset.with_format("arrow", columns=["pixel_values"])

    def __len__(self) -> int:
        return len(self.table)

    def __getitems__(self, indices: list[int]) -> dict:
        pixels = self.table[indices]["pixel_values"].combine_chunks().to_numpy(zero_copy_only=False)
        return {"pixel_values": torch.from_numpy(np.array(pixels, dtype=np.uint8))}


def _as_is(batch):
    return batch


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


def train(config: Config) -> TrainResult:
    """Train, checkpoint and export a DDPMPipeline to `config.training.output_dir`."""
    t, start_time = config.training, time.time()
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

    resume_from = None
    if t.resume_from_checkpoint:
        resume_from = find_checkpoint(output_dir, t.resume_from_checkpoint)
        if resume_from is None:
            logger.info(f"no checkpoint in {output_dir} yet: starting a new run")
        else:
            check_compatible(resume_from, config)

    set_seed(t.seed)  # same initial weights on every process
    unet = build_unet(config)
    noise_scheduler = build_scheduler(config)
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
            model_cls=UNet2DModel,
            model_config=unet.config,
        )

    with accelerator.main_process_first():
        dataset, data_summary = build_dataset(config)
    source = data_summary.source
    per_step = t.train_batch_size * accelerator.num_processes
    dataloader = torch.utils.data.DataLoader(
        _WholeBatches(dataset),
        batch_size=t.train_batch_size,
        collate_fn=_as_is,
        shuffle=True,
        num_workers=t.dataloader_num_workers,
        drop_last=len(dataset) >= per_step,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=t.dataloader_num_workers > 0,
        # Its own generator: otherwise starting an epoch's iterator draws from the global RNG, and a resumed run
        # (which starts an iterator at a different moment) would see different noise from then on.
        generator=torch.Generator().manual_seed(t.seed),
    )
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
        fused=t.use_fused_adam and accelerator.device.type == "cuda",
    )
    # The prepared scheduler steps once per process per optimizer step, hence the num_processes factors.
    updates_per_epoch = math.ceil(math.ceil(len(dataset) / per_step) / t.gradient_accumulation_steps)
    max_steps = t.max_train_steps or t.num_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(
        t.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=t.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
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
        global_step = int(CHECKPOINT_RE.match(resume_from.name).group(1))
        logger.info(f"resumed from {resume_from.name} at step {global_step}")
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * t.gradient_accumulation_steps

    logger.info(
        f"{len(dataset)} images from {source}; {max_steps} steps of {per_step * t.gradient_accumulation_steps} "
        f"images on {accelerator.num_processes} process(es), {accelerator.device}, precision {t.mixed_precision}"
    )
    progress = tqdm(total=max_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="train")
    aug_generator = torch.Generator().manual_seed(t.seed + accelerator.process_index)
    loss_window, window_start, last_loss = torch.zeros((), device=accelerator.device), global_step, float("nan")
    images_per_step = per_step * t.gradient_accumulation_steps
    window_time = first_window = None  # (time, step) marks for the throughput figures

    def check_loss() -> float:
        """Average loss since the last check; syncs with the device, so it runs every logging_steps, not every step."""
        nonlocal loss_window, window_start
        mean = accelerator.reduce(loss_window, reduction="mean").item() / max(global_step - window_start, 1)
        if not math.isfinite(mean):
            good = list_checkpoints(output_dir)
            raise NonFiniteLossError(
                f"the loss became {mean} between steps {window_start + 1} and {global_step}; stopped. "
                + (f"The last good checkpoint is {good[-1].name}." if good else "No checkpoint was written yet.")
            )
        loss_window, window_start = torch.zeros_like(loss_window), global_step
        return mean

    for epoch in range(first_epoch, num_epochs):
        unet.train()
        dataloader.set_epoch(epoch)
        batches = dataloader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(dataloader, skip_batches)
        for batch in batches:
            clean = to_model_input(batch["pixel_values"])
            if config.data.augment:
                d = config.data
                clean = augment(clean, aug_generator, d.augment_rotation, d.augment_scale, d.augment_intensity)
            # Noise and add_noise stay in fp32 whatever the mixed precision: low-noise timesteps need the bits.
            noise = torch.randn_like(clean)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            if t.channels_last:
                noisy = noisy.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(unet):
                pred = unet(noisy, timesteps).sample
                target = noise if config.model.prediction_type == "epsilon" else noise_scheduler.get_velocity(clean, noise, timesteps)
                loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                if t.snr_gamma is not None:
                    snr = compute_snr(noise_scheduler, timesteps)
                    weight = snr.clamp(max=t.snr_gamma) / (snr if config.model.prediction_type == "epsilon" else snr + 1)
                    loss = loss * weight
                loss = loss.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(unet.parameters(), t.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_window += loss.detach() / t.gradient_accumulation_steps
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(unet.parameters())
            global_step += 1
            progress.update(1)
            due_checkpoint = global_step % t.checkpointing_steps == 0
            if global_step % t.logging_steps == 0 or due_checkpoint or global_step == max_steps:
                started, last_loss = window_start, check_loss()
                now, lr = time.perf_counter(), lr_scheduler.get_last_lr()[0]
                logs = {"loss": last_loss, "lr": lr}
                if window_time is not None:
                    logs["images_per_second"] = (global_step - started) * images_per_step / (now - window_time)
                first_window = first_window or (now, global_step)
                window_time = now
                progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
                accelerator.log(logs, step=global_step)
            if due_checkpoint:
                save_checkpoint(accelerator, config, global_step)
            if t.save_images_steps and global_step % t.save_images_steps == 0 and accelerator.is_main_process:
                model = accelerator.unwrap_model(unet)
                with _EMAWeights(ema, model):
                    grid = render_samples(model, noise_scheduler, t.eval_batch_size, t.preview_inference_steps, t.seed)
                (output_dir / "samples").mkdir(exist_ok=True)
                grid.save(output_dir / "samples" / f"step-{global_step:07d}.png")
            if global_step >= max_steps:
                break
    progress.close()
    images_per_second = float("nan")
    if first_window and global_step > first_window[1]:
        images_per_second = (global_step - first_window[1]) * images_per_step / (window_time - first_window[0])

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        with _EMAWeights(ema, model):
            pipe = DDPMPipeline(unet=model, scheduler=noise_scheduler)
            pipe.save_pretrained(output_dir, safe_serialization=True)
            render_samples(model, noise_scheduler, t.eval_batch_size, t.preview_inference_steps, t.seed).save(
                output_dir / "samples.png"
            )
        run = RunSummary(global_step, last_loss, round(time.time() - start_time, 1), _hardware(accelerator))
        hub.write_manifest(output_dir, config, data_summary, run)
        hub.write_model_card(output_dir)
        if config.hub.push_to_hub:
            hub.push_to_hub(
                output_dir, config.hub.hub_model_id, private=config.hub.hub_private_repo, token=config.hub.hub_token
            )
        logger.info(f"exported the pipeline to {output_dir} ({global_step} steps, final loss {last_loss:.4f})")
    accelerator.end_training()
    return TrainResult(output_dir, global_step, last_loss, images_per_second, accelerator.unwrap_model(unet))


def _hardware(accelerator: Accelerator) -> str:
    n = accelerator.num_processes
    if accelerator.device.type == "cuda":
        return f"{n} x {torch.cuda.get_device_name(accelerator.device)}"
    return f"{n} process(es) on CPU ({platform.machine()}, {os.cpu_count()} cores)"
