"""The denoising process as an animation: for the first images of a batch, the noisy sample x_t beside the step's
prediction of the clean image x0, every `every`-th step, with a caption band that marks each frame synthetic.

`DenoisingRecorder` is a diffusers `PipelineCallback`, so a `LungGenPipeline` user passes it as it is:

    recorder = DenoisingRecorder(num_images=2, every=5)
    pipe(findings=[["Cardiomegaly"], []], callback_on_step_end=recorder)
    recorder.save_gif("process.gif")

`pipeline.py --save_process N` records the same way inside the project's sampling loop.
"""

from __future__ import annotations

import numpy as np
from diffusers.callbacks import PipelineCallback
from PIL import Image, ImageDraw

from ..lunggen_pipeline import decode_latents, postprocess
from ..utils import SYNTHETIC_NOTICE, atomic_path

BAND = 12  # pixels of caption under each frame


class DenoisingRecorder(PipelineCallback):
    """Frames of (x_t | x0) for the batch's first `num_images`, one frame every `every` steps and at the last."""

    tensor_inputs = ["latents", "pred_original_sample"]

    def __init__(self, num_images: int = 4, every: int = 1):
        super().__init__()
        if num_images < 1 or every < 1:
            raise ValueError(f"num_images and every must be positive integers, got {num_images} and {every}")
        self.num_images, self.every = num_images, every
        self.frames: list[Image.Image] = []
        self.steps: list[int] = []  # the step index of each frame

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs) -> dict:
        last = step_index == len(pipeline.scheduler.timesteps) - 1
        if step_index % self.every and not last:
            return {}
        vae = getattr(pipeline, "vae", None)
        panels = []
        for name in ("latents", "pred_original_sample"):
            x = callback_kwargs[name][: self.num_images]
            if vae is not None:  # the latent route: both shown as the autoencoder decodes them
                x = decode_latents(vae, x.to(vae.dtype))
            panels.append(postprocess(x, "np"))
        rows = [np.concatenate([noisy, clean], axis=1) for noisy, clean in zip(*panels)]
        pixels = np.round(np.concatenate(rows, axis=0)[..., 0] * 255).astype(np.uint8)
        self.frames.append(_captioned(pixels, f"SYNTHETIC  step {step_index + 1}  t={int(timestep)}"))
        self.steps.append(step_index)
        return {}

    def save_gif(self, path, duration_ms: int = 80) -> None:
        """An animated GIF (PIL), the last frame held a second; its comment marks it synthetic."""
        if not self.frames:
            raise ValueError("no frames were recorded: pass the recorder as callback_on_step_end first")
        durations = [duration_ms] * (len(self.frames) - 1) + [1000]
        with atomic_path(path) as temporary:
            self.frames[0].save(temporary, format="GIF", save_all=True, append_images=self.frames[1:],
                                duration=durations, loop=0, comment=f"synthetic: {SYNTHETIC_NOTICE}")


def _captioned(pixels: np.ndarray, text: str) -> Image.Image:
    """The frame over a black band carrying `text` (every frame says it is synthetic, not only the file)."""
    frame = Image.new("L", (pixels.shape[1], pixels.shape[0] + BAND), 0)
    frame.paste(Image.fromarray(pixels), (0, 0))
    ImageDraw.Draw(frame).text((1, pixels.shape[0]), text, fill=255)
    return frame
