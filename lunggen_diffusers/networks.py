"""What the project's own small networks share: image batches as their input, their conv block, a pretrained image
encoder as an embedder, and `fit`, the one AdamW loop that trains the patient verifier, the phantom classifier and
the utility classifier (the diffusion models train on the Accelerate loop of `training/`).

In the foundation because evaluation (the verifier, the phantom classifier, RAD-DINO features) and utility (its
classifier) use it, and neither may import the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def conv_block(channels_in: int, channels_out: int, stride: int = 1) -> list[nn.Module]:
    """Conv 3x3, BatchNorm, ReLU: the unit of the project's small measuring CNNs."""
    return [nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1), nn.BatchNorm2d(channels_out), nn.ReLU()]


def to_input(images, resolution: int) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, resolution, resolution) in [-1, 1], antialiased."""
    x = torch.as_tensor(np.ascontiguousarray(images))
    if x.ndim != 3:
        raise ValueError(f"expected images shaped (N, H, W), got {tuple(x.shape)}")
    x = (x.float() / 255.0 if x.dtype == torch.uint8 else x.float())[:, None]
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x * 2 - 1


def encoder_embedder(model_name_or_path: str, device: str = "cpu", batch_size: int = 32):
    """A transformers image encoder (RAD-DINO by default elsewhere) as images uint8 (N, H, W) -> CLS features
    float32 (N, D); also returns the model's config and processor for describing it."""
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(model_name_or_path)
    model = AutoModel.from_pretrained(model_name_or_path).to(device).eval()

    @torch.inference_mode()
    def embed(images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            # The processor expects RGB: a radiograph is the same gray in all three channels.
            rgb = [np.repeat(image[..., None], 3, axis=-1) for image in images[start:start + batch_size]]
            pixel_values = processor(images=rgb, return_tensors="pt")["pixel_values"].to(device)
            outputs = model(pixel_values=pixel_values)
            # Dinov2's pooler_output is the layer-normed CLS token, the embedding RAD-DINO's card uses.
            cls = outputs.pooler_output if outputs.pooler_output is not None else outputs.last_hidden_state[:, 0]
            out.append(cls.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)

    return embed, model, processor


def fit(model: nn.Module, batches: Iterable, loss: Callable[[object], torch.Tensor], learning_rate: float, steps: int,
        weight_decay: float = 0.01, one_cycle: bool = False, on_step: Callable[[int, torch.Tensor], None] | None = None,
        **bar) -> nn.Module:
    """Train `model` with AdamW for `steps` updates, one per batch of `batches`, each minimising `loss(batch)`;
    `one_cycle`: the learning rate on a one-cycle schedule peaking at `learning_rate`. `on_step(step, loss)` runs after
    each update (steps count from 1); `bar` goes to the tqdm progress bar (desc, disable, leave). Returns the model in
    eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps) if one_cycle else None
    model.train()
    for step, batch in enumerate(tqdm(batches, total=steps, unit="step", **bar), start=1):
        value = loss(batch)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        if on_step is not None:
            on_step(step, value)
        if step == steps:
            break
    return model.eval()
