"""Finding-conditioned chest X-ray generation with classifier-free guidance: `LungGenPipeline`.

This file is self-contained (torch and diffusers only) because it is also copied into every conditional model
folder, where `DiffusionPipeline.from_pretrained(folder_or_hub_id, trust_remote_code=True)` loads it for people who
do not have the lunggen_diffusers package. In the package it is imported as `from lunggen_diffusers import
LungGenPipeline`; both are the same code.

Labels: a multi-hot vector of the model's findings, then one one-hot block per extra group (view position, sex),
then one "unconditioned" entry. "No Finding" is a condition (every finding 0, the null entry 0); the null condition
used for guidance has only the null entry set, so the two never meet.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Sequence
from inspect import signature

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

NO_FINDING = "no finding"
# The file name in a model folder; not `pipeline`, which is the project's command-line script.
MODULE_NAME = "lunggen_pipeline"
DEFAULT_GUIDANCE_SCALE = 2.0


def normalize(name: str) -> str:
    """Case, spaces, '_' and '-' do not matter: "Pleural_Effusion" == "pleural effusion"."""
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


class LabelSpace:
    """The model's vocabulary and the layout of its label vector, from the `label_config` stored with the model."""

    def __init__(self, label_config: dict):
        self.findings = list(label_config["findings"])
        self.groups = {name: list(values) for name, values in label_config.get("groups", {}).items()}
        self.counts = dict(label_config.get("combination_counts", {}))
        self.names = self.findings + [f"{g}={v}" for g, values in self.groups.items() for v in values]
        self.null_index = len(self.names)
        self.size = len(self.names) + 1
        self._index = {normalize(n): i for i, n in enumerate(self.names)}

    def _unknown(self, name: str) -> ValueError:
        return ValueError(f"unknown label {name!r}; this model knows: {', '.join(self.names)} (and 'No Finding')")

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
            if key == NO_FINDING:
                continue
            if key not in self._index:
                raise self._unknown(name)
            wanted.add(self._index[key])
        for group, values in self.groups.items():
            chosen = [i for i in wanted if self.names[i].startswith(f"{group}=")]
            if len(chosen) > 1:
                raise ValueError(f"{', '.join(self.names[i] for i in chosen)}: one {group} per image")
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
        """One image's labels -> its float vector; None -> the null (unconditioned) vector."""
        vector = torch.zeros(self.size)
        if labels is None:
            vector[self.null_index] = 1.0
        else:
            for name in self.canonical(labels):
                vector[self.names.index(name)] = 1.0
        return vector

    def draw(self, rng: random.Random) -> list[str]:
        """A label combination drawn from the training split's joint distribution (its stored counts)."""
        if not self.counts:
            raise ValueError("this model stores no label counts to draw from")
        combinations = sorted(self.counts)
        chosen = rng.choices(combinations, weights=[self.counts[c] for c in combinations])[0]
        return chosen.split("|") if chosen else []


def guided_denoise(unet, scheduler, x, class_labels=None, null_labels=None, guidance_scale=1.0, step_kwargs=None,
                   progress=None):
    """The reverse process from noise `x`; with labels, classifier-free guidance in one batched forward per step.

    `guidance_scale` 1 means the conditional model alone (one forward); rows of `class_labels` that are the null
    condition need no guidance. Returns the final sample.
    """
    step_kwargs = step_kwargs or {}
    guided = class_labels is not None and guidance_scale != 1.0 and not bool((class_labels == null_labels).all())
    for t in progress(scheduler.timesteps) if progress else scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        if class_labels is None:
            output = unet(model_input, t).sample
        elif not guided:
            output = unet(model_input, t, encoder_hidden_states=None, class_labels=class_labels).sample
        else:
            both = unet(torch.cat([model_input, model_input]), t, encoder_hidden_states=None,
                        class_labels=torch.cat([class_labels, null_labels])).sample
            conditional, unconditional = both.chunk(2)
            output = unconditional + guidance_scale * (conditional - unconditional)
        x = scheduler.step(output, t, x, **step_kwargs).prev_sample
    return x


class LungGenPipeline(DiffusionPipeline):
    """A UNet2DConditionModel whose class embedding projects the label vector, a DDPM scheduler, and the labels.

    pipe(findings=[["Cardiomegaly"], []], guidance_scale=2.0).images  # [] asks for no finding
    pipe(batch_size=4).images                                          # unconditional (the null condition)
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DConditionModel, scheduler: DDPMScheduler, label_config: dict | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(label_config=label_config)
        self.labels = LabelSpace(label_config or {"findings": []})
        if unet.config.projection_class_embeddings_input_dim != self.labels.size:
            raise ValueError(f"the UNet takes {unet.config.projection_class_embeddings_input_dim}-entry label vectors "
                             f"but the label config describes {self.labels.size}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load the components directly: the generic loader would route a model folder that carries this file
        through remote code, which our own package does not need."""
        revision, dtype = kwargs.pop("revision", None), kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            from huggingface_hub import snapshot_download

            folder = snapshot_download(folder, revision=revision, allow_patterns=[
                "model_index.json", "scheduler/*", "unet/config.json", "unet/*.safetensors"])
        with open(os.path.join(folder, "model_index.json")) as f:
            label_config = json.load(f).get("label_config")
        if not label_config:
            raise ValueError(f"{pretrained_model_name_or_path}: model_index.json has no label_config; "
                             "it is not a conditional LungGen model")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True,
                                                    **({"torch_dtype": dtype} if dtype is not None else {}))
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        return cls(unet=unet, scheduler=scheduler, label_config=label_config)

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

    def encode(self, findings: Sequence[Sequence[str] | None] | None, batch_size: int) -> tuple:
        """(class_labels, null_labels) for a batch; `findings` None means every image unconditioned."""
        rows = [None] * batch_size if findings is None else list(findings)
        labels = torch.stack([self.labels.encode(row) for row in rows])
        null = self.labels.encode(None).expand(len(rows), -1)
        return labels.to(self.device, self.unet.dtype), null.to(self.device, self.unet.dtype)

    @torch.no_grad()
    def __call__(self, findings: Sequence[Sequence[str] | None] | None = None, batch_size: int = 1,
                 guidance_scale: float | None = None, generator=None, num_inference_steps: int = 1000,
                 output_type: str = "pil", return_dict: bool = True):
        if guidance_scale is None:
            guidance_scale = (self.config.label_config or {}).get("guidance_scale", DEFAULT_GUIDANCE_SCALE)
        if guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {guidance_scale}")
        if findings is not None:
            batch_size = len(findings)
        class_labels, null_labels = self.encode(findings, batch_size)
        size = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
        x = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        step_kwargs = {"generator": generator} if "generator" in signature(self.scheduler.step).parameters else {}
        x = guided_denoise(self.unet, self.scheduler, x * self.scheduler.init_noise_sigma, class_labels,
                           null_labels, guidance_scale, step_kwargs, self.progress_bar)
        image = (x.float() / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)


__all__ = ["LungGenPipeline", "LabelSpace", "guided_denoise", "normalize", "DEFAULT_GUIDANCE_SCALE"]
