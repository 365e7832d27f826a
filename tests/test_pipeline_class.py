"""LungGenPipeline against diffusers' own conventions (DDPMPipeline, DiTPipeline, StableDiffusionPipeline)."""

import numpy as np
import pytest
import torch
from diffusers.callbacks import PipelineCallback

from lunggen_diffusers import LungGenPipeline, lunggen_pipeline
from lunggen_diffusers.lunggen_pipeline import OUTPUT_TYPES, postprocess

from fixtures import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _call(pipe, **kwargs):
    return pipe(**{"findings": [["cardiomegaly"], []], "num_inference_steps": 2,
                   "generator": torch.Generator().manual_seed(0), **kwargs})


def test_output_types_are_one_image_in_three_forms():
    pipe = tiny_pipeline()
    as_np = _call(pipe, output_type="np").images
    as_pt = _call(pipe, output_type="pt").images
    as_pil = _call(pipe, output_type="pil").images
    assert as_np.shape == (2, 16, 16, 1) and as_np.dtype == np.float32 and 0 <= as_np.min() <= as_np.max() <= 1
    assert tuple(as_pt.shape) == (2, 1, 16, 16) and torch.equal(as_pt.permute(0, 2, 3, 1), torch.from_numpy(as_np))
    assert [im.mode for im in as_pil] == ["L", "L"]
    assert np.array_equal(np.asarray(as_pil[0]), np.round(as_np[0, ..., 0] * 255).astype(np.uint8))


@pytest.mark.parametrize("output_type", ["latent", "PIL", "numpy"])
def test_other_output_types_are_refused_before_any_step(output_type):
    pipe = tiny_pipeline()
    calls = []
    with pytest.raises(ValueError, match=f"output_type {output_type!r} is not one of pil, np, pt"):
        _call(pipe, output_type=output_type, callback_on_step_end=lambda *a: calls.append(a) or {})
    assert calls == []
    with pytest.raises(ValueError, match="is not one of"):
        postprocess(torch.zeros(1, 1, 4, 4), output_type)
    assert OUTPUT_TYPES == ("pil", "np", "pt")


def test_batch_size_follows_findings_and_a_contradiction_is_refused():
    pipe = tiny_pipeline()
    assert len(_call(pipe, batch_size=2).images) == 2  # agrees: fine
    with pytest.raises(ValueError, match="batch_size 3 contradicts the 2 images"):
        _call(pipe, batch_size=3)
    assert len(pipe(batch_size=3, num_inference_steps=1).images) == 3  # unconditional: batch_size counts
    assert len(pipe(num_inference_steps=1).images) == 1
    with pytest.raises(TypeError, match="list of name lists"):
        pipe(findings=["cardiomegaly"], num_inference_steps=1)


def test_guidance_interval_guides_only_the_steps_inside_it():
    pipe = tiny_pipeline()
    assert pipe.scheduler.config.num_train_timesteps == 50
    pipe.scheduler.register_to_config(timestep_spacing="leading")  # 2 steps: timesteps 25 and 0
    guided = _call(pipe, output_type="np", guidance_scale=4.0).images
    unguided = _call(pipe, output_type="np", guidance_scale=1.0).images
    assert not np.allclose(guided, unguided, atol=1e-3)  # guidance 4 does change the images: the test can tell
    whole = _call(pipe, output_type="np", guidance_scale=4.0, guidance_interval=(0, 49)).images
    outside = _call(pipe, output_type="np", guidance_scale=4.0, guidance_interval=(30, 49)).images
    assert np.array_equal(whole, guided) and np.array_equal(outside, unguided)
    with pytest.raises(ValueError, match=r"guidance_interval \[30, 10\]: .* 0 <= lowest <= highest <= 49"):
        _call(pipe, guidance_interval=(30, 10))


def test_return_dict_false_is_a_tuple_of_the_same_images():
    pipe = tiny_pipeline()
    (images,) = _call(pipe, output_type="np", return_dict=False)
    assert np.array_equal(images, _call(pipe, output_type="np").images)


def test_callback_on_step_end_sees_every_step_and_can_replace_the_latents():
    pipe = tiny_pipeline()
    seen = []

    def zero_at_the_end(pipeline, i, t, kwargs):
        seen.append((i, int(t), tuple(kwargs), pipeline.num_timesteps, pipeline.guidance_scale))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == pipeline.num_timesteps - 1 else kwargs

    images = _call(pipe, num_inference_steps=3, output_type="np", guidance_scale=3.0,
                   callback_on_step_end=zero_at_the_end).images
    assert [s[0] for s in seen] == [0, 1, 2] and all(s[2:] == (("latents",), 3, 3.0) for s in seen)
    assert [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    assert np.all(images == 0.5)  # zero latents in [-1, 1] are mid-grey
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        _call(pipe, callback_on_step_end=zero_at_the_end, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_a_pipeline_callback_object_is_accepted():
    class Halve(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            return {"latents": callback_kwargs["latents"] * 0}

    images = _call(tiny_pipeline(), output_type="np", callback_on_step_end=Halve(cutoff_step_ratio=1.0)).images
    assert np.all(images == 0.5)


def test_hooks_are_freed_after_a_call(monkeypatch):
    pipe = tiny_pipeline()
    freed = []
    monkeypatch.setattr(pipe, "maybe_free_model_hooks", lambda: freed.append(True))
    _call(pipe)
    assert freed == [True]


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "tiny-cond"
    tiny_pipeline().save_pretrained(path, safe_serialization=True)
    tiny_pipeline().unet.save_pretrained(path / "unet", variant="ema")
    return path


def test_from_pretrained_hands_every_hub_keyword_to_the_download(saved, monkeypatch):
    asked = {}

    def download(repo_id, **kwargs):
        asked.update(repo_id=repo_id, **kwargs)
        return str(saved)

    monkeypatch.setattr(lunggen_pipeline, "snapshot_download", download)
    hub = {"token": "hf_private", "revision": "v1", "cache_dir": "/cache", "local_files_only": True,
           "force_download": False, "proxies": {"https": "proxy:1"}}
    pipe = LungGenPipeline.from_pretrained("org/private-model", torch_dtype=torch.bfloat16, variant="ema", **hub)
    assert asked.pop("repo_id") == "org/private-model"
    assert {k: asked[k] for k in hub} == hub  # the token of a private model reaches the Hub
    assert pipe.unet.dtype == torch.bfloat16


def test_from_pretrained_loads_a_variant_and_refuses_an_unknown_keyword(saved):
    (saved / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert LungGenPipeline.from_pretrained(saved, variant="ema").unet.dtype == torch.float32
    with pytest.raises(OSError):
        LungGenPipeline.from_pretrained(saved)  # the plain weights are gone: the variant really was what loaded
    with pytest.raises(TypeError, match="unknown keyword\\(s\\) tokne; accepted: token"):
        LungGenPipeline.from_pretrained(saved, variant="ema", tokne="hf_x")


def test_callbacks_can_read_the_steps_prediction_of_the_clean_image():
    """`pred_original_sample` in callback_kwargs: the scheduler's own x0 where its step returns one (DDPM, DDIM), the
    model output inverted on the noise schedule otherwise (DPM-Solver); on DDIM the last x0 is the output itself."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    pipe = tiny_pipeline()
    seen = []

    def record(pipeline, i, t, kwargs):
        seen.append(kwargs["pred_original_sample"].clone())
        last.append(kwargs["latents"].clone())
        return {}

    last = []

    inputs = ["latents", "pred_original_sample"]
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    images = _call(pipe, num_inference_steps=4, output_type="np", callback_on_step_end=record,
                   callback_on_step_end_tensor_inputs=inputs).images
    assert len(seen) == 4
    assert torch.equal(seen[-1], last[-1])  # DDIM's last step lands on its own (clipped) x0 exactly
    assert np.array_equal(postprocess(seen[-1], "np"), images)
    dpm_seen = []  # DPM-Solver's step returns no x0: it is computed
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    _call(pipe, num_inference_steps=3, callback_on_step_end=lambda p, i, t, k: dpm_seen.append(
        k["pred_original_sample"]) or {}, callback_on_step_end_tensor_inputs=inputs)
    assert len(dpm_seen) == 3 and all(torch.isfinite(x).all() for x in dpm_seen)
    # The computed x0 is the one diffusers' DDPM step returns, for both parameterisations.
    sample, output = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for kind in ("epsilon", "v_prediction"):
        ddpm = DDPMScheduler(prediction_type=kind, clip_sample=False)
        ddpm.set_timesteps(10)
        t = ddpm.timesteps[3]
        own = ddpm.step(output, t, sample).pred_original_sample
        assert torch.allclose(lunggen_pipeline.predicted_original(ddpm, output, sample, t), own, atol=1e-5), kind
