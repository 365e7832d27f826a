"""The Accelerate loop both training stages share (the latent route's autoencoder and every diffusion model):
the accelerator, data loading, optimizer and schedule, the loss meter, EMA swaps, and `fit`, the epoch loop with
exact resume, logging, atomic checkpoints and previews. What a step computes is the stage's own (`step_fn`).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..config import Config, save_config
from ..data.conditioning import condition_vectors
from ..data.decode import stored_pixels
from ..runtime import check_world_size, keep_freed_memory, set_cpu_threads
from ..utils import SAMPLE_GRID, synthetic_png_info
from .checkpoints import (
    check_compatible,
    checkpoint_step,
    find_checkpoint,
    list_checkpoints,
    save_checkpoint,
)

logger = get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class Schedule:
    """How many optimizer steps an epoch holds and the run takes, from the batches the prepared loader yields a
    process (a partial last batch it drops is not a step) and the launch."""

    updates_per_epoch: int
    max_steps: int
    num_epochs: int
    images_per_step: int  # all processes, all accumulated batches

    @classmethod
    def of(cls, batches_per_epoch: int, config: Config, num_processes: int) -> Schedule:
        t = config.training
        per_step = t.train_batch_size * num_processes
        # Accelerate ends an accumulation at the loader's end, so a short remainder still makes an update.
        updates_per_epoch = math.ceil(batches_per_epoch / t.gradient_accumulation_steps)
        max_steps = t.max_train_steps or t.num_epochs * updates_per_epoch
        return cls(updates_per_epoch, max_steps, math.ceil(max_steps / updates_per_epoch),
                   per_step * t.gradient_accumulation_steps)


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


class _WholeBatches(torch.utils.data.Dataset):
    """A batch as one Arrow `take` of the stored PNG bytes, decoded to uint8 here (in the DataLoader workers with
    --dataloader_num_workers). datasets' formatter would decode row by row into PIL images and the default collate
    would split a batch into rows and stack them again: slow enough to show next to a small model."""

    def __init__(self, dataset, labels: np.ndarray | None = None, latents: np.ndarray | None = None,
                 tokens: tuple[np.ndarray, np.ndarray] | None = None):
        self.table = dataset.with_format("arrow", columns=["image"])
        self.labels, self.latents, self.tokens = labels, latents, tokens

    def __len__(self) -> int:
        return len(self.table)

    def __getitems__(self, indices: list[int]) -> dict:
        if self.latents is not None:  # the latent route: cached posterior moments, no image decoded
            batch = {"latents": torch.from_numpy(np.asarray(self.latents[indices], dtype=np.float32))}
        else:
            batch = {"pixel_values": torch.from_numpy(stored_pixels(self.table[indices]["image"]))}
        if self.labels is not None:
            batch["class_labels"] = torch.from_numpy(self.labels[indices])
        if self.tokens is not None:
            batch["input_ids"], batch["attention_mask"] = (torch.from_numpy(t[indices]).long() for t in self.tokens)
        return batch


def _as_is(batch):
    return batch


def build_dataloader(dataset, labels: dict | None, config: Config, accelerator: Accelerator,
                     latents: np.ndarray | None = None, tokens: tuple[np.ndarray, np.ndarray] | None = None):
    """Shuffled whole batches of the prepared images (uint8 `pixel_values`) or, given `latents` (cached posterior
    moments in dataset order), of those; with `class_labels` when `labels` describes them, and the reports'
    `input_ids` and `attention_mask` given their `tokens` (in dataset order)."""
    t = config.training
    return torch.utils.data.DataLoader(
        _WholeBatches(dataset, condition_vectors(dataset, labels) if labels else None, latents, tokens),
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


def build_optimizer(model, schedule: Schedule, config: Config, accelerator: Accelerator):
    t = config.training
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],  # a frozen text encoder rides along untrained
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


class EMAWeights:
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


def tracker_config(config: Config) -> dict:
    # TensorBoard's hparams take scalars and strings only.
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}


def hardware(accelerator: Accelerator) -> str:
    n = accelerator.num_processes
    if accelerator.device.type == "cuda":
        return f"{n} x {torch.cuda.get_device_name(accelerator.device)}"
    return f"{n} process(es) on CPU ({platform.machine()}, {os.cpu_count()} cores)"


def start(accelerator: Accelerator, resume_from: Path | None, config: Config, project: str) -> int:
    """Open the trackers and, when resuming, load the checkpoint's whole state; returns the step to continue from
    (after `prepare` and anything registered for checkpointing, as `load_state` needs them)."""
    if accelerator.is_main_process:
        accelerator.init_trackers(project, config=tracker_config(config))
    if resume_from is None:
        return 0
    accelerator.load_state(str(resume_from))
    step = checkpoint_step(resume_from)
    logger.info(f"{project}: resumed from {resume_from.name} at step {step}")
    return step


def fit(accelerator: Accelerator, model, ema: EMAModel | None, dataloader, schedule: Schedule, optimizer,
        lr_scheduler, config: Config, global_step: int, step_fn: Callable, preview: Callable | None = None,
        desc: str = "train") -> tuple[int, float, LossMeter]:
    """Run optimizer steps from `global_step` to the schedule's end. `step_fn(batch)` returns the (micro-)batch's
    loss; the backward pass, clipping, optimizer and schedule steps, EMA, logging, checkpoints and `preview(step)`
    grids are done here. A resumed run skips the batches its epoch had already seen, so it continues exactly.
    Returns (last step, last logged loss, the meter)."""
    t = config.training
    progress = tqdm(total=schedule.max_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc=desc)
    meter, last_loss = LossMeter(accelerator.device, global_step, schedule.images_per_step), float("nan")
    first_epoch, skip = divmod(global_step, schedule.updates_per_epoch)
    for epoch in range(first_epoch, schedule.num_epochs):
        model.train()
        dataloader.set_epoch(epoch)
        batches = dataloader
        if epoch == first_epoch and skip:
            batches = accelerator.skip_first_batches(dataloader, skip * t.gradient_accumulation_steps)
        for batch in batches:
            with accelerator.accumulate(model):
                loss = step_fn(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            meter.add(loss / t.gradient_accumulation_steps)
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(model.parameters())
            global_step += 1
            progress.update(1)
            last_loss = after_step(accelerator, meter, lr_scheduler, progress, config, global_step,
                                   schedule.max_steps, last_loss, preview)
            if global_step >= schedule.max_steps:
                break
    progress.close()
    accelerator.wait_for_everyone()
    return global_step, last_loss, meter


def after_step(accelerator: Accelerator, meter: LossMeter, lr_scheduler, progress, config: Config, step: int,
               max_steps: int, last_loss: float, preview: Callable | None) -> float:
    """What is due after optimizer step `step`: logging (and the loss check), a checkpoint, a preview grid
    (`preview(step)`, a PIL image, main process). Returns the latest logged loss."""
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
    if preview is not None and t.save_images_steps and step % t.save_images_steps == 0 and \
            accelerator.is_main_process:
        (output_dir / "samples").mkdir(exist_ok=True)
        preview(step).save(output_dir / "samples" / f"step-{step:07d}.png",
                           pnginfo=synthetic_png_info(SAMPLE_GRID, step=step))
    return last_loss
