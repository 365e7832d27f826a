"""The diffusion process as video: frames in order, the last clean-image panel equal to the output for every
sampler, the recorder inside a pipeline call (pixels, guided, latent, a DDPMPipeline's model) and inside
`pipeline.py --save_process`, nothing changed or added without the flag, the GIF and MP4 read back, the one line
without PyAV, and the training previews in step order."""

import importlib.util
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from PIL import Image

from lunggen_diffusers import LungGenPipeline
from lunggen_diffusers.generation import cli as generation_cli
from lunggen_diffusers.generation.process import (
    BAND,
    DenoisingRecorder,
    captioned,
    progress_frames,
    save_animations,
    save_mp4,
)
from lunggen_diffusers.generation.sampling import (
    SCHEDULERS,
    iter_batches,
    load_pipeline,
)
from lunggen_diffusers.lunggen_pipeline import postprocess

from fixtures import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def has_av() -> bool:
    return importlib.util.find_spec("av") is not None


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


class Capture(PipelineCallback):
    """The step's prediction of the clean image, as the pipeline hands it to callbacks."""

    tensor_inputs = ["pred_original_sample"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.seen = [*getattr(self, "seen", []), callback_kwargs["pred_original_sample"].clone()]
        return callback_kwargs


def test_the_clean_panel_is_the_steps_prediction_not_the_noisy_sample():
    pipe = tiny_pipeline()
    recorder, capture = DenoisingRecorder(num_images=1, every=2), Capture()
    pipe(findings=[["cardiomegaly"]], guidance_scale=2.0, num_inference_steps=5, output_type="np",
         generator=torch.Generator().manual_seed(0), callback_on_step_end=MultiPipelineCallbacks([recorder, capture]))
    for frame, step in zip(recorder.frames, recorder.steps, strict=True):
        expected = np.round(postprocess(capture.seen[step], "np")[0, ..., 0] * 255).astype(np.uint8)
        panels = np.asarray(frame)[:16]
        assert np.array_equal(panels[:, 16:], expected)  # the same tensor through the same arithmetic
    assert not np.array_equal(np.asarray(recorder.frames[0])[:16, 16:], np.asarray(recorder.frames[0])[:16, :16])


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


def test_pipeline_py_writes_the_denoising_video_and_nothing_without_the_flag(tiny_model, tmp_path):
    common = ["--model", tiny_model, "--num_images", "3", "--batch_size", "2", "--num_inference_steps", "4",
              "--cpu_threads", "1", "--scheduler", "ddim"]  # DDIM's last step is its x0 exactly, on any CPU
    # The flag alone records 2 images.
    generation_cli.main([*common, "--output_dir", str(tmp_path / "with"), "--save_process", "--save_process_every", "3"])
    generation_cli.main([*common, "--output_dir", str(tmp_path / "without")])
    gif = Image.open(tmp_path / "with" / "denoising.gif")
    assert gif.n_frames == 2 and gif.size == (2 * 16, 2 * 16 + BAND)  # steps 1 and 4 (the last)
    assert b"synthetic" in gif.info["comment"]
    added = {p.name for p in (tmp_path / "with").iterdir()} - {p.name for p in (tmp_path / "without").iterdir()}
    assert added == {"denoising.gif", "denoising.mp4"} if has_av() else {"denoising.gif"}
    for i in range(3):  # recording changes no image
        name = f"image_{i:06d}.png"
        assert np.array_equal(np.asarray(Image.open(tmp_path / "with" / name)),
                              np.asarray(Image.open(tmp_path / "without" / name)))
    gif.seek(1)
    last = np.asarray(gif.convert("L"))
    assert np.array_equal(last[:16, 16:], np.asarray(Image.open(tmp_path / "with" / "image_000000.png")))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_sampler_records_each_step_ending_on_the_output(tiny_model, scheduler):
    """x0 from the step's own pred_original_sample (DDPM, DDIM) or from the model output (the DPM-Solvers, UniPC):
    either way the last frame's x0 is the image the run returns (exactly, on the CPU this was written on)."""
    pipe, _ = load_pipeline(tiny_model, device="cpu")
    recorder = DenoisingRecorder(num_images=1)
    ((_, images),) = iter_batches(pipe, range(2), 0, scheduler, 4, 2, progress=False, recorder=recorder)
    assert recorder.steps == [0, 1, 2, 3]
    output = np.round(images[0, ..., 0] * 255).astype(int)
    clean = [np.asarray(frame)[:16, 16:].astype(int) for frame in recorder.frames]
    # A grey level of slack: for the solvers the last x0 is computed from the model output, the image by the
    # solver's own update, and the two can round apart on another CPU.
    assert np.abs(clean[-1] - output).max() <= 1
    assert np.abs(clean[0] - output).mean() > 0  # a prediction that moves, not the output copied


def test_a_ddpm_pipelines_model_records_in_a_lunggen_pipeline_and_draws_the_same_images(tiny_model):
    ddpm = DDPMPipeline.from_pretrained(tiny_model)
    ddpm.scheduler = DDIMScheduler.from_config(ddpm.scheduler.config)
    ddpm.set_progress_bar_config(disable=True)
    plain = ddpm(batch_size=2, num_inference_steps=5, generator=torch.manual_seed(3), output_type="np").images
    pipe = LungGenPipeline(unet=ddpm.unet, scheduler=ddpm.scheduler)
    pipe.set_progress_bar_config(disable=True)
    recorder = DenoisingRecorder(num_images=2)
    recorded = pipe(batch_size=2, num_inference_steps=5, generator=torch.manual_seed(3), output_type="np",
                    callback_on_step_end=recorder).images
    assert np.array_equal(plain, recorded) and len(recorder.frames) == 5
    assert np.array_equal(np.asarray(recorder.frames[-1])[16:32, 16:], np.round(plain[1, ..., 0] * 255))


def test_the_video_files_read_back_with_every_frame_in_order(tmp_path):
    av = pytest.importorskip("av")  # the video extra; .ci/run installs it
    frames = [captioned(Image.new("L", (31, 20), 20 * i), f"SYNTHETIC {i}") for i in range(6)]
    written = save_animations({"clip": frames}, tmp_path)
    assert written == [tmp_path / "clip.gif", tmp_path / "clip.mp4"]
    gif = Image.open(written[0])
    assert gif.n_frames == 6 and gif.size == (31, 20 + BAND)
    with av.open(str(written[1])) as container:
        assert container.metadata["comment"] == "synthetic: research use only"
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and (stream.width, stream.height) == (32, 32)  # odd side padded
        decoded = [frame.to_ndarray(format="gray") for frame in container.decode(stream)]
    assert len(decoded) == 6
    levels = [float(np.median(frame[:20, :31])) for frame in decoded]
    assert np.allclose(levels, [20 * i for i in range(6)], atol=3)  # in order (H.264 is lossy, by a level or two)


def test_without_pyav_the_gifs_are_written_and_one_info_line_names_the_extra(tmp_path, monkeypatch, caplog):
    """The MP4s are an extra nobody asked for: their absence is one INFO line for all of them, no warning."""
    monkeypatch.setitem(sys.modules, "av", None)  # import av fails, as without the extra
    frames = [captioned(Image.new("L", (16, 16), 9 * i), "SYNTHETIC") for i in range(3)]
    caplog.set_level("INFO", logger="lunggen_diffusers.generation.process")
    written = save_animations({"clip": frames, "other": frames}, tmp_path)
    assert written == [tmp_path / "clip.gif", tmp_path / "other.gif"]
    assert not (tmp_path / "clip.mp4").exists()
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert caplog.records[0].getMessage() == ('clip.mp4, other.mp4 not written (the GIFs were): MP4 needs PyAV, the '
                                              'video extra: pip install -e ".[video]"')
    with pytest.raises(ImportError, match="video extra"):
        save_mp4(frames, tmp_path / "clip.mp4")


def test_training_progress_frames_are_the_previews_in_step_order(tmp_path):
    for step, level in ((1200, 90), (100, 10), (600, 50)):  # step 1200 sorts after 600, not as text
        Image.new("L", (8, 8), level).save(tmp_path / f"step-{step:07d}.png")
    (tmp_path / "step-final.png").write_bytes(b"")  # not a preview
    frames = progress_frames(tmp_path)
    assert [int(np.asarray(f)[0, 0]) for f in frames] == [10, 50, 90]
    assert all(f.size == (8, 8 + BAND) for f in frames)


def test_bad_recording_options_are_one_line(tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        generation_cli.main(["--model", tiny_model, "--output_dir", str(tmp_path), "--save_process", "40"])
    assert "--save_process 40" in capsys.readouterr().err
    with pytest.raises(ValueError, match="positive"):
        DenoisingRecorder(num_images=0)
