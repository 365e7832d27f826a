import csv
import json
import os
import shutil
from types import SimpleNamespace

import diffusers
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

from lunggen_diffusers.cli import UsageError
from lunggen_diffusers.config import parse_args
from lunggen_diffusers.generation import cli as generate_cli
from lunggen_diffusers.generation.output_folder import MANIFEST_FIELDS, save_images
from lunggen_diffusers.generation.sampling import (
    DEFAULT_SCHEDULER,
    SCHEDULERS,
    generate,
    load_pipeline,
    make_scheduler,
    noise_seed,
    scheduler_code,
)
from lunggen_diffusers.training.model import build_scheduler

import pipeline

STEPS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    path = tmp_path_factory.mktemp("models") / "tiny-cxr"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def pipe(model_dir):
    return load_pipeline(model_dir, device="cpu")[0]


def _save(pipe, out, n=4, **kwargs):
    kwargs = {"num_inference_steps": STEPS, "batch_size": 3, "model": "tiny-cxr", "progress": False, **kwargs}
    return save_images(pipe, str(out), n, **kwargs)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_sampler_is_deterministic_and_batch_invariant(pipe, scheduler):
    kwargs = {"seed": 7, "scheduler": scheduler, "num_inference_steps": STEPS, "output_type": "np",
              "progress": False}
    together = generate(pipe, 5, batch_size=5, **kwargs)
    np.testing.assert_array_equal(generate(pipe, 5, batch_size=5, **kwargs), together)  # same call, same bits
    split = generate(pipe, 5, batch_size=2, **kwargs)
    alone = generate(pipe, 1, batch_size=1, start_index=3, **kwargs)
    other_seed = generate(pipe, 5, batch_size=5, **{**kwargs, "seed": 8})
    assert together.shape == (5, 32, 32, 1) and together.dtype == np.float32
    # CPU conv kernels differ in the last bits by batch size, so floats agree closely rather than exactly;
    # the 8-bit images agree to within one grey level.
    np.testing.assert_allclose(split, together, atol=1e-4)
    np.testing.assert_allclose(alone[0], together[3], atol=1e-4)
    as_uint8 = lambda x: np.round(x * 255).astype(int)  # noqa: E731
    assert np.abs(as_uint8(split) - as_uint8(together)).max() <= 1
    assert not np.allclose(together[0], together[1], atol=1e-2)  # each index its own noise
    assert not np.allclose(together, other_seed, atol=1e-2)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", DEFAULT_SCHEDULER])
def test_generation_is_the_stock_pipelines_call_with_one_generator_per_image(pipe, scheduler):
    """The one denoising path: image i of seed s is diffusers' own DDPMPipeline called with the list of the images'
    generators (noise_seed(s, i)), on the sampler's scheduler; a second loop that drifted from it turns this red."""
    ours = generate(pipe, 3, seed=4, scheduler=scheduler, num_inference_steps=STEPS, output_type="np", progress=False)
    stock = DDPMPipeline(unet=pipe.unet, scheduler=make_scheduler(scheduler, pipe.scheduler.config))
    stock.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(noise_seed(4, i)) for i in range(3)]
    theirs = stock(batch_size=3, generator=generators, num_inference_steps=STEPS, output_type="np").images
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("variant, base", [("ddim-eta1", "ddim"), ("ddim-trailing", "ddim"),
                                           ("dpmsolver++-2m", "dpmsolver++"), ("dpmsolver++-2m-karras", "dpmsolver++-2m"),
                                           ("dpmsolver++-sde", "dpmsolver++-2m"),
                                           ("dpmsolver++-sde-karras", "dpmsolver++-sde"),
                                           ("dpmsolver++-3m-sde", "dpmsolver++-sde")])
def test_each_sampler_variant_samples_differently_from_its_base(pipe, variant, base):
    """A variant whose setting never reached the scheduler or its step would draw its base's images."""
    kwargs = {"seed": 3, "num_inference_steps": 6, "output_type": "np", "progress": False}
    a, b = (generate(pipe, 2, scheduler=name, **kwargs) for name in (variant, base))
    assert np.abs(a - b).mean() > 1e-3, variant


def test_trailing_spacing_starts_from_pure_noise():
    config = DDPMScheduler(num_train_timesteps=1000).config
    firsts = {}
    for name in ("ddim", "ddim-trailing"):
        scheduler = make_scheduler(name, config)
        scheduler.set_timesteps(10)
        firsts[name] = int(scheduler.timesteps[0])
    assert firsts == {"ddim": 900, "ddim-trailing": 999}


def test_zero_terminal_snr_models_sample_from_pure_noise_with_every_sampler(pipe):
    """--rescale_betas_zero_snr: the training schedule ends in pure noise, and every sampler starts there."""
    config = parse_args(["--rescale_betas_zero_snr", "true", "--prediction_type", "v_prediction"])
    scheduler = build_scheduler(config)
    plain = parse_args(["--rescale_betas_zero_snr", "false"])
    assert float(scheduler.alphas_cumprod[-1]) == 0.0 and float(build_scheduler(plain).alphas_cumprod[-1]) > 0
    zero_snr = DDPMPipeline(unet=pipe.unet, scheduler=scheduler)
    for name in SCHEDULERS:
        sampler = make_scheduler(name, scheduler.config)
        sampler.set_timesteps(STEPS)
        # Karras sigmas start at the largest sigma (4096 at diffusers' 2**-24 terminal alpha), timestep 995.
        first_snr = (1 / float(sampler.sigmas[0]) ** 2 if hasattr(sampler, "sigmas")
                     else float(scheduler.alphas_cumprod[int(sampler.timesteps[0])]))
        assert first_snr < 1e-6 and sampler.config.rescale_betas_zero_snr, name
        images = generate(zero_snr, 2, scheduler=name, num_inference_steps=STEPS, output_type="np", progress=False)
        assert np.isfinite(images).all() and images.std() > 0, name


@pytest.mark.parametrize("name", [name for name, (_, _, step) in SCHEDULERS.items() if not step])
def test_scheduler_code_builds_the_samplers_scheduler(name):
    """The model card's plain-diffusers line must build what `--scheduler name` samples with."""
    config = DDPMScheduler(clip_sample=True, prediction_type="v_prediction").config
    cls_name, code = scheduler_code(name, config)
    pipe = SimpleNamespace(scheduler=DDPMScheduler.from_config(config))
    built = eval(code, {cls_name: getattr(diffusers, cls_name), "pipe": pipe})
    assert type(built).__name__ == cls_name and dict(built.config) == dict(make_scheduler(name, config).config)


def test_scheduler_code_refuses_a_sampler_that_needs_step_arguments():
    with pytest.raises(ValueError, match="ddim-eta1.*step arguments"):
        scheduler_code("ddim-eta1", DDPMScheduler().config)


@pytest.mark.parametrize("clip_sample", [True, False])
def test_every_scheduler_keeps_the_models_x0_clipping(clip_sample):
    config = DDPMScheduler(clip_sample=clip_sample, clip_sample_range=1.0).config
    for name in SCHEDULERS:
        scheduler = make_scheduler(name, config)
        clips = scheduler.config.get("clip_sample") is True
        thresholds = scheduler.config.get("thresholding") is True and scheduler.config.sample_max_value == 1.0
        assert clips or thresholds if clip_sample else not (clips or thresholds), name


def test_generate_returns_pil_grayscale(pipe):
    images = generate(pipe, 2, num_inference_steps=STEPS, progress=False)
    assert [(im.mode, im.size) for im in images] == [("L", (32, 32))] * 2


def test_noise_seed_is_deterministic_and_distinct():
    seeds = {noise_seed(s, i) for s in range(3) for i in range(100)}
    assert len(seeds) == 300
    assert noise_seed(1, 5) == noise_seed(1, 5)


def test_bf16_output_path_does_not_crash(model_dir):
    pipe16, _ = load_pipeline(model_dir, device="cpu", dtype="bf16")
    assert pipe16.unet.dtype == torch.bfloat16
    images = generate(pipe16, 2, num_inference_steps=2, output_type="np", progress=False)
    assert images.dtype == np.float32 and 0 <= images.min() and images.max() <= 1


def test_png_bit_depth_mode_and_text_chunks(pipe, tmp_path):
    _save(pipe, tmp_path / "8", n=2, seed=3)
    _save(pipe, tmp_path / "16", n=2, seed=3, bit_depth=16)
    floats = generate(pipe, 2, seed=3, num_inference_steps=STEPS, batch_size=3, output_type="np", progress=False)
    with Image.open(tmp_path / "8" / "image_000001.png") as im8, \
            Image.open(tmp_path / "16" / "image_000001.png") as im16:
        assert im8.mode == "L"
        assert im16.mode == "I;16"
        pixels = np.asarray(im16).astype(np.int64)
        assert pixels.max() > 255
        # True 16-bit: the float output quantised to 65535 levels, not 8-bit values scaled up.
        assert np.abs(pixels - np.round(floats[1, ..., 0] * 65535)).max() <= 1
        assert np.any(pixels % 257 != 0)
        for im in (im8, im16):
            assert im.text["synthetic"] == "research use only"
            assert "synthetic" in im.text["Description"].lower()
            assert {k: im.text[k] for k in ("model", "seed", "index", "scheduler", "steps")} == {
                "model": "tiny-cxr", "seed": "3", "index": "1", "scheduler": DEFAULT_SCHEDULER, "steps": str(STEPS)}


def test_manifest_and_grid_are_complete(pipe, tmp_path):
    rows = _save(pipe, tmp_path, n=5, start_index=10, scheduler="ddim", revision="abc123")
    with open(tmp_path / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    assert manifest == rows
    assert tuple(manifest[0]) == MANIFEST_FIELDS
    assert [int(r["index"]) for r in manifest] == list(range(10, 15))
    for row in manifest:
        assert (tmp_path / row["file"]).is_file()
        assert (row["seed"], row["scheduler"], row["steps"], row["model"], row["revision"]) == (
            "0", "ddim", str(STEPS), "tiny-cxr", "abc123")
        assert row["noise_seed"] == str(noise_seed(0, int(row["index"])))
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.mode == "L" and grid.size == (3 * 32, 2 * 32)
        assert grid.text["synthetic"] == "research use only"


def test_resume_skips_images_already_written(pipe, tmp_path):
    _save(pipe, tmp_path, n=4)
    first = np.asarray(Image.open(tmp_path / "image_000001.png"))
    marker = Image.new("L", (32, 32), 123)
    marker.save(tmp_path / "image_000000.png")  # a kept image must not be regenerated
    os.remove(tmp_path / "image_000001.png")  # a lost image must be regenerated, from its own noise
    rows = _save(pipe, tmp_path, n=6, batch_size=4)
    assert np.all(np.asarray(Image.open(tmp_path / "image_000000.png")) == 123)
    # Regenerated in a batch of other images ([1, 4, 5] instead of [0, 1, 2]): the same noise, but kernels may
    # round differently there, so, as in test_same_image_whatever_the_batch_size, within one grey level.
    regenerated = np.asarray(Image.open(tmp_path / "image_000001.png")).astype(int)
    assert np.abs(regenerated - first).max() <= 1
    assert [r["index"] for r in rows] == [str(i) for i in range(6)]
    with open(tmp_path / "manifest.csv", newline="") as f:
        assert [r["index"] for r in csv.DictReader(f)] == [str(i) for i in range(6)]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="made with scheduler="):
        _save(pipe, tmp_path, n=6, scheduler="unipc" if DEFAULT_SCHEDULER != "unipc" else "ddpm")


def test_loads_a_hub_id_offline_from_the_cache(model_dir, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--lunggen-test--tiny-cxr"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    loaded, revision = load_pipeline("lunggen-test/tiny-cxr", device="cpu")
    assert isinstance(loaded, DDPMPipeline) and revision == commit


def test_cli_writes_the_images(model_dir, tmp_path, monkeypatch):
    kept = []
    monkeypatch.setattr(generate_cli, "keep_freed_memory", lambda: kept.append(True))
    out = tmp_path / "synth"
    argv = ["--model", model_dir, "--output_dir", str(out), "--num_images", "3", "--scheduler", "unipc",
            "--num_inference_steps", str(STEPS), "--batch_size", "2", "--seed", "5"]
    pipeline.main(argv)
    assert sorted(p.name for p in out.iterdir()) == [
        "grid.png", "image_000000.png", "image_000001.png", "image_000002.png", "manifest.csv"]
    with Image.open(out / "image_000002.png") as im:
        assert im.text["model"] == "tiny-cxr"  # a local model is named, never located by its path
        assert im.text["seed"] == "5" and im.text["scheduler"] == "unipc"
    assert kept == [True]  # sampling on CPU keeps freed memory for reuse


@pytest.fixture
def not_a_pipeline(model_dir, tmp_path):
    path = tmp_path / "ddim-model"
    shutil.copytree(model_dir, path)
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "_class_name": "DDIMPipeline"}))
    return str(path)


@pytest.mark.parametrize("case, extra, message", [
    ("no model_index", {"--model": "{tmp}"}, "not a DDPMPipeline"),
    ("other pipeline", {"--model": "{other}"}, "DDIMPipeline, not a DDPMPipeline"),
    ("only the unet", {"--model": "{model}/unet"}, "not a DDPMPipeline"),
    ("missing hub id offline", {"--model": "lunggen-test/absent"},
     "no local folder 'lunggen-test/absent', and no Hub model"),
    ("bad scheduler", {"--scheduler": "euler"}, "unknown scheduler 'euler'; choose one of ddpm, ddim"),
    ("zero images", {"--num_images": "0"}, "num_images must be a positive integer, got 0"),
    ("negative batch", {"--batch_size": "-2"}, "batch_size must be a positive integer, got -2"),
    ("zero steps", {"--num_inference_steps": "0"}, "num_inference_steps must be a positive integer"),
    ("bad bit depth", {"--bit_depth": "12"}, "bit_depth must be 8 or 16, got 12"),
    ("bad dtype", {"--dtype": "fp64"}, "unknown dtype 'fp64'"),
    ("output is a file", {"--output_dir": "{tmp}/taken.png"}, "is a file; give a folder"),
])
def test_cli_bad_input_is_one_line_error(case, extra, message, model_dir, not_a_pipeline, tmp_path, monkeypatch,
                                         capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "taken.png").write_bytes(b"not a folder")
    args = {"--model": model_dir, "--output_dir": str(tmp_path / "out"), "--num_images": "2",
            "--num_inference_steps": "2", **extra}
    argv = [x.format(tmp=tmp_path, other=not_a_pipeline, model=model_dir) for kv in args.items() for x in kv]
    with pytest.raises(SystemExit) as exit_:
        pipeline.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_pickle_weights_are_refused(pipe, tmp_path):
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(UsageError, match="safetensors"):
        load_pipeline(str(tmp_path), device="cpu")
