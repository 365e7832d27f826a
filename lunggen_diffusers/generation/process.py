"""The diffusion process as video: the denoising of a few images (the noisy sample x_t beside the step's prediction
of the clean image x0) and a run's training progress (its preview grids in step order), each frame over a caption
band that marks it synthetic.

`DenoisingRecorder` is a diffusers `PipelineCallback`, so a `LungGenPipeline` user passes it as it is; an exported
`DDPMPipeline` has no `callback_on_step_end`, and the same model in a `LungGenPipeline` draws the same images:

    recorder = DenoisingRecorder(num_images=2, every=5)
    pipe = LungGenPipeline(unet=ddpm.unet, scheduler=ddpm.scheduler)  # or a LungGenPipeline as loaded
    pipe(batch_size=2, callback_on_step_end=recorder)
    recorder.save("denoising")  # denoising.gif, and denoising.mp4 with the video extra

`pipeline.py --save_process N` records the same way inside the project's sampling loop.

GIF (PIL) is always written. MP4 (H.264) needs PyAV, the optional `video` extra (`pip install -e ".[video]"`): its
wheel brings FFmpeg with libx264 in 104 MB, against 165 MB for imageio-ffmpeg, and encodes in process from numpy
frames with the container's metadata under our control (imageio-ffmpeg pipes raw frames to an ffmpeg executable).
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
from diffusers.callbacks import PipelineCallback
from PIL import Image, ImageDraw

from ..cli import UsageError
from ..lunggen_pipeline import decode_latents, postprocess
from ..utils import SYNTHETIC_NOTICE, atomic_path

logger = logging.getLogger(__name__)

BAND = 12  # pixels of caption under each frame
FRAME_MS = 80  # 12.5 frames a second; a GIF's last frame is held a second
DENOISING = "denoising"  # denoising.gif / .mp4: pipeline.py --save_process, and every export
TRAINING_PROGRESS = "training_progress"  # training_progress.gif / .mp4: every export with preview grids
MARK = f"synthetic: {SYNTHETIC_NOTICE}"  # the files' comment (GIF comment, MP4 metadata)
VIDEO_EXTRA = 'MP4 needs PyAV, the video extra: pip install -e ".[video]"'


class DenoisingRecorder(PipelineCallback):
    """Frames of (x_t | x0) for the batch's first `num_images`, one frame every `every` steps and at the last."""

    tensor_inputs = ["latents", "pred_original_sample"]

    def __init__(self, num_images: int = 4, every: int = 1):
        super().__init__()
        if num_images < 1 or every < 1:
            raise UsageError(f"num_images and every must be positive integers, got {num_images} and {every}")
        self.num_images, self.every = num_images, every
        self.frames: list[Image.Image] = []
        self.steps: list[int] = []  # the step index of each frame

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs) -> dict:
        last = step_index == len(pipeline.scheduler.timesteps) - 1
        if step_index % self.every and not last:
            return callback_kwargs  # unchanged, as diffusers' callbacks hand them on (MultiPipelineCallbacks)
        vae = getattr(pipeline, "vae", None)
        panels = []
        for name in ("latents", "pred_original_sample"):
            x = callback_kwargs[name][: self.num_images]
            if vae is not None:  # the latent route: both shown as the autoencoder decodes them
                x = decode_latents(vae, x.to(vae.dtype))
            panels.append(postprocess(x, "np"))
        rows = [np.concatenate([noisy, clean], axis=1) for noisy, clean in zip(*panels, strict=True)]
        pixels = np.round(np.concatenate(rows, axis=0)[..., 0] * 255).astype(np.uint8)
        self.frames.append(captioned(Image.fromarray(pixels), f"SYNTHETIC step {step_index + 1} t={int(timestep)}"))
        self.steps.append(step_index)
        return callback_kwargs

    def save(self, stem) -> list[Path]:
        """`stem`.gif and, with PyAV, `stem`.mp4 (`save_animations`)."""
        if not self.frames:
            raise ValueError("no frames were recorded: pass the recorder as callback_on_step_end first")
        return save_animations({Path(stem).name: self.frames}, Path(stem).parent)


def captioned(image: Image.Image, text: str) -> Image.Image:
    """The image over a black band carrying `text` (every frame says it is synthetic, not only the file)."""
    frame = Image.new("L", (image.width, image.height + BAND), 0)
    frame.paste(image.convert("L"), (0, 0))
    ImageDraw.Draw(frame).text((1, image.height), text, fill=255)
    return frame


def save_animations(animations: dict[str, list[Image.Image]], folder) -> list[Path]:
    """Each animation (file stem: frames) as `folder/stem`.gif, and `.mp4` when PyAV is installed; the MP4s are an
    optional extra, so their absence is one INFO line for all of them, never a warning. Returns the files written."""
    written, missing = [], []
    for stem, frames in animations.items():
        path = Path(folder) / stem
        save_gif(frames, path.with_suffix(".gif"))
        written.append(path.with_suffix(".gif"))
        try:
            save_mp4(frames, path.with_suffix(".mp4"))
            written.append(path.with_suffix(".mp4"))
        except ImportError:
            missing.append(f"{stem}.mp4")
    if missing:
        logger.info(f"{', '.join(missing)} not written (the GIFs were): {VIDEO_EXTRA}")
    return written


def save_gif(frames: list[Image.Image], path) -> None:
    """An animated 8-bit grayscale GIF (every grey level exact), looping, its last frame held a second."""
    durations = [FRAME_MS] * (len(frames) - 1) + [1000]
    with atomic_path(path) as temporary:
        frames[0].save(temporary, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0,
                       comment=MARK)


def save_mp4(frames: list[Image.Image], path) -> None:
    """An H.264 MP4 (yuv420p, which every player reads; odd sides padded black by a pixel), one video frame per
    frame, its metadata comment marking it synthetic. ImportError with the extra to install when PyAV is absent."""
    try:
        import av
    except ImportError:
        raise ImportError(VIDEO_EXTRA) from None
    width, height = frames[0].size
    even = (width + width % 2, height + height % 2)
    with atomic_path(path) as temporary, av.open(str(temporary), "w", format="mp4") as container:
        container.metadata["comment"] = MARK
        stream = container.add_stream("libx264", rate=Fraction(1000, FRAME_MS))
        stream.width, stream.height, stream.pix_fmt = *even, "yuv420p"
        stream.options = {"crf": "18"}  # visually lossless at these sizes
        for frame in frames:
            padded = np.zeros(even[::-1], np.uint8)
            padded[:height, :width] = np.asarray(frame.convert("L"))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(padded, format="gray")))
        container.mux(stream.encode())


def progress_frames(samples_dir) -> list[Image.Image]:
    """A run's preview grids (`samples/step-NNNNNNN.png`, the same noise and seeds at every preview) in step order,
    each captioned with its step: what the training progress video shows."""
    found = sorted((int(m.group(1)), path) for path in Path(samples_dir).glob("step-*.png")
                   if (m := re.fullmatch(r"step-(\d+)\.png", path.name)))
    return [captioned(Image.open(path), f"SYNTHETIC training step {step:,}") for step, path in found]
