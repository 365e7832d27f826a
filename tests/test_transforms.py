"""Preprocessing: every PIL mode to 1-channel, 16-bit range, square, antialiasing, [-1, 1], no mirroring."""

import numpy as np
import pytest
import torch
from PIL import Image

from lunggen_diffusers.data.transforms import (
    augment,
    preprocess_image,
    to_grayscale,
    to_model_input,
    to_square,
)


def _ramp(h=40, w=40):
    """Left-to-right ramp 0..255 with a bright blob on the image's right: mirroring would move it."""
    x = np.tile(np.linspace(0, 255, w), (h, 1))
    x[h // 3 : h // 2, -w // 4 :] = 255
    return x.astype(np.uint8)


def test_l_passes_through_unchanged():
    g = _ramp()
    assert np.array_equal(to_grayscale(Image.fromarray(g, "L")), g)


@pytest.mark.parametrize("mode", ["RGB", "P", "1", "CMYK"])
def test_colour_and_palette_modes_become_the_same_gray(mode):
    g = _ramp()
    image = Image.fromarray(g, "L").convert(mode)
    out = to_grayscale(image)
    assert out.dtype == np.uint8 and out.shape == g.shape
    tolerance = 255 if mode == "1" else 2  # "1" is binary by definition: only check it is still bilevel
    if mode == "1":
        assert set(np.unique(out)) <= {0, 255}
    else:
        assert np.abs(out.astype(int) - g).max() <= tolerance


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composites_over_black(mode):
    g = _ramp()
    alpha = np.full_like(g, 255)
    alpha[:, : g.shape[1] // 2] = 0  # left half fully transparent
    rgba = np.dstack([g, g, g, alpha]) if mode == "RGBA" else np.dstack([g, alpha])
    out = to_grayscale(Image.fromarray(rgba, mode))
    assert out[:, : g.shape[1] // 2].max() == 0
    assert np.abs(out[:, g.shape[1] // 2 :].astype(int) - g[:, g.shape[1] // 2 :]).max() <= 1


def test_palette_with_transparency():
    image = Image.fromarray(_ramp(), "L").convert("P")
    image.info["transparency"] = 0
    out = to_grayscale(image)
    assert out.shape == (40, 40) and out.dtype == np.uint8


def test_16_bit_uses_its_real_range_instead_of_clipping():
    # 12-bit data stored in 16 bits, as many radiographs are: PIL's convert("L") would clip all of it to 255.
    raw = np.linspace(0, 4095, 40 * 40).reshape(40, 40).astype(np.uint16)
    image = Image.fromarray(raw)
    assert image.mode == "I;16"
    out = to_grayscale(image)
    assert out.min() == 0 and out.max() == 255
    assert len(np.unique(out)) > 200  # the gradation survives
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # monotonic, no wrap-around


@pytest.mark.parametrize("mode,dtype", [("I", np.int32), ("F", np.float32)])
def test_32_bit_modes(mode, dtype):
    raw = (np.linspace(-1000, 3000, 1600).reshape(40, 40)).astype(dtype)
    out = to_grayscale(Image.fromarray(raw, mode))
    assert out.min() == 0 and out.max() == 255


def test_constant_high_depth_image_is_black_not_nan():
    out = to_grayscale(Image.fromarray(np.full((8, 8), 1000, np.uint16)))
    assert out.max() == 0


def test_square_crop_and_pad_keep_orientation():
    tall = np.arange(60 * 40, dtype=np.uint8).reshape(60, 40)
    cropped = to_square(tall, center_crop=True)
    assert cropped.shape == (40, 40) and np.array_equal(cropped, tall[10:50])
    padded = to_square(tall, center_crop=False)
    assert padded.shape == (60, 60) and np.array_equal(padded[:, 10:50], tall) and padded[:, :10].max() == 0


def test_resize_is_antialiased_and_never_mirrors():
    # A 1-pixel checkerboard must average to mid-gray when downscaled (aliasing would leave stripes).
    board = (np.indices((256, 256)).sum(0) % 2 * 255).astype(np.uint8)
    small = preprocess_image(Image.fromarray(board), 32)
    assert small.shape == (32, 32) and abs(float(small.mean()) - 127.5) < 3 and small.std() < 3
    g = _ramp(128, 128)
    out = preprocess_image(Image.fromarray(g), 32)
    assert out[:, -4:].mean() > out[:, :4].mean() + 100  # bright side stays on the right


def test_model_input_range_and_shape():
    pixels = torch.tensor([[[0, 255], [127, 128]]], dtype=torch.uint8)
    x = to_model_input(pixels)
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1


def test_augmentation_is_small_and_never_a_mirror():
    g = torch.from_numpy(_ramp(64, 64)).unsqueeze(0).repeat(16, 1, 1)
    x = to_model_input(g)
    out = augment(x, torch.Generator().manual_seed(0), rotation=5, scale=0.05, intensity=0.1)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert not torch.equal(out, x)
    flipped = torch.flip(x, dims=[-1])
    # Every augmented sample is much closer to the original than to its mirror image.
    to_orig = (out - x).abs().mean(dim=(1, 2, 3))
    to_mirror = (out - flipped).abs().mean(dim=(1, 2, 3))
    assert torch.all(to_orig * 3 < to_mirror)
