"""Preprocessing shared by every data source: any PIL image -> square 1-channel uint8 at the training resolution,
and uint8 batches -> float32 model input in [-1, 1], with optional anatomy-preserving augmentation.

Never flips horizontally: a mirrored chest X-ray puts the heart on the wrong side and teaches the model that.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_grayscale(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 (H, W).

    16-bit, 32-bit integer and float images are scaled by their real value range (many 16-bit radiographs use 12
    bits; PIL's own convert("L") would clip everything above 255 to white). Transparent pixels are composited over
    black, the colour of no exposure.
    """
    if image.mode in _HIGH_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            return np.zeros(values.shape, dtype=np.uint8)
        return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("L"), dtype=np.uint8)


def to_square(pixels: np.ndarray, center_crop: bool) -> np.ndarray:
    """Centre-crop to the short side, or pad with black to the long side (keeps all anatomy, no distortion)."""
    h, w = pixels.shape
    if h == w:
        return pixels
    if center_crop:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return pixels[top : top + side, left : left + side]
    side = max(h, w)
    out = np.zeros((side, side), dtype=pixels.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = pixels
    return out


def preprocess_image(image: Image.Image, resolution: int, center_crop: bool = True) -> np.ndarray:
    """PIL image of any mode and size -> uint8 (resolution, resolution), antialiased."""
    pixels = to_square(to_grayscale(image), center_crop)
    if pixels.shape[0] != resolution:
        # Lanczos on a downscale filters over the whole source footprint (antialiased), unlike nearest/bilinear.
        pixels = np.asarray(Image.fromarray(pixels).resize((resolution, resolution), Image.Resampling.LANCZOS))
    return pixels


def to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) -> float32 (B, 1, H, W) in [-1, 1]. Runs on the training device: uint8 travels 4x lighter."""
    return pixels.unsqueeze(1).to(torch.float32).div_(127.5).sub_(1.0)


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    rotation: float = 5.0,
    scale: float = 0.05,
    intensity: float = 0.1,
) -> torch.Tensor:
    """Small rotation (degrees), zoom and brightness/contrast on a [-1, 1] batch; anatomy keeps its side.

    The affine matrix has a positive determinant by construction, so no sample is ever mirrored.
    """
    b = images.shape[0]

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(b, generator=generator) * 2 - 1) * limit

    angle = uniform(math.radians(rotation))
    zoom = 1 + uniform(scale)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(b)], 1), torch.stack([sin, cos, torch.zeros(b)], 1)], 1)
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    # Pad with -1 (black): what lies outside a radiograph's field of view.
    out = F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    contrast = (1 + uniform(intensity)).view(b, 1, 1, 1).to(images)
    brightness = uniform(intensity).view(b, 1, 1, 1).to(images)
    return (out * contrast + brightness).clamp_(-1, 1)
