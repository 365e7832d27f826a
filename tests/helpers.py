"""Stand-ins the evaluation and memorization tests share: phantom pixels and a tiny random RAD-DINO."""

import numpy as np
import torch
import transformers

from lunggen_diffusers.data.phantom import phantom_dataset


def phantom_array(n, seed, size=64):
    return np.stack([np.asarray(image) for image in phantom_dataset(n, size, seed=seed)["image"]])


def save_tiny_encoder(path):
    """A tiny random Dinov2 (RAD-DINO's architecture) with its image processor, saved for loading by path."""
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, image_size=32, patch_size=8)
    transformers.Dinov2Model(config).save_pretrained(path)
    transformers.BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}) \
        .save_pretrained(path)
    return str(path)
