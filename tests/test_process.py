"""The denoising process as an animation: frames in order, the last clean-image panel equal to the output, the
recorder inside a pipeline call (pixels, guided, latent) and inside `pipeline.py --save_process`, and nothing
changed or added without the flag."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

from lunggen_diffusers import LungGenPipeline
from lunggen_diffusers.generation import cli as generation_cli
from lunggen_diffusers.generation.process import BAND, DenoisingRecorder

from test_conditioning import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def test_frames_follow_the_steps_and_the_last_clean_panel_is_the_output():
    pipe = tiny_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # its last step lands exactly on its x0
    recorder = DenoisingRecorder(num_images=2, every=2)
    images = pipe(findings=[["cardiomegaly"], []], guidance_scale=2.0, num_inference_steps=5, output_type="np",
                  generator=torch.Generator().manual_seed(0), callback_on_step_end=recorder).images
    assert recorder.steps == [0, 2, 4]  # every 2nd step, and the last
    last = np.asarray(recorder.frames[-1])
    assert last.shape == (2 * 16 + BAND, 2 * 16)  # a row per image: x_t | x0, then the caption band
    expected = np.round(images[..., 0] * 255).astype(np.uint8)
    assert np.array_equal(last[:16, 16:], expected[0]) and np.array_equal(last[16:32, 16:], expected[1])
    assert last[32:].max() > 128  # the caption is drawn (antialiased)
    first = np.asarray(recorder.frames[0])
    assert first[:32, :16].std() > last[:32, :16].std() / 2  # x_t starts as noise


def test_a_latent_pipeline_records_decoded_frames():
    from lunggen_diffusers.config import from_dict
    from lunggen_diffusers.training.autoencoder import build_autoencoder

    torch.manual_seed(0)
    vae = build_autoencoder(from_dict({"resolution": 32, "latent": True, "vae_block_out_channels": [8, 8],
                                       "vae_norm_num_groups": 4, "latent_channels": 2}))
    unet = UNet2DModel(sample_size=16, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = LungGenPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50, clip_sample=False), vae=vae)
    recorder = DenoisingRecorder(num_images=1)
    pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), callback_on_step_end=recorder)
    assert len(recorder.frames) == 3 and recorder.frames[0].size == (2 * 32, 32 + BAND)  # decoded to 32 px


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    folder = tmp_path_factory.mktemp("model")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(folder)
    return str(folder)


def test_pipeline_py_writes_the_process_gif_and_nothing_without_the_flag(tiny_model, tmp_path):
    common = ["--model", tiny_model, "--num_images", "3", "--batch_size", "2", "--num_inference_steps", "4",
              "--cpu_threads", "1", "--scheduler", "ddim"]  # DDIM's last step is its x0 exactly, on any CPU
    generation_cli.main([*common, "--output_dir", str(tmp_path / "with"), "--save_process", "2",
                         "--save_process_every", "3"])
    generation_cli.main([*common, "--output_dir", str(tmp_path / "without")])
    gif = Image.open(tmp_path / "with" / "process.gif")
    assert gif.n_frames == 2 and gif.size == (2 * 16, 2 * 16 + BAND)  # steps 1 and 4 (the last)
    assert b"synthetic" in gif.info["comment"]
    assert not (tmp_path / "without" / "process.gif").exists()
    for i in range(3):  # recording changes no image
        name = f"image_{i:06d}.png"
        assert np.array_equal(np.asarray(Image.open(tmp_path / "with" / name)),
                              np.asarray(Image.open(tmp_path / "without" / name)))
    gif.seek(1)
    last = np.asarray(gif.convert("L"))
    assert np.array_equal(last[:16, 16:], np.asarray(Image.open(tmp_path / "with" / "image_000000.png")))


def test_bad_recording_options_are_one_line(tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        generation_cli.main(["--model", tiny_model, "--output_dir", str(tmp_path), "--save_process", "40"])
    assert "--save_process 40" in capsys.readouterr().err
    with pytest.raises(ValueError, match="positive"):
        DenoisingRecorder(num_images=0)
