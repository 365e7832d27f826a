"""Chest X-ray generation with classifier-free guidance over labels, in pixels or in an autoencoder's latents:
`LungGenPipeline`.

This file is self-contained (torch and diffusers only) because it is also copied into every conditional model
folder, where `DiffusionPipeline.from_pretrained(folder_or_hub_id, trust_remote_code=True)` loads it for people who
do not have the lunggen_diffusers package. In the package it is imported as `from lunggen_diffusers import
LungGenPipeline`; both are the same code. It follows diffusers' own pipelines (DDPMPipeline, DiTPipeline,
StableDiffusionPipeline): `_execution_device`, `callback_on_step_end`, `maybe_free_model_hooks`, `output_type`,
`return_dict`.

Two routes, one class: a pixel-space UNet, or a UNet on the latents of a `vae` (`AutoencoderKL`) whose output the
pipeline decodes; either conditional or not. An unconditional pixel model is exported as a `DDPMPipeline`, which
has no `callback_on_step_end`; `LungGenPipeline(unet=ddpm.unet, scheduler=ddpm.scheduler)` draws the same images
from the same generator and takes callbacks.

Labels: a multi-hot vector of the model's findings, then one one-hot block per extra group (view position, sex),
then one "unconditioned" entry (the condition vector; `LabelSpace` lays it out). "No Finding" is a condition (every
finding 0, the null entry 0); the null condition used for guidance has only the null entry set, so the two never
meet.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import shutil
from collections.abc import Callable, Sequence
from inspect import signature

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    ImagePipelineOutput,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download

try:  # inside the package, its commands' refusal, so they print these as one line (imported by name: a model
    # folder's copy must not make diffusers ask its users to install the package)
    UsageError = importlib.import_module("lunggen_diffusers.cli").UsageError
except ImportError:  # this file on its own, as a model folder's remote code

    class UsageError(ValueError):
        """A refusal of the caller's input."""


logger = logging.get_logger(__name__)

NO_FINDING = "No Finding"  # the one spelling; matched whatever its case (see normalize)
# The file name in a model folder; not `pipeline`, which is the project's command-line script.
MODULE_NAME = "lunggen_pipeline"
DEFAULT_GUIDANCE_SCALE = 2.0
OUTPUT_TYPES = ("pil", "np", "pt")  # and "latent" for a latent model: the UNet's output, not decoded
# What `from_pretrained` hands on (to huggingface_hub's download and to diffusers' model loading); anything else is
# refused rather than silently ignored, so a misspelt `token=` never turns into an anonymous download.
LOAD_KEYWORDS = ("token", "revision", "cache_dir", "local_files_only", "force_download", "proxies", "torch_dtype",
                 "dtype", "variant", "use_safetensors", "low_cpu_mem_usage", "trust_remote_code", "unet", "scheduler",
                 "vae", "text_encoder", "tokenizer")


def normalize(name: str) -> str:
    """Case, spaces, '_' and '-' do not matter: "Pleural_Effusion" == "pleural effusion"."""
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


class LabelSpace:
    """The model's vocabulary and the layout of its condition vector, from the `label_config` stored with it."""

    def __init__(self, label_config: dict):
        self.findings = list(label_config["findings"])
        # Groups in name order, whatever order the dict holds them in: a saved config comes back with sorted keys
        # (diffusers writes config.json with sort_keys), so any other order would lay out the vector one way in
        # training and another after loading.
        self.groups = {name: list(values) for name, values in sorted(label_config.get("groups", {}).items())}
        self.counts = dict(label_config.get("combination_counts", {}))
        self.names = self.findings + [f"{g}={v}" for g, values in self.groups.items() for v in values]
        self.null_index = len(self.names)
        self.size = len(self.names) + 1
        self._index = {normalize(n): i for i, n in enumerate(self.names)}

    def _unknown(self, name: str) -> UsageError:
        return UsageError(f"unknown label {name!r}; this model knows: {', '.join(self.names)} (and '{NO_FINDING}')")

    def canonical(self, labels: Sequence[str]) -> list[str]:
        """Requested names (any case; "No Finding" alone asks for none) -> the model's names, in vector order.

        An extra group left out (a view position, say) takes its most frequent value in the training data, so every
        request is a condition the model has seen.
        """
        if isinstance(labels, str):
            raise TypeError(f"labels must be a list of names per image, got the string {labels!r}")
        wanted = set()
        for name in labels:
            key = normalize(name)
            if key == normalize(NO_FINDING):
                continue
            if key not in self._index:
                raise self._unknown(name)
            wanted.add(self._index[key])
        for group in self.groups:
            chosen = [i for i in wanted if self.names[i].startswith(f"{group}=")]
            if len(chosen) > 1:
                raise UsageError(f"{', '.join(self.names[i] for i in chosen)}: one {group} per image")
            if not chosen:
                wanted.add(self.names.index(f"{group}={self.most_frequent(group)}"))
        return [self.names[i] for i in sorted(wanted)]

    def most_frequent(self, group: str) -> str:
        totals = {v: 0 for v in self.groups[group]}
        for combination, count in self.counts.items():
            for name in combination.split("|"):
                if name.startswith(f"{group}="):
                    totals[name.split("=", 1)[1]] += count
        return max(totals, key=lambda v: (totals[v], v == self.groups[group][0]))

    def encode(self, labels: Sequence[str] | None) -> torch.Tensor:
        """One image's labels -> its condition vector; None -> the null (unconditioned) vector."""
        vector = torch.zeros(self.size)
        if labels is None:
            vector[self.null_index] = 1.0
        else:
            for name in self.canonical(labels):
                vector[self.names.index(name)] = 1.0
        return vector

    def encode_batch(self, findings: Sequence[Sequence[str] | None] | None, batch_size: int) -> tuple:
        """(condition vectors, null vectors) of a batch on the CPU; `findings` None: every image unconditioned."""
        rows = [None] * batch_size if findings is None else list(findings)
        return torch.stack([self.encode(row) for row in rows]), self.encode(None).expand(len(rows), -1)

    def draw(self, rng: random.Random, given: Sequence[str] = ()) -> list[str]:
        """A label combination drawn from the training split's joint distribution (its stored counts); `given`
        (say ["patient_sex=F"]) draws from the combinations holding those labels, so findings follow the subgroup."""
        if not self.counts:
            raise UsageError("this model stores no label counts to draw from")
        combinations = [c for c in sorted(self.counts) if set(given) <= set(c.split("|"))]
        if not combinations:
            raise UsageError(f"no training image carries {', '.join(given)}: nothing to draw from")
        chosen = rng.choices(combinations, weights=[self.counts[c] for c in combinations])[0]
        return self.canonical(chosen.split("|") if chosen else [])  # in vector order, as a request by name

    def patient(self, sex: str | None = None, age: float | None = None, view: str | None = None) -> list[str]:
        """The group labels for a patient: `sex` ("M"/"F"), `age` in years (its bin, as trained), `view`
        ("PA"/"AP"); each given one must be a group the model was trained on."""
        labels = []
        for group, value in (("patient_sex", sex), ("patient_age", age), ("view_position", view)):
            if value is None:
                continue
            if group not in self.groups:
                raise UsageError(f"{group} {value!r}: this model was not trained with --condition_on {group} "
                                 f"(it knows: {', '.join(self.names)})")
            if group == "patient_age":
                found = next((b for b in self.groups[group] if _in_age_bin(float(value), b)), None)
                if found is None:
                    raise UsageError(f"age {value} falls in no age bin this model was trained on (it knows: "
                                     f"{', '.join(self.groups[group])})")
                value = found
            if str(value) not in self.groups[group]:
                raise UsageError(f"{group} {value!r}: this model knows {', '.join(self.groups[group])}")
            labels.append(f"{group}={value}")
        return labels


def _in_age_bin(age: float, name: str) -> bool:
    """Whether `age` falls in an age bin named "lo-hi" (whole years, inclusive) or "lo+"."""
    low, _, high = name.rstrip("+").partition("-")
    try:
        return float(low) <= age and (not high or age < float(high) + 1)
    except ValueError:
        return False


def postprocess(sample: torch.Tensor, output_type: str = "np"):
    """The model's output in [-1, 1] (N, C, H, W) -> images in [0, 1]: "pt" a float32 tensor (N, C, H, W), "np" a
    float32 array (N, H, W, C), "pil" a list of PIL images (mode L for one channel). The one post-processing step of
    the pipeline class and of the project's sampling CLI; 8- or 16-bit files are cut from "np"."""
    if output_type not in OUTPUT_TYPES:
        raise UsageError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)} ('latent' does not "
                         "apply to a pixel-space model)")
    # float() first: numpy has no bfloat16 (the stock pipeline's output path crashes there).
    image = (sample.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    image = image.cpu().permute(0, 2, 3, 1).numpy()
    return DiffusionPipeline.numpy_to_pil(image) if output_type == "pil" else image


def latent_moments(vae_config, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The centre and spread that standardise latents, broadcastable over `like` (N, C, h, w): per channel from
    the config's `latents_mean` / `latents_std` when set, else the global `shift_factor` and 1."""
    def tensor(values):
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)

    if vae_config.get("latents_mean") is not None:
        return tensor(vae_config["latents_mean"]), tensor(vae_config["latents_std"])
    return tensor([vae_config.get("shift_factor") or 0.0]), tensor([1.0])


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Standardised latents (as the UNet learns them) -> images in [-1, 1] (N, 1, H, W): undo the standardisation
    stored in the autoencoder's config, decode, and average a 3-channel autoencoder's output to gray."""
    latents = latents.to(vae.dtype)
    center, spread = latent_moments(vae.config, latents)
    z = latents / vae.config.scaling_factor * spread + center
    image = vae.decode(z).sample
    return image.mean(1, keepdim=True) if image.shape[1] != 1 else image


def downsampling(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape(vae: AutoencoderKL, resolution: int) -> tuple[int, int]:
    """(channels, side) of the latent of a resolution x resolution image."""
    factor = downsampling(vae)
    if resolution % factor:
        raise UsageError(f"--resolution {resolution} is not a multiple of the autoencoder's downsampling {factor}")
    return vae.config.latent_channels, resolution // factor


@torch.no_grad()
def encode_moments(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (B, 1, H, W) -> the posterior's mean and log-variance (B, 2C, h, w), unscaled."""
    if vae.config.in_channels != images.shape[1]:
        images = images.expand(-1, vae.config.in_channels, -1, -1)
    moments = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.parameters
    return moments.float()


def sample_latents(moments: torch.Tensor, vae_config, noise: torch.Tensor | None = None) -> torch.Tensor:
    """A draw from the cached posterior, standardised as the UNet learns it (`latent_statistics`; the inverse is
    `lunggen_pipeline.decode_latents`). `noise` None takes the mean (the posterior's mode)."""
    mean, logvar = moments.float().chunk(2, dim=1)
    z = mean if noise is None else mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
    center, spread = latent_moments(vae_config, z)
    return (z - center) / spread * vae_config.scaling_factor


# The config entries `latent_statistics` measures: they apply when a latent is drawn or decoded, not to the weights.
STANDARDISATION = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")


def describe_standardisation(vae_config) -> str:
    """The standardisation in the config, for logs, reports and model cards."""
    if vae_config.get("latents_mean") is not None:
        spreads = ", ".join(f"{v:.3f}" for v in vae_config["latents_std"])
        return f"per channel to zero mean and unit variance (channel std {spreads})"
    return (f"by {vae_config['scaling_factor']:.4f} after a shift of {vae_config.get('shift_factor') or 0.0:.4f} "
            f"(one scale for every channel)")


def check_guidance_interval(interval, num_train_timesteps: int) -> tuple[int, int] | None:
    """(lowest, highest) training timestep to guide at, checked; None (guide at every step) passes through."""
    if interval is None:
        return None
    if len(interval) != 2 or not 0 <= interval[0] <= interval[1] < num_train_timesteps:
        raise UsageError(f"guidance_interval {list(interval)}: give the lowest and highest training timestep to guide "
                         f"at, 0 <= lowest <= highest <= {num_train_timesteps - 1} (e.g. 82 579)")
    return int(interval[0]), int(interval[1])


def guided_denoise(unet, scheduler, x, class_labels=None, null_labels=None, guidance_scale=1.0, step_kwargs=None,
                   progress=None, on_step: Callable | None = None, guidance_rescale: float = 0.0,
                   guidance_interval: tuple[int, int] | None = None, prompt_embeds=None, null_embeds=None):
    """The reverse process from noise `x`; with labels or a prompt, classifier-free guidance in one batched forward
    per step.

    `class_labels` / `null_labels` are condition vectors; `prompt_embeds` / `null_embeds` a text encoder's hidden
    states of the prompts and of the negative (or empty) prompts, for the UNet's cross-attention. `guidance_scale` 1
    means the conditional model alone (one forward), as does a batch whose condition is its null one.
    `guidance_rescale` (0-1) pulls the guided prediction's spread back toward the conditional one's (Lin et al.
    2024, as diffusers' Stable Diffusion pipelines do); `guidance_interval` (lowest, highest training timestep)
    guides only there and runs the conditional model alone elsewhere (Kynkäänniemi et al. 2024). `on_step(i, t, x,
    x0)`, when given, runs after each step with the new sample and the step's prediction of the clean sample
    (`predicted_original`), and returns the sample to go on with (the pipeline's `callback_on_step_end`). Returns
    the final sample.
    """
    step_kwargs = step_kwargs or {}
    conditional = class_labels is not None or prompt_embeds is not None

    def null_as_well(condition, null):
        return condition is None or bool((condition == null).all())

    guided = conditional and guidance_scale != 1.0 and not (null_as_well(class_labels, null_labels)
                                                           and null_as_well(prompt_embeds, null_embeds))
    condition = {"encoder_hidden_states": prompt_embeds, "class_labels": class_labels}
    both_conditions = {name: None if value is None else torch.cat([value, null]) for (name, value), null in
                       zip(condition.items(), (null_embeds, null_labels), strict=True)}
    lowest, highest = guidance_interval or (0, scheduler.config.num_train_timesteps)
    timesteps = scheduler.timesteps
    for i, t in enumerate(progress(timesteps) if progress else timesteps):
        model_input = scheduler.scale_model_input(x, t)
        if not conditional:
            output = unet(model_input, t).sample
        elif not (guided and lowest <= int(t) <= highest):
            output = unet(model_input, t, **condition).sample
        else:
            both = unet(torch.cat([model_input, model_input]), t, **both_conditions).sample
            conditional_output, unconditional = both.chunk(2)
            output = unconditional + guidance_scale * (conditional_output - unconditional)
            if guidance_rescale > 0:
                # Imported here: the Stable Diffusion module imports transformers' image processors, which warn on
                # stderr at import when torchvision is absent (every CLI's one-line errors would get a second line).
                from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
                    rescale_noise_cfg,
                )

                output = rescale_noise_cfg(output, conditional_output, guidance_rescale)
        step = scheduler.step(output, t, x, **step_kwargs)
        if on_step is not None:
            x0 = getattr(step, "pred_original_sample", None)
            x = on_step(i, t, step.prev_sample, predicted_original(scheduler, output, x, t) if x0 is None else x0)
        else:
            x = step.prev_sample
    return x


def predicted_original(scheduler, output: torch.Tensor, sample: torch.Tensor, t) -> torch.Tensor:
    """The clean sample x0 that a (guided) model output at timestep `t` predicts from `sample`, for schedulers whose
    step does not return it (the DPM-Solvers, UniPC): the model's parameterisation inverted on the noise schedule."""
    alpha = scheduler.alphas_cumprod.to(sample.device)[int(t)].to(sample.dtype)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (sample - (1 - alpha).sqrt() * output) / alpha.sqrt()
    if kind == "v_prediction":
        return alpha.sqrt() * sample - (1 - alpha).sqrt() * output
    return output


def tokenize(tokenizer, prompts: Sequence[str], warn: Callable[[str], None] | None = None):
    """Token ids (and attention mask) of `prompts`, padded to the tokenizer's length as Stable Diffusion pads them;
    a prompt longer than that is cut, with one `warn` line for the batch."""
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    if warn is not None:
        full = tokenizer(list(prompts), padding="longest", return_tensors="pt").input_ids
        cut = sum(int(row.ne(tokenizer.pad_token_id).sum()) > tokenizer.model_max_length for row in full)
        if cut:
            warn(f"{cut} of {len(prompts)} prompt(s) were longer than the text encoder takes "
                 f"({tokenizer.model_max_length} tokens) and were cut there")
    return tokens


def encode_tokens(text_encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The text encoder's last hidden states: what the UNet's cross-attention reads. The mask is passed only to an
    encoder whose config asks for it (`use_attention_mask`), exactly as Stable Diffusion's pipeline does."""
    use_mask = getattr(text_encoder.config, "use_attention_mask", False) and attention_mask is not None
    return text_encoder(input_ids.to(text_encoder.device),
                        attention_mask=attention_mask.to(text_encoder.device) if use_mask else None)[0]


class LungGenPipeline(DiffusionPipeline):
    """A UNet (a UNet2DConditionModel whose class embedding projects the condition vector, or a plain UNet2DModel),
    a DDPM scheduler, the labels, and for the latent route the autoencoder that decodes the UNet's output.

    pipe(findings=[["Cardiomegaly"], []], guidance_scale=2.0).images  # [] asks for no finding
    pipe(batch_size=4).images                                          # unconditional (the null condition)
    LungGenPipeline(unet=ddpm.unet, scheduler=ddpm.scheduler)          # a DDPMPipeline's model, with callbacks
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents", "pred_original_sample"]  # the second: the step's x0 (read-only)

    def __init__(self, unet: UNet2DConditionModel | UNet2DModel, scheduler: DDPMScheduler,
                 vae: AutoencoderKL | None = None, label_config: dict | None = None, text_encoder=None,
                 tokenizer=None, prompt_config: dict | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(prompt_config=prompt_config if text_encoder is not None else None)
        if (text_encoder is None) != (tokenizer is None):
            raise UsageError("a text model needs both its text_encoder and its tokenizer")
        if text_encoder is not None and unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise UsageError(f"the UNet's cross-attention reads {unet.config.cross_attention_dim}-wide states but the "
                             f"text encoder gives {text_encoder.config.hidden_size}")
        self.register_to_config(label_config=label_config)
        self.labels = LabelSpace(label_config) if label_config else None
        takes = getattr(unet.config, "projection_class_embeddings_input_dim", None)
        if takes != (self.labels.size if self.labels else None):
            raise UsageError(f"the UNet takes {takes or 'no'} label vectors but the label config describes "
                             f"{self.labels.size if self.labels else 'none'}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a folder or Hub id with this class. Every keyword of LOAD_KEYWORDS reaches huggingface_hub (token,
        revision, cache_dir, local_files_only, force_download, proxies) or diffusers' model loading (torch_dtype,
        variant, use_safetensors, low_cpu_mem_usage); `unet` / `scheduler` replace a component; others are refused.
        The components are loaded directly: diffusers' generic loader would route a folder that carries this file
        through remote code (trust_remote_code), which the package does not need."""
        unknown = sorted(set(kwargs) - set(LOAD_KEYWORDS))
        if unknown:
            raise TypeError(f"LungGenPipeline.from_pretrained() got unknown keyword(s) {', '.join(unknown)}; "
                            f"accepted: {', '.join(LOAD_KEYWORDS)}")
        kwargs.pop("trust_remote_code", None)  # nothing remote is run: this class is the code
        hub = {k: kwargs.pop(k) for k in ("token", "revision", "cache_dir", "local_files_only", "force_download",
                                          "proxies") if k in kwargs}
        dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None)
        given = {name: kwargs.pop(name) for name in ("unet", "scheduler", "vae", "text_encoder", "tokenizer")
                 if name in kwargs}
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            folder = snapshot_download(folder, allow_patterns=["model_index.json", "scheduler/*", "unet/*", "vae/*",
                                                               "text_encoder/*", "tokenizer/*"], **hub)
        with open(os.path.join(folder, "model_index.json")) as f:
            index = json.load(f)
        if index.get("_class_name") != [MODULE_NAME, cls.__name__]:
            raise UsageError(f"{pretrained_model_name_or_path}: model_index.json names {index.get('_class_name')}; "
                             "it is not a LungGen model")
        weights = {"torch_dtype": dtype} if dtype is not None else {}
        if "unet" not in given:
            unet_class = UNet2DModel if index["unet"][1] == "UNet2DModel" else UNet2DConditionModel
            given["unet"] = unet_class.from_pretrained(folder, subfolder="unet", **weights, **kwargs)
        if "scheduler" not in given:
            given["scheduler"] = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        if "vae" not in given and (index.get("vae") or [None])[0] is not None:
            given["vae"] = AutoencoderKL.from_pretrained(folder, subfolder="vae", **weights, **kwargs)
        if "text_encoder" not in given and (index.get("text_encoder") or [None])[0] is not None:
            import transformers  # only a text model needs it

            given["text_encoder"] = getattr(transformers, index["text_encoder"][1]).from_pretrained(
                folder, subfolder="text_encoder", **weights)
            given["tokenizer"] = getattr(transformers, index["tokenizer"][1]).from_pretrained(folder,
                                                                                             subfolder="tokenizer")
        return cls(**given, label_config=index.get("label_config"), prompt_config=index.get("prompt_config"))

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' save, plus this file beside the weights and `_class_name` naming it, so that
        `DiffusionPipeline.from_pretrained(folder_or_hub_id, trust_remote_code=True)` finds the code."""
        super().save_pretrained(save_directory, **kwargs)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        index["_class_name"] = [MODULE_NAME, type(self).__name__]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
        shutil.copyfile(__file__, os.path.join(save_directory, f"{MODULE_NAME}.py"))

    def encode(self, findings: Sequence[Sequence[str] | None] | None, batch_size: int, device=None) -> tuple:
        """(condition vectors, null vectors) for a batch, on `device` (default: where the pipeline runs); (None,
        None) for a model without labels."""
        if self.labels is None:
            return None, None
        labels, null = self.labels.encode_batch(findings, batch_size)
        device = device or self._execution_device
        return labels.to(device, self.unet.dtype), null.to(device, self.unet.dtype)

    def encode_text(self, prompts: Sequence[str], device=None) -> torch.Tensor:
        """The text encoder's hidden states of `prompts` (cut to its length with one warning)."""
        tokens = tokenize(self.tokenizer, prompts, warn=logger.warning)
        embeds = encode_tokens(self.text_encoder, tokens.input_ids, tokens.attention_mask)
        return embeds.to(device or self._execution_device, self.unet.dtype)

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def num_timesteps(self):
        return self._num_timesteps

    def check_inputs(self, findings, batch_size, guidance_scale, num_inference_steps, output_type,
                     callback_on_step_end_tensor_inputs, text=None):
        """`findings` is what sets the batch: the finding lists, or the prompts (`text`) where no findings are given."""
        if findings is not None and findings is not text and self.labels is None:
            raise UsageError("findings were asked of a model trained without labels (no --condition_on)")
        if text is not None and not all(isinstance(p, str) for p in text):
            raise TypeError("prompt must be a string or a list of strings, one per image")
        if findings is not None and findings is not text and (isinstance(findings, str)
                                                             or any(isinstance(f, str) for f in findings)):
            raise TypeError("findings must be a list of name lists, one per image (e.g. [['Cardiomegaly'], []])")
        if findings is not None and batch_size is not None and batch_size != len(findings):
            raise UsageError(f"batch_size {batch_size} contradicts the {len(findings)} images "
                             f"`{'prompt' if findings is text else 'findings'}` asks for; give one of them, or both "
                             "equal")
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"batch_size must be a positive integer, got {batch_size}")
        if guidance_scale < 1:
            raise UsageError(f"guidance_scale must be >= 1 (1 = no guidance), got {guidance_scale}")
        if num_inference_steps < 1:
            raise UsageError(f"num_inference_steps must be a positive integer, got {num_inference_steps}")
        if output_type not in OUTPUT_TYPES and not (output_type == "latent" and self.vae is not None):
            raise UsageError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}"
                             + (", latent" if self.vae is not None else " ('latent' needs a latent model)"))
        bad = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            raise UsageError(f"callback_on_step_end_tensor_inputs {bad} are not among {self._callback_tensor_inputs}")

    @torch.no_grad()
    def __call__(self, findings: Sequence[Sequence[str] | None] | None = None, batch_size: int | None = None,
                 guidance_scale: float | None = None, num_inference_steps: int = 1000,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback_on_step_end: Callable | PipelineCallback | None = None,
                 callback_on_step_end_tensor_inputs: list[str] = ("latents",), sex: str | None = None,
                 age: float | None = None, view: str | None = None,
                 guidance_interval: tuple[int, int] | None = None, guidance_rescale: float = 0.0,
                 eta: float = 0.0, prompt: str | Sequence[str] | None = None,
                 negative_prompt: str | Sequence[str] | None = None):
        """Generate images; `findings` holds one list of finding names per image ([] = "No Finding"), None samples
        the null (unconditioned) condition for `batch_size` images. `guidance_scale` None takes the model's own;
        `guidance_interval` (lowest, highest training timestep) guides only there, the conditional model alone
        elsewhere (e.g. 82 579: benchmarks/README.md); `guidance_rescale` (0-1) pulls the guided prediction's spread
        back toward the conditional one's. `generator` as diffusers' pipelines take it: one for the batch, or a list
        of one per image (image i then depends on its own generator alone). `eta` reaches schedulers whose step
        takes it (DDIM: 0 deterministic, 1 as much fresh noise as DDPM).
        `sex` ("M"/"F"), `age` (years) and `view` ("PA"/"AP") ask every image for that patient, on a model trained
        with `--condition_on` them (a group not given takes its most frequent training value); they need `findings`.
        `prompt` (a text model, `--condition_on report`): one text for every image or one per image; the empty
        prompt is the model's unconditioned sample. `negative_prompt` replaces the empty prompt that guidance steers
        away from.

        Returns an `ImagePipelineOutput` (or a one-tuple when `return_dict` is False) of images in [0, 1] as
        `output_type` says: "pil", "np" (N, H, W, C) or "pt" (N, C, H, W); "latent" (latent models) returns the
        UNet's output undecoded.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        text = self.text_encoder is not None
        if (prompt is not None or negative_prompt is not None) and not text:
            raise UsageError("a prompt was given to a model trained without text (no --condition_on report)")
        if self.labels is None and not text:
            if guidance_scale not in (None, 1.0):
                raise UsageError(f"guidance_scale {guidance_scale}: a model trained without labels has nothing to "
                                 "guide by")
            guidance_scale = 1.0
            if guidance_interval is not None:
                raise UsageError(f"guidance_interval {list(guidance_interval)}: a model trained without labels has "
                                 "nothing to guide by")
        elif guidance_scale is None:
            stored = (self.config.label_config or self.config.prompt_config or {})
            guidance_scale = stored.get("guidance_scale", DEFAULT_GUIDANCE_SCALE)
        if isinstance(prompt, str):
            prompt = [prompt] * (len(findings) if findings is not None else batch_size or 1)
        prompts = None if prompt is None else list(prompt)
        if prompts is not None and findings is not None and len(prompts) != len(findings):
            raise UsageError(f"{len(prompts)} prompts and {len(findings)} finding lists: give one of each per image")
        self.check_inputs(findings if findings is not None else prompts, batch_size, guidance_scale,
                          num_inference_steps, output_type, callback_on_step_end_tensor_inputs, text=prompts)
        guidance_interval = check_guidance_interval(guidance_interval, self.scheduler.config.num_train_timesteps)
        if (sex, age, view) != (None, None, None):
            if findings is None:
                raise UsageError("sex, age and view need findings (one list per image, [] for none): the "
                                 "unconditioned sample has no patient")
            patient = self.labels.patient(sex, age, view)
            findings = [list(f) + patient for f in findings]
        batch_size = len(findings) if findings is not None else len(prompts) if prompts is not None else batch_size or 1
        self._guidance_scale = guidance_scale
        device = self._execution_device
        class_labels, null_labels = self.encode(findings, batch_size, device)
        prompt_embeds = null_embeds = None
        if text:
            negatives = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else negative_prompt
            if negatives is not None and len(negatives) != batch_size:
                raise UsageError(f"{len(negatives)} negative prompts for {batch_size} images: give one, or one each")
            prompt_embeds = self.encode_text(prompts or [""] * batch_size, device)
            null_embeds = self.encode_text(negatives or [""] * batch_size, device)
        size = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
        # fp32 noise whatever the dtype, so fp16, bf16 and fp32 runs start from the same noise.
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32).to(self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        takes = signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if "generator" in takes else {}
        if "eta" in takes:
            step_kwargs["eta"] = eta

        def on_step(i, t, latents, pred_original_sample):
            if callback_on_step_end is None:
                return latents
            names = {"latents": latents, "pred_original_sample": pred_original_sample}
            outputs = callback_on_step_end(self, i, t, {k: names[k] for k in callback_on_step_end_tensor_inputs})
            return outputs.pop("latents", latents)

        latents = guided_denoise(self.unet, self.scheduler, latents * self.scheduler.init_noise_sigma, class_labels,
                                 null_labels, guidance_scale, step_kwargs, self.progress_bar, on_step,
                                 guidance_rescale=guidance_rescale, guidance_interval=guidance_interval,
                                 prompt_embeds=prompt_embeds, null_embeds=null_embeds)
        if output_type == "latent":
            image = latents
        else:
            image = postprocess(decode_latents(self.vae, latents) if self.vae is not None else latents, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)


__all__ = ["LungGenPipeline", "LabelSpace", "UsageError", "check_guidance_interval", "guided_denoise", "postprocess",
           "decode_latents",
           "normalize", "DEFAULT_GUIDANCE_SCALE", "NO_FINDING"]
