"""The training spine: export, exact resume, checkpoint safety, scale-out and the errors users hit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from lunggen_diffusers.cli import UsageError
from lunggen_diffusers.config import load_config
from lunggen_diffusers.generation.process import BAND
from lunggen_diffusers.hub.privacy import files_to_upload
from lunggen_diffusers.training import diffusion as training
from lunggen_diffusers.training import loop
from lunggen_diffusers.training.diffusion import train
from lunggen_diffusers.training.loop import NonFiniteLossError, find_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_smoke_train_export_and_load(tiny_config, monkeypatch):
    kept = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: kept.append(True))
    config = tiny_config(save_images_steps=2)
    result = train(config)
    assert kept == [True]  # CPU runs keep freed memory for reuse (benchmarks/cpu_allocator.py)
    out = result.output_dir
    assert result.global_step == 4 and np.isfinite(result.final_loss)
    pipe = DDPMPipeline.from_pretrained(out, use_safetensors=True)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0)).images
    assert [(im.mode, im.size) for im in images] == [("L", (32, 32))] * 2
    assert load_config(out / "training_config.json").to_dict() == config.to_dict()
    assert Image.open(out / "samples.png").size[0] >= 32
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    progress = Image.open(out / "training_progress.gif")  # the two previews in step order, captioned
    width, height = Image.open(out / "samples" / "step-0000002.png").size
    assert progress.n_frames == 2 and progress.size == (width, height + BAND)
    assert b"synthetic" in progress.info["comment"]
    assert Image.open(out / "denoising.gif").n_frames == 2  # the preview's 2 steps, x_t beside x0
    card = (out / "README.md").read_text()
    assert "![denoising](denoising.gif)" in card and "![training progress](training_progress.gif)" in card
    assert {"denoising.gif", "training_progress.gif"} <= set(files_to_upload(out))
    assert not {"denoising.mp4", "training_progress.mp4"} & set(files_to_upload(out))  # the MP4s stay local
    for grid in (out / "samples.png", out / "samples" / "step-0000004.png"):  # marked synthetic, as every PNG made
        with Image.open(grid) as im:
            assert im.text["synthetic"] == "research use only" and "not real patients" in im.text["Description"]
    # Pipeline folders hold the pipeline only: no optimizer state, no pickles.
    pipeline_files = {str(p.relative_to(out)) for d in ("unet", "scheduler") for p in (out / d).rglob("*")}
    assert pipeline_files == {"unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"}


def test_export_is_the_ema_of_the_trajectory(tiny_config):
    # Two steps, a checkpoint after each: the raw weights w1, w2 are on disk. diffusers' EMA with warm-up takes
    # decay 0 at its first update (EMA = w1) and 1 - (1 + 1 / inv_gamma) ** -power at the second.
    config = tiny_config(max_train_steps=2, checkpointing_steps=1, ema_inv_gamma=1.0, ema_power=0.75)
    result = train(config)
    w1, w2 = (load_file(str(result.output_dir / f"checkpoint-{s}" / "model.safetensors")) for s in (1, 2))
    decay = 1 - 2.0**-0.75
    exported = _weights(result.output_dir)
    assert exported.keys() == w2.keys()
    for k in w2:
        # EMAModel updates in place (ema -= (1 - decay) * (ema - w)): fp32 rounding of that order, ~1e-7 relative
        # on weights of order 0.1-1, so 1e-6 absolute; a frozen, skipped or raw-weight export misses by >1e-4.
        torch.testing.assert_close(exported[k], decay * w1[k] + (1 - decay) * w2[k], atol=1e-6, rtol=0)
    assert max((exported[k] - w2[k]).abs().max() for k in w2) > 1e-4  # the export is not the raw weights
    plain = train(tiny_config(max_train_steps=3, use_ema=False, output_dir=str(result.output_dir) + "-plain"))
    assert all(torch.equal(_weights(plain.output_dir)[k], v) for k, v in plain.unet.state_dict().items())


def test_the_unet_sees_the_stored_images_unmirrored(tiny_config, monkeypatch):
    """Whatever lies between the stored pixels and the UNet's input (loading, scaling, noising), it must not mirror
    (or otherwise move) the anatomy: with the noise set to zero, the UNet's input is sqrt(alpha_bar_t) x the stored
    image scaled to [-1, 1]."""
    stored, seen = [], []
    read = loop._WholeBatches.__getitems__

    def spy(self, indices):
        batch = read(self, indices)
        stored.append(batch["pixel_values"].clone())
        return batch

    monkeypatch.setattr(loop._WholeBatches, "__getitems__", spy)
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    real_forward = training.UNet2DModel.forward

    def record(self, sample, timestep, *args, **kwargs):
        if self.training:  # not the sample grids rendered at export
            seen.append((sample.detach().clone(), timestep.clone()))
        return real_forward(self, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(training.UNet2DModel, "forward", record)
    train(tiny_config(max_train_steps=2, checkpointing_steps=2))
    alphas = training.build_scheduler(tiny_config()).alphas_cumprod
    assert len(seen) == 2 and len(stored) >= 2  # Accelerate reads one batch ahead
    for pixels, (sample, timesteps) in zip(stored, seen, strict=False):  # the batch read ahead was not seen
        expected = pixels.float().unsqueeze(1) / 127.5 - 1
        clean = sample / alphas[timesteps].sqrt().view(-1, 1, 1, 1)
        # Elementwise fp32 arithmetic only (a scale, a multiply, a divide): a few ulps of values within [-1, 1].
        torch.testing.assert_close(clean, expected, atol=1e-5, rtol=0)
        assert (clean - expected.flip(-1)).abs().mean() > 0.05  # the phantoms are far from mirror-symmetric


def test_diffusion_loss_epsilon_v_and_min_snr_by_hand():
    scheduler = training.build_scheduler(load_config_tiny())
    clean, noise = torch.full((2, 1, 2, 2), 0.5), torch.full((2, 1, 2, 2), -1.0)
    t = torch.tensor([10, 900])
    pred = torch.zeros(2, 1, 2, 2)
    eps = training.diffusion_loss(pred, clean, noise, t, scheduler, "epsilon", None)
    assert eps.item() == pytest.approx(1.0)  # mean of (0 - (-1))^2
    a = scheduler.alphas_cumprod[t].double()
    v = a.sqrt() * -1.0 - (1 - a).sqrt() * 0.5  # v = sqrt(abar) eps - sqrt(1 - abar) x0
    assert training.diffusion_loss(pred, clean, noise, t, scheduler, "v_prediction", None).item() == \
        pytest.approx((v**2).mean().item(), rel=1e-5)
    snr = a / (1 - a)
    weighted = training.diffusion_loss(pred, clean, noise, t, scheduler, "epsilon", 5.0)
    assert weighted.item() == pytest.approx((snr.clamp(max=5.0) / snr).mean().item(), rel=1e-5)
    assert snr[0] > 5 > snr[1]  # one capped, one not: both branches of min(SNR, gamma) are exercised
    weighted_v = training.diffusion_loss(pred, clean, noise, t, scheduler, "v_prediction", 5.0)
    assert weighted_v.item() == pytest.approx((v**2 * snr.clamp(max=5.0) / (snr + 1)).mean().item(), rel=1e-5)
    # Per-pixel weights: one pixel of each image's four weighted 5x, so each image's mean error is 8/4 = 2x.
    pixel_weight = torch.ones(2, 1, 2, 2)
    pixel_weight[:, :, 0, 0] = 5.0
    weighted_pixels = training.diffusion_loss(pred, clean, noise, t, scheduler, "epsilon", None, pixel_weight)
    assert weighted_pixels.item() == pytest.approx(2.0)


def load_config_tiny():
    from lunggen_diffusers.config import from_dict

    from fixtures import TINY

    return from_dict(TINY)


class _Stop(Exception):
    pass


def test_resume_is_bit_identical(tiny_config, tmp_path, monkeypatch):
    straight = train(tiny_config(output_dir=str(tmp_path / "a")))

    real_save = loop.save_checkpoint

    def save_then_die(accelerator, config, step):
        path = real_save(accelerator, config, step)
        if step == 2:
            raise _Stop  # the run is killed right after checkpoint-2 landed
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(_Stop):
        train(tiny_config(output_dir=str(tmp_path / "b")))
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed = train(tiny_config(output_dir=str(tmp_path / "b"), resume_from_checkpoint="latest"))

    assert resumed.global_step == 4
    a, b = straight.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "raw weights differ after resume"
    ea, eb = _weights(straight.output_dir), _weights(resumed.output_dir)
    assert all(torch.equal(ea[k], eb[k]) for k in ea), "EMA weights differ after resume"
    assert resumed.final_loss == straight.final_loss


def test_checkpoint_limit_keeps_the_newest(tiny_config):
    out = train(tiny_config(checkpointing_steps=1, checkpoints_total_limit=2)).output_dir
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


def test_crash_while_writing_a_checkpoint_leaves_the_last_good_one(tiny_config, monkeypatch):
    real_save_state = Accelerator.save_state

    def dies_midway(self, output_dir=None, **kwargs):
        if output_dir.endswith("checkpoint-4.partial"):
            Path(output_dir).mkdir(parents=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
            raise _Stop
        return real_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", dies_midway)
    config = tiny_config()
    with pytest.raises(_Stop):
        train(config)
    out = Path(config.training.output_dir)
    assert find_checkpoint(out, "latest").name == "checkpoint-2"
    monkeypatch.setattr(Accelerator, "save_state", real_save_state)
    resumed = train(tiny_config(resume_from_checkpoint="latest"))
    assert resumed.global_step == 4
    assert find_checkpoint(out, "latest").name == "checkpoint-4"
    assert not (out / ".checkpoint-4.partial").exists()


def test_resume_refuses_a_changed_model_shape(tiny_config):
    train(tiny_config(max_train_steps=2))
    with pytest.raises(ValueError, match="model shape changed.*block_out_channels"):
        train(tiny_config(block_out_channels=[16, 16], resume_from_checkpoint="latest"))


def test_resume_refuses_weights_that_do_not_fit(tiny_config):
    # A checkpoint whose config matches but whose weights do not: what an older version's UNet left (its ResNet
    # blocks took a shift only, so each time projection had half the outputs).
    out = train(tiny_config(max_train_steps=2)).output_dir
    path = out / "checkpoint-2" / "model.safetensors"
    weights = load_file(str(path))
    name = next(k for k in sorted(weights) if k.endswith("time_emb_proj.weight"))
    weights[name] = weights[name][: weights[name].shape[0] // 2]
    save_file(weights, str(path))
    with pytest.raises(ValueError, match=rf"cannot resume from checkpoint-2: 1 of its weights do not fit this model "
                                         rf"\(first: {name} is \(\d+, \d+\) there, \(\d+, \d+\) here\)"):
        train(tiny_config(resume_from_checkpoint="latest"))


def test_resume_path_that_does_not_exist(tiny_config, tmp_path):
    with pytest.raises(UsageError, match="not a checkpoint folder"):
        train(tiny_config(resume_from_checkpoint=str(tmp_path / "checkpoint-99")))


def test_non_finite_loss_stops_and_names_the_last_good_checkpoint(tiny_config, monkeypatch):
    real_mse = training.F.mse_loss
    calls = {"n": 0}

    def mse_goes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real_mse(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(training.F, "mse_loss", mse_goes_nan)
    config = tiny_config()
    with pytest.raises(NonFiniteLossError, match=r"between steps 3 and 3.*checkpoint-2"):
        train(config)
    assert [p.name for p in Path(config.training.output_dir).glob("checkpoint-*")] == ["checkpoint-2"]


def test_unreadable_images_are_skipped_and_counted(tiny_config, tmp_path, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray((rng.random((40, 48)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    (folder / "notes.png").write_text("not an image")
    good = (folder / "img0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    result = train(tiny_config(train_data_dir=str(folder), max_train_steps=1))
    summary = json.loads((result.output_dir / "manifest.json").read_text())["data"]
    assert summary["num_images"] == 10
    assert "skipped 2 unreadable image(s) of 12" in caplog.text


def test_a_source_where_most_files_fail_is_an_error(tiny_config, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        (folder / f"x{i}.png").write_text("nope")
    with pytest.raises(ValueError, match="3 of 3 images could not be read"):
        train(tiny_config(train_data_dir=str(folder)))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"train_data_dir": "/nonexistent/xrays"}, "no such folder"),
        ({"resolution": 33}, "cannot be divided down"),
        ({"mixed_precision": "fp8"}, "is not one of"),
        ({"preset": "huge"}, "--preset 'huge'"),
        ({"prediction_type": "sample"}, "is not one of"),
    ],
)
def test_bad_configuration_is_one_clear_error(tiny_config, overrides, message):
    with pytest.raises(UsageError, match=message):
        train(tiny_config(**overrides))


def test_empty_folder_is_a_clear_error(tiny_config, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no source recognised \\(looked for nih: .*image_folder: image files"):
        train(tiny_config(train_data_dir=str(tmp_path / "empty")))


def test_cli_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "--resolution", "30", "--output_dir", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --resolution 30 cannot be divided down by the UNet's 4 levels: use a multiple of 8 (e.g. 64, 128, 256)"
    ]


def test_world_size_mismatch_is_refused(tiny_config, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2"):
        train(tiny_config())


DDP_WORKER = """
import hashlib, json, os, sys
from pathlib import Path
from lunggen_diffusers.training import loop, diffusion as training
from lunggen_diffusers.config import from_dict
seen, read = [], loop._WholeBatches.__getitems__
def spy(self, indices):
    seen.extend(indices)
    return read(self, indices)
loop._WholeBatches.__getitems__ = spy
result = training.train(from_dict(json.loads(Path(sys.argv[1]).read_text())))
state = result.unet.state_dict()
digest = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
Path(sys.argv[2], "rank" + os.environ["RANK"] + ".json").write_text(json.dumps({"weights": digest, "seen": seen}))
"""


@pytest.mark.parametrize("conditioning", [{}, {"condition_on": ["findings"], "phantom_finding_prob": 0.4}],
                         ids=["unconditional", "conditional"])
def test_two_process_ddp_on_cpu(tiny_config, tmp_path, conditioning):
    """The real launcher in fresh processes (gloo on CPU): each rank reads its own images, both end with the same
    weights, one export."""
    config = tiny_config(max_train_steps=2, checkpointing_steps=2, **conditioning)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict() | {"output_dir": config.training.output_dir}))
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", "0", str(tmp_path / "worker.py"), str(tmp_path / "config.json"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0]["weights"] == reports[1]["weights"], "ranks disagree on the weights"
    # 2 steps of 4 images a rank, from 24 images: well inside one epoch, so shards must not overlap.
    seen = [set(r["seen"]) for r in reports]
    assert all(len(s) >= 2 * 4 for s in seen) and not seen[0] & seen[1], seen
    out = Path(config.training.output_dir)
    assert (out / "model_index.json").is_file() and [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    assert proc.stderr.count("exported the pipeline") == 1


def test_v_prediction_min_snr_and_accumulation_step_arithmetic(tiny_config):
    # 2 optimizer steps of 2 accumulated batches: the cosine schedule must reach exactly zero at the last step.
    result = train(tiny_config(prediction_type="v_prediction", snr_gamma=5.0, gradient_accumulation_steps=2,
                               max_train_steps=2, lr_warmup_steps=0, checkpointing_steps=1))
    assert result.global_step == 2 and np.isfinite(result.final_loss)
    assert DDPMPipeline.from_pretrained(result.output_dir).scheduler.config.prediction_type == "v_prediction"
    scheduler_state = torch.load(result.output_dir / "checkpoint-2" / "scheduler.bin", weights_only=False)
    assert scheduler_state["_last_lr"] == [0.0]
    assert scheduler_state["last_epoch"] == 2


@pytest.mark.parametrize("length", [{"num_epochs": 3, "max_train_steps": None}, {"max_train_steps": 3}],
                         ids=["epochs", "steps"])
def test_a_split_the_batch_does_not_divide_runs_every_step_it_counts(tiny_config, length):
    """7 images at batch 4: the loader drops the partial batch, so an epoch is 1 step, and 3 epochs (or 3 steps)
    are 3 steps, the learning rate reaching its schedule's end at the last."""
    result = train(tiny_config(max_train_samples=7, lr_warmup_steps=0, checkpointing_steps=3, **length))
    assert result.global_step == 3
    scheduler_state = torch.load(result.output_dir / "checkpoint-3" / "scheduler.bin", weights_only=False)
    assert scheduler_state["_last_lr"] == [0.0]
