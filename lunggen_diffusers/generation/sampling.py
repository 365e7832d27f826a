"""Sampling: load a DDPMPipeline (or a conditional LungGenPipeline), choose the scheduler, and run the reproducible
sampling loop. Writing the images to a folder (PNGs, manifest, grid) is `output_folder.py`'s.

Image i is a function of (seed, i) and its labels alone: its initial noise and the noise the stochastic schedulers
inject come from its own CPU generator (and `labels_from` draws its labels from its own generator too), so batch
size never changes which image comes out and any image can be regenerated from its index.
"""

import json
import os
import random
from inspect import signature
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HFValidationError
from tqdm.auto import tqdm

from ..cli import UsageError
from ..lunggen_pipeline import (
    MODULE_NAME,
    LungGenPipeline,
    check_guidance_interval,
    downsampling,
)
from ..utils import pick_device
from ..vocabulary import as_model_names


class StochasticDDIMScheduler(DDIMScheduler):
    """DDIM for eta > 0, finite at a zero-SNR first step. There sigma_t^2 equals 1 - alpha_prev, and diffusers'
    sqrt(1 - alpha_prev - sqrt(variance)^2) came out sqrt(-6e-8), a NaN image, on an AMD EPYC (0 on the Xeons): the
    variance is held 1e-6 (relative) under that bound, far below anything a sample shows."""

    def _get_variance(self, timestep, prev_timestep):
        return super()._get_variance(timestep, prev_timestep) * (1 - 1e-6)


# name: (class, config overrides, keyword arguments of every step). Order 3 is what diffusers' docs recommend for
# unconditional sampling (2 for guided sampling); few-step runs keep lower_order_final (the default) so the last
# steps stay stable. "trailing" spacing starts at the last training timestep, where "leading" (diffusers' DDIM
# default) starts short of pure noise (Lin et al. 2024). Tried on the demo and left out, with the figures in
# benchmarks/HISTORY.md ("Samplers"): Euler ancestral (diffusers clips no x0 there) and Heun (diverges on the
# clipped pixel models).
SCHEDULERS = {
    "ddpm": (DDPMScheduler, {}, {}),
    "ddim": (DDIMScheduler, {}, {}),
    "ddim-trailing": (DDIMScheduler, {"timestep_spacing": "trailing"}, {}),
    "ddim-eta1": (StochasticDDIMScheduler, {}, {"eta": 1.0}),  # as stochastic as DDPM, on DDIM's shortened schedule
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 3}, {}),
    "dpmsolver++-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}, {}),
    "dpmsolver++-2m-karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                            "use_karras_sigmas": True}, {}),
    "dpmsolver++-sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, {}),
    "dpmsolver++-sde-karras": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                                             "use_karras_sigmas": True}, {}),
    "dpmsolver++-3m-sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, {}),
    "unipc": (UniPCMultistepScheduler, {"solver_order": 3}, {}),
}
# Third-order SDE-DPM-Solver++, 25 steps: the sampler benchmark's choice against DDPM-1000 on features that see
# anatomy (its figures: benchmarks/README.md, the tables behind them: benchmarks/HISTORY.md, "Samplers").
# Stochastic steps wash out errors an under-trained model's ODE keeps. It needs nothing but a scheduler swap in
# plain diffusers (the card shows how).
DEFAULT_SCHEDULER, DEFAULT_STEPS = "dpmsolver++-3m-sde", 25
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LABELS_FROM = ("train",)


def check_scheduler(name: str) -> None:
    if name not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def scheduler_settings(name: str, config) -> tuple[type, dict]:
    """The scheduler class of sampler `name` and what it overrides of a model's training scheduler `config`."""
    check_scheduler(name)
    cls, overrides, _ = SCHEDULERS[name]
    if config.get("clip_sample") and "clip_sample" not in signature(cls.__init__).parameters:
        # The model's own scheduler clips predicted x0 to [-1, 1]; solvers without clip_sample get the same
        # through thresholding (at sample_max_value the threshold is a plain clip). Without it they diverge
        # on pixel models that lean on the clip.
        overrides = {**overrides, "thresholding": True, "sample_max_value": config.get("clip_sample_range", 1.0)}
    return cls, overrides


def make_scheduler(name: str, config):
    """A fresh scheduler `name` built from another scheduler's config (the model's training noise schedule)."""
    cls, overrides = scheduler_settings(name, config)
    return cls.from_config(config, **overrides)


def scheduler_code(name: str, config) -> tuple[str, str]:
    """(class name, the Python that builds sampler `name` on `pipe`) in plain diffusers, for model cards."""
    cls, overrides = scheduler_settings(name, config)
    if SCHEDULERS[name][2]:
        raise UsageError(f"sampler {name!r} needs step arguments ({SCHEDULERS[name][2]}) that diffusers' pipelines "
                         "do not pass; it cannot be written as a scheduler swap")
    value = lambda v: f'"{v}"' if isinstance(v, str) else repr(v)  # noqa: E731
    arguments = "".join(f", {k}={value(v)}" for k, v in overrides.items())
    return cls.__name__, f"{cls.__name__}.from_config(pipe.scheduler.config{arguments})"


def _torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("dtype 'bf16' is not supported by this GPU; use fp16 or fp32")
    return DTYPES[dtype]


TEXT_TO_IMAGE = "StableDiffusionPipeline"  # what a latent text model exports as, and what RoentGen ships
PROMPT_CONFIG_FILE = "prompt_config.json"  # hub.privacy.PROMPT_CONFIG: a text model's prompt settings
STABLE_DIFFUSION_GUIDANCE = 7.5  # StableDiffusionPipeline.__call__'s default guidance_scale


def _model_index(model: str, revision: str | None) -> tuple[str, str]:
    """Path of the model's model_index.json and the revision to record (commit hash for Hub models)."""
    if os.path.isdir(model):
        path = os.path.join(model, "model_index.json")
        if not os.path.isfile(path):
            raise UsageError(f"model folder {model!r} has no model_index.json; it is not a DDPMPipeline")
        return path, ""
    if os.path.exists(model):
        raise UsageError(f"model {model!r} is a file; give a DDPMPipeline folder or a Hub model id")
    try:
        path = hf_hub_download(model, "model_index.json", revision=revision)
    except HFValidationError:
        raise UsageError(f"model {model!r} is neither a local folder nor a valid Hub model id") from None
    except OSError as err:  # LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, ...
        raise UsageError(
            f"no local folder {model!r}, and no Hub model by that id (revision {revision or 'main'}) online or in "
            f"the local cache ({type(err).__name__})"
        ) from None
    # The Hub cache stores every file under snapshots/<commit>/, so the folder name pins the exact revision.
    return path, os.path.basename(os.path.dirname(path))


def load_pipeline(model: str, revision: str | None = None, device: str | None = None, dtype: str = "fp32"):
    """Load a DDPMPipeline or a LungGenPipeline (safetensors only) onto `device`; returns (pipe, resolved revision)."""
    index_path, resolved = _model_index(model, revision)
    with open(index_path) as f:
        class_name = json.load(f).get("_class_name")
    classes = {"DDPMPipeline": DDPMPipeline, (MODULE_NAME, "LungGenPipeline"): LungGenPipeline}
    if class_name == TEXT_TO_IMAGE:  # imported only for one: its module warns at import without torchvision
        from diffusers import StableDiffusionPipeline

        classes[TEXT_TO_IMAGE] = StableDiffusionPipeline
    cls = classes.get(tuple(class_name) if isinstance(class_name, list) else class_name)
    if cls is None:
        raise UsageError(f"model {model!r} is a {class_name or 'unknown pipeline'}, not a DDPMPipeline, a "
                         f"LungGenPipeline or a {TEXT_TO_IMAGE}")
    target = pick_device(device)
    torch_dtype = _torch_dtype(dtype, target)
    try:
        pipe = cls.from_pretrained(model, revision=resolved or revision, use_safetensors=True, dtype=torch_dtype)
    except OSError as err:  # e.g. a missing component, or weights only as pickle (.bin), which we refuse
        raise UsageError(f"cannot load {cls.__name__} {model!r}: {str(err).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    if cls.__name__ == TEXT_TO_IMAGE:
        # Driven by the one denoising loop (the same images as the stock pipeline from the same generators). This
        # project's text models keep their prompt settings beside the stock files; an outside model (a
        # RoentGen-style Stable Diffusion) is guided at Stable Diffusion's own default.
        found = _optional_file(model, PROMPT_CONFIG_FILE, resolved or revision)
        settings = json.loads(Path(found).read_text()) if found else {"guidance_scale": STABLE_DIFFUSION_GUIDANCE}
        pipe = LungGenPipeline(unet=pipe.unet, scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder,
                               tokenizer=pipe.tokenizer, prompt_config=settings)
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(target), resolved


def _optional_file(model: str, name: str, revision: str | None) -> str | None:
    if os.path.isdir(model):
        path = os.path.join(model, name)
        return path if os.path.isfile(path) else None
    try:
        return hf_hub_download(model, name, revision=revision)
    except OSError:  # EntryNotFoundError and its kin: the file is optional
        return None


def image_side(pipe) -> int:
    """The side of the images a pipeline returns: the UNet's, times the autoencoder's downsampling on the latent
    route (where the UNet's own sample size is the latent's)."""
    side = pipe.unet.config.sample_size
    side = side if isinstance(side, int) else side[0]
    vae = getattr(pipe, "vae", None)
    return side * downsampling(vae) if vae is not None else side


def model_label(model: str) -> str:
    """What to record about the model: a Hub id as is, a local folder by its name only (no filesystem path)."""
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model


def noise_seed(seed: int, index: int, attempt: int = 0) -> int:
    """Seed of image `index`'s own generator: a well-mixed 64-bit hash of (seed, index), so no two pairs collide;
    the privacy filter's k-th redraw of the image hashes (seed, index, k)."""
    entropy = [seed, index, attempt] if attempt else [seed, index]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value}")


def is_conditional(pipe) -> bool:
    return isinstance(pipe, LungGenPipeline) and pipe.labels is not None


def is_text(pipe) -> bool:
    """A report-conditioned model: it takes prompts."""
    return getattr(pipe, "text_encoder", None) is not None


def request_prompts(pipe, indices, prompts=None) -> dict[int, str] | None:
    """Each image's prompt: `prompts` one text for every image or a list, one per image in index order."""
    if prompts is None:
        return None
    if not is_text(pipe):
        raise UsageError("a prompt was given to a model trained without text; train one with --condition_on report")
    indices = list(indices)
    if isinstance(prompts, str):
        return dict.fromkeys(indices, prompts)
    if len(prompts) != len(indices):
        raise UsageError(f"{len(prompts)} prompts for {len(indices)} images: give one prompt, or one per image")
    return dict(zip(indices, prompts, strict=True))


def request_labels(pipe, indices, seed=0, findings=None, labels_from=None, patient=None) -> dict[int, list[str] | None]:
    """Each image's labels (None: the null condition). `findings` applies to every image; `labels_from="train"`
    draws image i's labels from the stored label counts with a generator of (seed, i), so they too depend on the
    index alone. `patient` ({"sex": "F", "age": 70, "view": "PA"}, any of them) joins `findings`, or restricts
    the draws to training combinations of that patient."""
    patient = {k: v for k, v in (patient or {}).items() if v is not None}
    if patient and findings is None and labels_from is None:
        raise UsageError(f"{', '.join(f'--{k} {v}' for k, v in patient.items())} needs --findings or --labels_from")
    if (findings is not None or labels_from is not None) and not is_conditional(pipe):
        raise UsageError("findings were asked of an unconditional model; train one with --condition_on findings to "
                         "request them")
    if findings is not None and labels_from is not None:
        raise UsageError("give --findings or --labels_from, not both")
    if labels_from is not None and labels_from not in LABELS_FROM:
        raise UsageError(f"--labels_from {labels_from!r}: choose {', '.join(LABELS_FROM)}")
    given = pipe.labels.patient(**patient) if patient else []
    if labels_from is not None:
        return {i: pipe.labels.draw(random.Random(noise_seed(seed, i)), given) for i in indices}
    if findings is not None:
        # checked once, before any image is made; a finding by any name of the vocabulary
        wanted = pipe.labels.canonical(as_model_names(findings, pipe.labels.names) + given)
        return dict.fromkeys(indices, wanted)
    return dict.fromkeys(indices)


def resolve_guidance(pipe, guidance_scale: float | None) -> float:
    if not (is_conditional(pipe) or is_text(pipe)):
        if guidance_scale is not None:
            raise UsageError("--guidance_scale needs a conditional model; this one was trained without labels")
        return 1.0
    if guidance_scale is None:
        guidance_scale = (pipe.config.get("label_config") or pipe.config.get("prompt_config"))["guidance_scale"]
    if guidance_scale < 1:
        raise UsageError(f"guidance_scale must be >= 1 (1 = no guidance), got {guidance_scale}")
    return float(guidance_scale)


def resolve_interval(pipe, guidance_interval) -> tuple[int, int] | None:
    if guidance_interval is not None and not (is_conditional(pipe) or is_text(pipe)):
        raise UsageError("--guidance_interval needs a conditional model; this one was trained without labels")
    return check_guidance_interval(guidance_interval, pipe.scheduler.config.num_train_timesteps)


def with_scheduler(pipe, scheduler) -> LungGenPipeline:
    """A LungGenPipeline over `pipe`'s models (a DDPMPipeline's too: it draws the same images from the same
    generators and takes callbacks) with `scheduler` in place of the training one."""
    return LungGenPipeline(unet=pipe.unet, scheduler=scheduler, vae=getattr(pipe, "vae", None),
                           label_config=pipe.config.get("label_config"),
                           text_encoder=getattr(pipe, "text_encoder", None), tokenizer=getattr(pipe, "tokenizer", None),
                           prompt_config=pipe.config.get("prompt_config"))


def iter_batches(pipe, indices, seed=0, scheduler=DEFAULT_SCHEDULER, num_inference_steps=DEFAULT_STEPS, batch_size=16,
                 progress=True, labels=None, guidance_scale=1.0, guidance_rescale=0.0, guidance_interval=None,
                 recorder=None, attempts=None, prompts=None, negative_prompt=None):
    """Yield (indices, images) per batch; images are float32 numpy (B, H, W, C) in [0, 1]. Each batch is one call
    of the pipeline with a list of generators, one per image.

    `labels` maps each index of a conditional model to its labels (None or missing: the null condition), `prompts`
    each index of a text model to its prompt (missing: the empty prompt); `negative_prompt`, `guidance_rescale` and
    `guidance_interval` are the pipeline's. `recorder` (a `process.DenoisingRecorder`) sees
    every step of the first batch. `attempts` maps an index to its redraw (`noise_seed`'s attempt; default 0).
    """
    check_counts(num_inference_steps=num_inference_steps, batch_size=batch_size)
    check_scheduler(scheduler)
    indices = list(indices)
    with tqdm(total=len(indices), unit="img", disable=not progress) as bar:
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            # CPU generators whatever the device, so every setup starts from the same noise.
            generators = [torch.Generator("cpu").manual_seed(noise_seed(seed, i, (attempts or {}).get(i, 0)))
                          for i in batch]
            # A fresh scheduler per batch: a multistep solver keeps the last batch's outputs as state.
            runner = with_scheduler(pipe, make_scheduler(scheduler, pipe.scheduler.config))
            runner.set_progress_bar_config(disable=True)
            findings = [(labels or {}).get(i) for i in batch] if is_conditional(pipe) else None
            text = {"prompt": [(prompts or {}).get(i) or "" for i in batch],
                    "negative_prompt": negative_prompt} if is_text(pipe) else {}
            callback = recorder if recorder is not None and start == 0 else None
            images = runner(findings=findings, batch_size=len(batch), guidance_scale=guidance_scale, **text,
                            num_inference_steps=num_inference_steps, generator=generators, output_type="np",
                            callback_on_step_end=callback, guidance_interval=guidance_interval,
                            guidance_rescale=guidance_rescale, **SCHEDULERS[scheduler][2]).images
            bar.update(len(batch))
            yield batch, images


def generate(pipe, num_images, seed=0, scheduler=DEFAULT_SCHEDULER, num_inference_steps=DEFAULT_STEPS, batch_size=16,
             start_index=0, output_type="pil", progress=True, findings=None, labels_from=None, guidance_scale=None,
             patient=None, guidance_rescale=0.0, guidance_interval=None, prompts=None, negative_prompt=None):
    """Images start_index .. start_index + num_images - 1: PIL images, or one float32 array (N, H, W, C).

    Conditional models take `findings` (a list of names for every image) or `labels_from="train"`, and a
    `patient` as `request_labels` reads it; text models `prompts` (one text, or one per image) and a
    `negative_prompt`.
    """
    check_counts(num_images=num_images)
    if start_index < 0:
        raise UsageError(f"start_index must be >= 0, got {start_index}")
    if output_type not in ("pil", "np"):
        raise UsageError(f"unknown output_type {output_type!r}; choose 'pil' or 'np'")
    indices = range(start_index, start_index + num_images)
    labels = request_labels(pipe, indices, seed, findings, labels_from, patient)
    texts = request_prompts(pipe, indices, prompts)
    scale, interval = resolve_guidance(pipe, guidance_scale), resolve_interval(pipe, guidance_interval)
    arrays = [images for _, images in iter_batches(pipe, indices, seed, scheduler, num_inference_steps, batch_size,
                                                   progress, labels, scale, guidance_rescale, interval,
                                                   prompts=texts, negative_prompt=negative_prompt)]
    images = np.concatenate(arrays)
    return images if output_type == "np" else pipe.numpy_to_pil(images)
