"""The latent route: the autoencoder stage (trained, resumed exactly, judged), the latent cache and its invalidation,
and the exported pipeline's round trip (both loaders, the sampling CLI, conditional too)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from lunggen_diffusers import LungGenPipeline
from lunggen_diffusers.cli import UsageError
from lunggen_diffusers.data.phantom import phantom_dataset
from lunggen_diffusers.data.transforms import to_model_input
from lunggen_diffusers.evaluation import autoencoder as judging
from lunggen_diffusers.evaluation import phantom_classifier as pc
from lunggen_diffusers.evaluation.metrics import ms_ssim, ssim
from lunggen_diffusers.generation.cli import main as generate_main
from lunggen_diffusers.generation.sampling import image_side
from lunggen_diffusers.hub.privacy import files_to_upload
from lunggen_diffusers.lunggen_pipeline import encode_moments, sample_latents
from lunggen_diffusers.training import loop
from lunggen_diffusers.training.autoencoder import latent_statistics, load_autoencoder
from lunggen_diffusers.training.autoencoder_report import main as report_main
from lunggen_diffusers.training.autoencoder_stage import (
    random_crops,
    reconstruction_loss,
)
from lunggen_diffusers.training.cli import main as train_main
from lunggen_diffusers.training.diffusion import train
from lunggen_diffusers.training.latents import cached_latents

REPO = Path(__file__).resolve().parents[1]
LATENT = {"latent": True, "vae_block_out_channels": [8, 16], "vae_norm_num_groups": 8, "latent_channels": 4,
          "vae_max_train_steps": 4, "vae_train_batch_size": 4, "vae_learning_rate": 1e-3,
          "attention_resolutions": [], "max_train_steps": 4}
TINY_CLASSIFIER = pc.ClassifierSettings(resolution=32, num_train=64, num_test=16, steps=20, batch_size=32,
                                        feature_dim=16)


@pytest.fixture(autouse=True)
def tiny_classifier(tmp_path_factory, monkeypatch):
    """The judge's phantom classifier, tiny (the real one trains for minutes): a stand-in for the instrument, so
    these tests check the plumbing, not the figures."""
    classifier = pc.load_classifier(TINY_CLASSIFIER, cache_dir=str(tmp_path_factory.getbasetemp() / "clf"),
                                    progress=False)
    monkeypatch.setattr(judging, "load_classifier", lambda progress=True: classifier)
    return classifier


@pytest.fixture
def latent_config(tiny_config, tmp_path):
    def make(**overrides):
        return tiny_config(**{**LATENT, "cache_dir": str(tmp_path / "cache"), **overrides})
    return make


def test_a_latent_run_trains_and_judges_the_autoencoder_then_exports_one_pipeline(latent_config):
    config = latent_config()
    result = train(config)
    out, stage = Path(config.training.output_dir), Path(config.training.output_dir) / "autoencoder"
    report = json.loads((stage / "report.json").read_text())
    assert {"psnr_db", "ssim", "ms_ssim", "fd_reconstructions", "fd_floor", "nodule_retention"} <= set(report)
    assert set(report["agreement"]) == set(pc.BINARY_OUTPUTS) and report["num_images"] == 256
    assert Image.open(stage / "reconstructions.png").size == (8 * 32, 2 * 32)  # originals over reconstructions
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    # Measured on the training latents, not Stable Diffusion's constant; the exported autoencoder is stage 1's.
    assert vae_config["scaling_factor"] != pytest.approx(0.18215) and vae_config["in_channels"] == 1
    stage_weights, exported = (load_file(str(p / "diffusion_pytorch_model.safetensors"))
                               for p in (stage, out / "vae"))
    assert all(torch.equal(stage_weights[k], exported[k]) for k in stage_weights)
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert (unet["in_channels"], unet["sample_size"]) == (4, 16) and result.global_step == 4
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["lunggen_pipeline", "LungGenPipeline"] and index["vae"][1] == "AutoencoderKL"
    card = (out / "README.md").read_text()
    assert "Stage 1: the autoencoder" in card and "Research use only" in card and "latent-diffusion" in card
    assert json.loads((out / "autoencoder_report.json").read_text()) == report
    upload = files_to_upload(out)
    assert "vae/diffusion_pytorch_model.safetensors" in upload and "autoencoder_report.json" in upload
    assert not any(f.startswith(("autoencoder/", "checkpoint-")) for f in upload)  # held-out patients stay local


def test_the_pipeline_round_trip_same_images_both_ways_and_from_the_cli(latent_config, tmp_path):
    config = latent_config(output_dir=str(tmp_path / "model"))
    train(config)
    folder = config.training.output_dir
    package = LungGenPipeline.from_pretrained(folder)
    remote = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(remote).__name__ == "LungGenPipeline" and remote.vae is not None
    a, b = (p(batch_size=3, num_inference_steps=3, generator=torch.manual_seed(1), output_type="np").images
            for p in (package, remote))
    assert a.shape == (3, 32, 32, 1) and np.array_equal(a, b)
    latents = package(batch_size=1, num_inference_steps=2, output_type="latent").images
    assert tuple(latents.shape) == (1, 4, 16, 16)
    with pytest.raises(ValueError, match="trained without labels"):
        package(findings=[["Nodule"]], num_inference_steps=2)
    with pytest.raises(ValueError, match=r"guidance_interval \[10, 30\]: a model trained without labels"):
        package(batch_size=1, num_inference_steps=2, guidance_interval=(10, 30))
    runs = []
    for batch in (4, 3):
        target = tmp_path / f"gen-{batch}"
        generate_main(["--model", folder, "--output_dir", str(target), "--num_images", "4", "--num_inference_steps",
                       "3", "--batch_size", str(batch), "--bit_depth", "16", "--cpu_threads", "1"])
        runs.append([np.asarray(Image.open(target / f"image_{i:06d}.png")) for i in range(4)])
    # Batch-invariant as the pixel route is (test_sampling.py): CPU conv kernels differ in the last bits by batch
    # size, so the 16-bit images agree to within 1e-4 of full scale (7 of 65,535 levels), not exactly.
    assert runs[0][0].dtype == np.uint16
    assert max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(*runs, strict=True)) <= 7


def test_a_conditional_latent_model_takes_findings(latent_config, tmp_path):
    config = latent_config(condition_on=["findings"], phantom_finding_prob=0.5, latent_normalization="channel")
    train(config)
    pipe = LungGenPipeline.from_pretrained(config.training.output_dir)
    assert pipe.vae is not None and pipe.labels.findings
    # The per-channel standardisation travels with the exported autoencoder and is named on the card.
    assert len(pipe.vae.config.latents_std) == pipe.vae.config.latent_channels
    assert "per channel" in (Path(config.training.output_dir) / "README.md").read_text()
    images = pipe(findings=[["nodule"], []], guidance_scale=2.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 32, 32, 1)
    # What the benchmarks size their reference phantoms and instruments by: the images', not the latent's side.
    assert image_side(pipe) == 32 and pipe.unet.config.sample_size < 32


def test_the_latent_cache_encodes_once_and_misses_when_the_data_or_the_autoencoder_change(tmp_path, monkeypatch):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), norm_num_groups=8,
                        latent_channels=4, mid_block_add_attention=False).eval()
    data = phantom_dataset(6, 32, seed=0)
    moments = np.asarray(cached_latents(data, vae, tmp_path, batch_size=4, progress=False))
    pixels = torch.from_numpy(np.stack([np.asarray(i) for i in data["image"]]))
    expected = encode_moments(vae, to_model_input(pixels)).numpy()
    assert moments.shape == (6, 8, 16, 16) and np.allclose(moments, expected, atol=2e-3, rtol=1e-3)  # float16
    mirrored = encode_moments(vae, to_model_input(pixels.flip(-1))).numpy()
    assert np.abs(moments - mirrored).mean() > 10 * np.abs(moments - expected).mean()  # never flipped
    first = sorted(tmp_path.glob("latents-*.npy"))

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again although the cache holds these latents")

    monkeypatch.setattr("lunggen_diffusers.training.latents.encode_moments", no_encoding)
    vae.register_to_config(scaling_factor=1.7, shift_factor=0.1)  # re-measured scale: applied later, same latents
    assert np.array_equal(cached_latents(data, vae, tmp_path, progress=False), moments)
    vae.register_to_config(**latent_statistics(moments[:, :4], "channel"))  # so is a per-channel one
    assert np.array_equal(cached_latents(data, vae, tmp_path, progress=False), moments)
    vae.save_pretrained(tmp_path / "copy")  # the same autoencoder, loaded from another folder
    copied = AutoencoderKL.from_pretrained(tmp_path / "copy")
    assert np.array_equal(cached_latents(data, copied, tmp_path, progress=False), moments)
    monkeypatch.undo()
    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] += 0.5  # a retrained autoencoder
    cached_latents(data, vae, tmp_path, progress=False)
    cached_latents(phantom_dataset(6, 32, seed=1), vae, tmp_path, progress=False)  # other prepared data
    assert len(sorted(tmp_path.glob("latents-*.npy"))) == 3 and first[0].exists()


def test_the_autoencoder_stage_resumes_bit_identically(latent_config, tmp_path, monkeypatch):
    straight = latent_config(output_dir=str(tmp_path / "a"), stage="autoencoder", checkpointing_steps=2)
    assert train(straight) is None  # --stage autoencoder stops after it
    real_save = loop.save_checkpoint

    def save_then_die(accelerator, config, step):
        path = real_save(accelerator, config, step)
        if step == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    resumed = latent_config(output_dir=str(tmp_path / "b"), stage="autoencoder", checkpointing_steps=2)
    with pytest.raises(KeyboardInterrupt):
        train(resumed)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    train(latent_config(output_dir=str(tmp_path / "b"), stage="autoencoder", checkpointing_steps=2,
                        resume_from_checkpoint="latest"))
    a, b = (load_file(str(tmp_path / run / "autoencoder" / "diffusion_pytorch_model.safetensors")) for run in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "a" / "unet").exists()


def test_a_pretrained_three_channel_autoencoder_is_judged_then_used_with_channel_replication(latent_config,
                                                                                              tmp_path):
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4,
                  mid_block_add_attention=False).save_pretrained(tmp_path / "sd-like" / "vae")
    config = latent_config(vae=str(tmp_path / "sd-like"))
    before = load_autoencoder(str(tmp_path / "sd-like")).state_dict()
    train(config)
    out = Path(config.training.output_dir)
    assert (out / "autoencoder" / "report.json").is_file()  # judged before the UNet trained on it
    after = load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # used as it is, not trained
    images = LungGenPipeline.from_pretrained(out)(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 32, 32, 1)  # three output channels averaged to gray


def test_the_report_command_judges_a_trained_autoencoder(latent_config, tmp_path, capsys):
    config = latent_config(stage="autoencoder")
    train(config)
    stage = Path(config.training.output_dir) / "autoencoder"
    report_main(["--vae", str(stage), "--output_dir", str(tmp_path / "report"), "--num_images", "16",
                 "--features", "pixels"])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["num_images"] == 16 and report["features"].startswith("pixels")
    assert "PSNR" in capsys.readouterr().out and (tmp_path / "report" / "report.md").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--latent", "--augment"], "--augment works on pixels"),
    (["--stage", "autoencoder"], "--stage autoencoder belongs to the latent route"),
    (["--latent", "--resolution", "36"], "--resolution 36 cannot be divided down by the autoencoder"),
    (["--latent", "--vae_crop_size", "100"], "--vae_crop_size 100: give a side between 8 and --resolution 64"),
])
def test_latent_options_that_cannot_work_are_refused_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--max_train_steps", "1", *flags])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err


def test_a_value_outside_the_options_choices_is_argparses_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--latent", "--latent_normalization", "layer"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "invalid choice: 'layer' (choose from 'global', 'channel')" in err


def test_a_missing_autoencoder_is_one_line(latent_config, tmp_path):
    with pytest.raises(UsageError, match="no autoencoder there"):
        train(latent_config(vae=str(tmp_path), stage="diffusion"))


def test_ssim_and_psnr_by_hand():
    a = np.random.default_rng(0).integers(0, 256, (2, 32, 32), dtype=np.uint8)
    assert ms_ssim(a, a, scales=1).tolist() == [1.0, 1.0] and judging.psnr(a, a).tolist() == [100.0, 100.0]
    b = a.astype(np.int16)
    b[:, :16] += np.where(b[:, :16] < 250, 5, -5)  # every changed pixel off by 5: MSE 12.5
    assert judging.psnr(a, b.astype(np.uint8)) == pytest.approx(10 * np.log10(255**2 / 12.5))
    assert 0 < ms_ssim(a, b.astype(np.uint8), scales=1)[0] < 1


def test_autoencoder_crops_are_windows_of_the_image_never_mirrored():
    torch.manual_seed(0)
    images = torch.randn(6, 1, 32, 32)
    crops = random_crops(images, 16)
    assert crops.shape == (6, 1, 16, 16) and random_crops(images, None) is images
    for image, crop in zip(images[:, 0], crops[:, 0], strict=True):
        windows = image.unfold(0, 16, 1).unfold(1, 16, 1)  # every 16 x 16 window, (17, 17, 16, 16)
        assert (windows == crop).flatten(2).all(2).any()
        assert not (windows == crop.flip(-1)).flatten(2).all(2).any()


def test_the_autoencoder_loss_is_l1_plus_weighted_one_minus_ssim_plus_weighted_kl():
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    shifted = (images + 0.1).clamp(-1, 1)
    kl = torch.tensor([3.0, 5.0])
    assert reconstruction_loss(lambda x: (x, kl * 0), images, 1e-6, 0.5).item() == pytest.approx(0.0, abs=1e-6)
    by_hand = (shifted - images).abs().mean() + 0.5 * (1 - ssim(shifted, images).mean()) + 0.01 * kl.mean()
    assert reconstruction_loss(lambda x: (shifted, kl), images, 0.01, 0.5).item() == pytest.approx(by_hand.item())
    assert ssim(shifted, images).min() < 1 - 1e-3  # the term is not idle on a small change


def test_the_unet_sees_the_cached_latents_scaled_and_unmirrored(latent_config, monkeypatch):
    """Between the cache and the UNet's input (a draw from the posterior, the scale, the noising) the latent must not
    be mirrored or moved: with every noise set to zero, the input is sqrt(alpha_bar_t) (mean - shift) * scale."""
    from diffusers.configuration_utils import FrozenDict

    from lunggen_diffusers.training import diffusion as training

    config = latent_config()
    scheduler = training.build_scheduler(config)
    moments = torch.randn(3, 8, 16, 16)
    vae_config = FrozenDict(scaling_factor=1.7, shift_factor=0.2)
    seen = []

    def unet(sample, timesteps, **kwargs):
        seen.append((sample, timesteps))
        return type("Out", (), {"sample": torch.zeros_like(sample)})()

    monkeypatch.setattr(torch, "randn", lambda *a, **k: torch.zeros(*a[:1], **{k_: v for k_, v in k.items()
                                                                                 if k_ != "generator"}))
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    training.train_step({"latents": moments}, unet, scheduler, config, torch.Generator(), vae_config)
    sample, timesteps = seen[0]
    expected = (moments[:, :4] - 0.2) * 1.7
    clean = sample / scheduler.alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(clean, expected, atol=1e-5, rtol=1e-5)  # elementwise fp32 only
    assert (clean - expected.flip(-1)).abs().mean() > 0.1


@pytest.mark.parametrize("normalization", ["global", "channel"])
def test_latent_standardisation_is_measured_and_undone_by_the_decoder(normalization):
    from diffusers.configuration_utils import FrozenDict

    from lunggen_diffusers.lunggen_pipeline import latent_moments

    generator = torch.Generator().manual_seed(0)
    spread, centre = torch.tensor([0.3, 1.0, 2.5, 0.7]), torch.tensor([0.1, -0.4, 0.0, 2.0])
    means = torch.randn(64, 4, 8, 8, generator=generator) * spread.view(1, 4, 1, 1) + centre.view(1, 4, 1, 1)
    vae_config = FrozenDict(**latent_statistics(means.numpy(), normalization))
    scaled = sample_latents(torch.cat([means, torch.zeros_like(means)], 1), vae_config)
    per_channel_std = scaled.std((0, 2, 3), unbiased=False)
    if normalization == "channel":  # every channel at zero mean and unit variance: none drowned first by the noise
        torch.testing.assert_close(per_channel_std, torch.ones(4), atol=1e-4, rtol=0)
        torch.testing.assert_close(scaled.mean((0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    else:  # unit variance overall; the channels keep their own spreads (0.3 : 2.5)
        assert scaled.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
        assert per_channel_std[2] / per_channel_std[0] == pytest.approx(2.5 / 0.3, rel=0.05)
    centre_, spread_ = latent_moments(vae_config, scaled)  # what decode_latents applies before the decoder
    torch.testing.assert_close(scaled / vae_config["scaling_factor"] * spread_ + centre_, means, atol=1e-4, rtol=1e-4)
