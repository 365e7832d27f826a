"""Checkpoints: written atomically, found for resume, and refused when the model's shape changed."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors import safe_open

from ..cli import UsageError
from ..config import Config, load_config, save_config
from .model import SHAPE_FIELDS

logger = get_logger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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
        raise UsageError(
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
        raise UsageError(
            f"cannot resume from {checkpoint.name}: the model shape changed ({'; '.join(changed)}); "
            "resume with the original settings or start a new --output_dir"
        )


def check_weights(checkpoint: Path, model: torch.nn.Module) -> None:
    """Refuse, in one line, a checkpoint whose weights do not fit `model` (the one accelerate prepared), before
    `load_state` fails deep inside torch: a checkpoint saved by an older version whose UNet had other blocks, say.
    Reads only the safetensors header."""
    path = checkpoint / "model.safetensors"
    if not path.is_file():
        return
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    with safe_open(str(path), "pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    differ = sorted(n for n in expected.keys() | saved.keys() if expected.get(n) != saved.get(n))
    if differ:
        first = differ[0]
        raise UsageError(
            f"cannot resume from {checkpoint.name}: {len(differ)} of its weights do not fit this model (first: "
            f"{first} is {saved.get(first, 'missing')} there, {expected.get(first, 'absent')} here); it was saved "
            "by another model or version: start a new --output_dir"
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


def checkpoint_step(checkpoint: Path) -> int:
    return int(CHECKPOINT_RE.match(checkpoint.name).group(1))
