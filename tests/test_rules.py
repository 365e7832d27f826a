"""House rules that a one-line slip could break while the rest of the suite stays green (found by mutating the
code, see README "Tests"): no mirroring with --augment or in the prepare pass, exact resume with gradient
accumulation and augmentation, private pushes from every entry point, and the audit's strict threshold."""

import shutil

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from huggingface_hub import HfApi

from lunggen_diffusers.config import from_dict
from lunggen_diffusers.data.build import build_dataset, load_source
from lunggen_diffusers.evaluation.memorization import Audit
from lunggen_diffusers.hub import cli as hub_cli
from lunggen_diffusers.training import diffusion as training

from fixtures import TINY

REPO_ID = "org/lunggen-rules"
# Two optimizer steps of two accumulated batches, with augmentation, a checkpoint after each step and a push.
AUGMENTED = {**TINY, "augment": True, "gradient_accumulation_steps": 2, "max_train_steps": 2,
             "checkpointing_steps": 1, "push_to_hub": True, "hub_model_id": REPO_ID}


class FakeHub:
    """Stands in for the two HfApi calls a push makes; records the repo settings and the uploaded names."""

    def __init__(self, patch):
        self.repos, self.files = [], []
        patch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: self.repos.append({"repo_id": repo_id, **kw})
                      or f"https://huggingface.co/{repo_id}")
        patch.setattr(HfApi, "create_commit", lambda api, repo_id, operations, **kw: self.files.append(
            sorted(op.path_in_repo for op in operations)))


@pytest.fixture(scope="module")
def augmented_run(tmp_path_factory):
    """One run of AUGMENTED with what the UNet was shown: (input, timesteps, noise) of every training forward."""
    out = tmp_path_factory.mktemp("augmented") / "out"
    seen, noises = [], []
    real_forward, real_randn_like = UNet2DModel.forward, torch.randn_like

    def forward(self, sample, timestep, *args, **kwargs):
        if self.training:  # not the sample grid rendered at export
            seen.append((sample.detach().clone(), timestep.clone()))
        return real_forward(self, sample, timestep, *args, **kwargs)

    def randn_like(x, *args, **kwargs):  # records the noise, changes nothing
        noise = real_randn_like(x, *args, **kwargs)
        noises.append(noise.clone())
        return noise

    with pytest.MonkeyPatch.context() as patch:
        fake_hub = FakeHub(patch)
        patch.setattr(UNet2DModel, "forward", forward)
        patch.setattr(torch, "randn_like", randn_like)
        config = from_dict({**AUGMENTED, "output_dir": str(out)})
        result = training.train(config)
    return {"config": config, "result": result, "seen": seen, "noises": noises, "hub": fake_hub}


def _correlations(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of every image with every reference, (N, M): blind to brightness and contrast."""
    a, b = images.flatten(1).double(), references.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T


def test_augmented_training_input_is_never_mirrored(augmented_run):
    """With --augment, every image the UNet is trained on resembles a stored image more than any mirrored one."""
    config, seen, noises = augmented_run["config"], augmented_run["seen"], augmented_run["noises"]
    stored, _ = build_dataset(config)
    stored = torch.from_numpy(np.stack([np.asarray(image) for image in stored["image"]])).float().unsqueeze(1)
    stored = stored / 127.5 - 1
    alphas = training.build_scheduler(config).alphas_cumprod
    assert len(seen) == len(noises) == 4  # 2 steps x 2 accumulated batches
    for (sample, timesteps), noise in zip(seen, noises, strict=True):
        a = alphas[timesteps].view(-1, 1, 1, 1)
        # Undo the noising. sample is fp32 with |values| < 6, so off by < 1e-6; dividing by sqrt(alpha_bar) >= 6e-3
        # (t = 999) leaves < 2e-4 per pixel, which moves a correlation of 1,024 pixels of spread ~0.4 by < 1e-3.
        clean = (sample - (1 - a).sqrt() * noise) / a.sqrt()
        to_stored = _correlations(clean, stored).max(1).values
        to_mirrored = _correlations(clean, stored.flip(-1)).max(1).values
        # Measured margins 0.04-0.19 per image (mean 0.1); a mirrored input reverses them.
        assert (to_stored > to_mirrored).all() and (to_stored - to_mirrored).mean() > 0.05, (to_stored, to_mirrored)
        # The augmentation did run: no input is a stored image as is (its difference is far above the 2e-4 above).
        unchanged = (clean[:, None] - stored[None]).abs().flatten(2).max(2).values.min(1).values
        assert (unchanged > 0.05).all(), unchanged


def test_resume_with_accumulation_and_augmentation_is_bit_identical(augmented_run, tmp_path):
    """Resuming from checkpoint-1 must skip exactly the 2 batches of step 1 and draw the augmentations the
    uninterrupted run drew: same machine, so bit-identical weights."""
    straight = augmented_run["result"]
    shutil.copytree(straight.output_dir / "checkpoint-1", tmp_path / "checkpoint-1")
    resumed = training.train(from_dict({**AUGMENTED, "output_dir": str(tmp_path), "push_to_hub": False,
                                        "resume_from_checkpoint": "latest"}))
    assert resumed.global_step == 2
    a, b = straight.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "raw weights differ after resume"
    assert resumed.final_loss == straight.final_loss


def test_the_push_at_export_is_private_by_default(augmented_run):
    fake_hub = augmented_run["hub"]
    assert [repo["repo_id"] for repo in fake_hub.repos] == [REPO_ID] and fake_hub.repos[0]["private"] is True
    assert not any(name.startswith("checkpoint-") for name in fake_hub.files[0])


def test_the_push_command_is_private_by_default(augmented_run, monkeypatch):
    fake_hub = FakeHub(monkeypatch)
    assert hub_cli.main(["push", str(augmented_run["result"].output_dir), "--repo_id", "org/other"]) is None
    assert fake_hub.repos[0]["repo_id"] == "org/other" and fake_hub.repos[0]["private"] is True


def test_the_prepare_pass_keeps_every_image_as_it_is(tiny_config):
    """Phantom images are 8-bit L at the training resolution: preparing them runs no arithmetic (no conversion, no
    resize), so the stored pixels equal the source's exactly; a mirror or any other move would show."""
    config = tiny_config()
    source, _ = load_source(config)
    prepared, _ = build_dataset(config)
    expected = np.stack([np.asarray(image) for image in source[:]["image"]])
    assert expected.shape == (TINY["num_phantom_images"], 32, 32)
    np.testing.assert_array_equal(np.stack([np.asarray(image) for image in prepared["image"]]), expected)


def test_the_audit_flags_only_similarities_above_the_nulls_percentile():
    """"Exceeds" is strict: an image exactly at a threshold is not flagged. The values are set by hand, so the
    equality is exact (no product computed them)."""
    at, above = np.float32(0.5), np.nextafter(np.float32(0.5), np.float32(1))
    values = np.array([at, above, 0, 0], np.float32)
    result = Audit(gen_ncc=values, gen_ncc_index=np.arange(4), gen_cos=values[::-1].copy(),
                   gen_cos_index=np.arange(4, 8), null_ncc=values[:3].copy(), null_cos=values[[2, 0, 1]],
                   ncc_threshold=float(at), cos_threshold=float(at), percentile=50.0)
    assert result.flagged.tolist() == [False, True, True, False]
    assert result.null_flagged.tolist() == [False, True, True]
    # Image 2 is flagged by the cosine alone, so its match is its cosine neighbour (6); the others keep NCC's.
    np.testing.assert_array_equal(result.matched_index(), [0, 1, 6, 3])
