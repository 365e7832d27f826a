"""Counterfactual editing: add or remove a finding in a given radiograph and keep the patient.

Every method runs steps on the model's own noise schedule, in its space (pixels, or the autoencoder's standardised
latents), conditional on the source's labels going in and the target's coming out, with classifier-free guidance
toward the target:

- `ddpm-inversion` (the default): edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024). The image is
  noised independently to each timestep up to `strength`; the noise that takes the model's own step under the source
  labels from each of these points to the one below is kept, and the steps down are taken again with it under the
  target labels. Guidance is measured from the source labels, not from none: the edit is the model's difference
  between the two, and a target equal to the source gives the image back exactly.
- `ddim-inversion`: the image is run up the DDIM trajectory to `strength` under its own labels, then down again
  under the target's: what the noise keeps is the patient (Mokady et al. 2023; Hertz et al. 2022).
- `sdedit`: noise to `strength` from the generator, then down under the target's labels (Meng et al. 2022).
- `repaint`: inside the mask, from noise at `strength`, with `resample` jumps back up at each step; outside, the
  source noised to each step (Lugmayr et al. 2022).

A mask (`mask_image`, white = may change) makes every method a RadEdit edit (Pérez-García et al. 2024): outside it
(or inside an explicit `keep_mask_image`) the source's own trajectory is re-imposed at every step, and the output
there is the source, pixel for pixel. `auto_mask` is DiffEdit's (Couairon et al. 2023): where the model's noise
predictions under the source and the target labels disagree; adding a focal finding, only the region where they
disagree most, so the finding goes to one site.

An edit the model itself still reads as its source (`reads_target`: its noise is predicted better under the source's
labels than the target's, inside the mask; a diffusion classifier, Li et al. 2023) is taken again with the same noise
at a higher guidance (`guidance_rise`): on the demo, an added consolidation the edit missed was one where nothing was
drawn, and another seed mostly missed it again (benchmarks/HISTORY.md, "Counterfactual editing").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from diffusers import DDIMInverseScheduler
from diffusers.image_processor import VaeImageProcessor

from ..cli import UsageError
from ..lunggen_pipeline import (
    decode_latents,
    encode_moments,
    postprocess,
    predicted_original,
    sample_latents,
)
from ..vocabulary import FOCAL_FINDINGS, canonical_finding
from .sampling import StochasticDDIMScheduler

Method = Literal["ddpm-inversion", "ddim-inversion", "sdedit", "repaint"]
METHODS = get_args(Method)
DEFAULT_METHOD = "ddpm-inversion"
EDIT_STEPS = 50  # of the whole noise schedule; an edit takes the last `strength` of them
DEFAULT_STRENGTH = {"ddpm-inversion": 0.8, "ddim-inversion": 0.8, "sdedit": 0.6, "repaint": 1.0}
# An edit the model still reads as its source is taken again at guidance raised by GUIDANCE_STEP at a time, up to
# DEFAULT_GUIDANCE_RISE above the guidance asked for (`edit(..., guidance_rise=)`).
GUIDANCE_STEP = 0.5
DEFAULT_GUIDANCE_RISE = 1.0
# The noise level of that read, as a share of the schedule: on the demo, where it told the added consolidations the
# phantom classifier reads from the ones it does not best (benchmarks/HISTORY.md).
CHECK_STRENGTH = 0.4
# diffusers' own image and mask handling, kept grey and in [0, 1]; masks binarised at 0.5.
IMAGES = VaeImageProcessor(do_resize=False, do_normalize=False, do_convert_grayscale=True)
MASKS = VaeImageProcessor(do_resize=False, do_normalize=False, do_binarize=True, do_convert_grayscale=True)


def conditions(pipe, requests: Sequence, device) -> tuple[dict | None, dict | None]:
    """(the UNet's condition keywords for `requests`, those of the null condition): a label model's requests are
    lists of finding names, a text model's prompts (the null condition the empty prompt); None for an unconditional
    model."""
    if requests and all(isinstance(r, str) for r in requests):
        if getattr(pipe, "text_encoder", None) is None:
            raise UsageError("a prompt was given to a model trained without text (no --condition_on report)")
        return ({"encoder_hidden_states": pipe.encode_text(list(requests), device)},
                {"encoder_hidden_states": pipe.encode_text([""] * len(requests), device)})
    labels, null = pipe.encode(requests, len(requests), device)
    if labels is None:
        return None, None
    return {"encoder_hidden_states": None, "class_labels": labels}, {"encoder_hidden_states": None,
                                                                     "class_labels": null}


def _differ(pipe, source: Sequence, target: Sequence) -> list[int]:
    """The images whose source and target conditions differ (a text edit's: whose prompts do)."""
    if source and all(isinstance(r, str) for r in source):
        return [k for k, (a, b) in enumerate(zip(source, target, strict=True)) if a != b]
    before, after = pipe.encode(source, len(source), "cpu")[0], pipe.encode(target, len(target), "cpu")[0]
    return [] if before is None else torch.nonzero((before != after).any(1)).flatten().tolist()


class Editor:
    """One batch's edit: the model, its conditions (source and target: labels, or a text model's prompts), and the
    model's own noise schedule as a DDIM scheduler (its stored `timestep_spacing` included), cut to the last
    `strength` of its steps as diffusers' image-to-image pipelines cut theirs."""

    def __init__(self, pipe, source, target, guidance_scale, num_inference_steps, strength):
        self.unet = pipe.unet
        device = self.unet.device
        self.source, _ = conditions(pipe, source, device)
        self.target, self.null = conditions(pipe, target, device)
        self.scale = guidance_scale
        # Stochastic DDIM: finite at a zero-SNR first step, where eta > 0 (and DDPM inversion's noise) would give NaN.
        self.scheduler = StochasticDDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        steps = max(1, round(num_inference_steps * strength))
        self.timesteps = self.scheduler.timesteps[num_inference_steps - steps:]  # strength 1 starts at pure noise

    def predict(self, x: torch.Tensor, t, labels, guided: bool, start=None) -> torch.Tensor:
        """The model's output at timestep t; guided: `start + scale * (labels - start)`, where `start` is the null
        label unless given (the source's labels for DDPM inversion)."""
        if labels is None:  # an unconditional model
            return self.unet(x, t).sample
        if not guided or self.scale == 1:
            return self.unet(x, t, **labels).sample
        start = self.null if start is None else start
        both = self.unet(torch.cat([x, x]), t, **{name: None if value is None else torch.cat([value, start[name]])
                                                  for name, value in labels.items()}).sample
        conditional, unconditional = both.chunk(2)
        return unconditional + self.scale * (conditional - unconditional)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t.reshape(1))

    def step(self, output: torch.Tensor, t, x: torch.Tensor, eta: float, generator,
             correction: torch.Tensor | None = None) -> torch.Tensor:
        """The scheduler's step from t to the next timestep down; `eta` > 0 puts fresh noise back (1: as much as
        DDPM), so the sampler commits to one way of drawing a finding instead of the average of all of them.
        `correction` is DDPM inversion's for this step: it takes the place of the step's fresh noise at eta 1."""
        if correction is not None:
            step = self.scheduler.step(output, t, x, eta=1.0, variance_noise=torch.zeros_like(x))
            return step.prev_sample + correction
        return self.scheduler.step(output, t, x, eta=eta, generator=generator).prev_sample

    def both_ways(self, x0: torch.Tensor, num_draws: int, generator):
        """For each of `num_draws` noises drawn from `generator`: (the model's clean image on `x0` noised to the first
        timestep under the target labels, under the source labels). Their differences are the noise predictions'
        times one constant of that timestep."""
        t = self.timesteps[0]
        for _ in range(num_draws):
            x = self.noised(x0, torch.randn(x0.shape, generator=generator, device="cpu").to(x0), t)
            yield tuple(predicted_original(self.scheduler, self.predict(x, t, labels, guided=False), x, t)
                        for labels in (self.target, self.source))

    def noise_maps(self, x0: torch.Tensor, generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Edit-friendly DDPM inversion: the image noised independently to each timestep (in the order of
        `timesteps`), and for each step what the model's own step under the source labels (at eta 1, without fresh
        noise) lacks of the point below (at the last, of the image), so that stepping down with them under the
        source labels gives the image back."""
        lowest_first = [self.noised(x0, torch.randn(x0.shape, generator=generator, device="cpu").to(x0), t)
                        for t in self.timesteps.flip(0)]
        points = lowest_first[::-1]
        corrections = []
        for k, (t, x) in enumerate(zip(self.timesteps, points, strict=True)):
            below = points[k + 1] if k + 1 < len(points) else x0
            corrections.append(below - self.step(self.predict(x, t, self.source, guided=False), t, x, 1.0, None,
                                                 torch.zeros_like(x)))
        return points, corrections

    def invert(self, x0: torch.Tensor) -> list[torch.Tensor]:
        """The source's DDIM trajectory up the timesteps under its own labels (diffusers' DDIMInverseScheduler), in the
        order of `timesteps`. The model is read at the point each step starts from (the image: at the lowest
        timestep)."""
        inverse = DDIMInverseScheduler.from_config(self.scheduler.config)
        inverse.set_timesteps(self.scheduler.num_inference_steps, device=x0.device)
        upward = self.timesteps.flip(0)
        path = [x0]
        for k, t in enumerate(upward):
            output = self.predict(path[-1], upward[max(k - 1, 0)], self.source, guided=False)
            path.append(inverse.step(output, t, path[-1]).prev_sample)
        return path[:0:-1]


def to_model(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (N, 1, H, W) -> the model's space: [-1, 1] pixels, or the posterior mean's standardised
    latent."""
    x = images * 2 - 1
    if getattr(pipe, "vae", None) is None:
        return x.to(pipe.unet.device, pipe.unet.dtype)
    return sample_latents(encode_moments(pipe.vae, x), pipe.vae.config).to(pipe.unet.device, pipe.unet.dtype)


def from_model(pipe, x: torch.Tensor) -> torch.Tensor:
    """The model's space -> images in [0, 1] (N, 1, H, W), float32 on the CPU."""
    if getattr(pipe, "vae", None) is not None:
        x = decode_latents(pipe.vae, x)
    return postprocess(x, "pt").cpu()


def _to_space(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A pixel mask (N, 1, H, W) in [0, 1] at the model's resolution: a latent cell may change if any of its pixels
    may (max pooling), so the kept region never leaks into the edit."""
    if mask.shape[-1] == like.shape[-1]:
        return mask.to(like)
    return F.adaptive_max_pool2d(mask, like.shape[-2:]).to(like)


def adds_one_focal_site(source: Sequence[str] | str, target: Sequence[str] | str) -> bool:
    """Whether an edit only adds findings, each of them focal (`FOCAL_FINDINGS`): its auto mask keeps one site. A
    text edit (two prompts) names no finding list: False."""
    if isinstance(source, str) or isinstance(target, str):
        return False
    before, after = ({canonical_finding(name) for name in names} for names in (source, target))
    return bool(after - before) and before <= after and after - before <= set(FOCAL_FINDINGS)


def _strongest_region(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The connected region (8 neighbours) of a (H, W) mask in {0, 1} holding the most `weight`."""
    h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32, device=mask.device).view(1, 1, h, w) * mask
    while True:  # every pixel of a region takes the region's largest id
        grown = F.max_pool2d(ids, 3, stride=1, padding=1) * mask
        if torch.equal(grown, ids):
            break
        ids = grown
    ids = ids.view(-1).long()
    totals = torch.zeros(h * w + 1, device=ids.device).index_add_(0, ids, weight.reshape(-1).float())
    totals[0] = -1  # the background is never the region
    return (ids == totals.argmax()).view(h, w).to(mask)


@torch.no_grad()
def auto_mask(pipe, image, source: Sequence, target: Sequence, num_draws: int = 8,
              strength: float = 0.5, threshold: float = 0.35, generator: torch.Generator | None = None,
              guidance_scale: float = 1.0, one_site: bool | None = None) -> torch.Tensor:
    """DiffEdit's mask (N, 1, H, W) in {0, 1} of `image` (in any form `edit` takes): noise the image to `strength`
    `num_draws` times, and mark where the model's predictions under the target and the source labels differ by
    more than `threshold` of the largest difference (after smoothing), with a margin. `one_site` keeps only the
    connected region with the most difference, without the margin; None: for the images whose edit adds focal
    findings only (`adds_one_focal_site`).

    The threshold is DiffEdit's 0.5 lowered to 0.35: at 0.5 the mask covered too little of where the true
    counterfactual differs on the phantom, and what it leaves out cannot change (benchmarks/HISTORY.md)."""
    images = IMAGES.preprocess(image).float().cpu()
    x0 = to_model(pipe, images)
    editor = Editor(pipe, source, target, guidance_scale, EDIT_STEPS, strength)
    total = torch.zeros_like(x0[:, :1])
    for to_target, to_source in editor.both_ways(x0, num_draws, generator):
        total += (to_target - to_source).abs().mean(1, keepdim=True)
    smooth = F.avg_pool2d(total, 3, stride=1, padding=1, count_include_pad=False)
    peak = smooth.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    mask = (smooth / peak > threshold).float()
    sites = torch.tensor([bool(one_site) or (one_site is None and adds_one_focal_site(before, after))
                          for before, after in zip(source, target, strict=True)])
    for k in torch.nonzero(sites).flatten().tolist():
        mask[k, 0] = _strongest_region(mask[k, 0], smooth[k, 0])
    side = images.shape[-1]
    if mask.shape[-1] != side:
        mask = F.interpolate(mask, size=(side, side), mode="nearest")
    # A margin of 1/32 of the side (2 pixels at 64): the finding's soft edge belongs to the edit, and so do the thin
    # corners the smoothing drops (an effusion's costophrenic angles, which left as dark slivers read as breast folds).
    # Not at one site: the model places the finding there itself, the site is its whole extent, and a margin only
    # let it grow past a true consolidation's area (benchmarks/HISTORY.md).
    margin = max(1, side // 32)
    grown = F.max_pool2d(mask, 2 * margin + 1, stride=1, padding=margin)
    grown[sites] = mask[sites]
    return grown.cpu()


@torch.no_grad()
def reads_target(pipe, image, source: Sequence, target: Sequence, region: torch.Tensor | None = None,
                 num_draws: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Whether the model itself reads each image (in any form `edit` takes) as its `target` labels rather than its
    `source` labels, bool (N,): noised to `CHECK_STRENGTH` of the schedule `num_draws` times, its noise is predicted
    better under the target's labels than under the source's, summed over `region` ((N, 1, H, W), 1 = counted;
    default everywhere). A diffusion classifier (Li et al. 2023); an image whose labels are the same both ways is
    read as neither (False)."""
    images = IMAGES.preprocess(image).float().cpu()
    x0 = to_model(pipe, images)
    editor = Editor(pipe, source, target, 1.0, EDIT_STEPS, CHECK_STRENGTH)
    if editor.source is None:
        raise UsageError("the model was trained without labels: it cannot read a finding")
    weight = torch.ones_like(x0[:, :1]) if region is None else _to_space(region.float().cpu(), x0)
    score = torch.zeros(len(x0), device=x0.device)
    # The clean image's error is the noise's times a constant of the timestep: the same sign, the same verdict.
    for to_target, to_source in editor.both_ways(x0, num_draws, generator):
        score += (((x0 - to_source) ** 2 - (x0 - to_target) ** 2) * weight).sum((1, 2, 3))
    return (score > 0).cpu()


def _edit_once(pipe, images, source, target, method, strength, guidance_scale, num_inference_steps, keep, generator,
               resample, eta) -> torch.Tensor:
    """One pass of `edit` at one guidance scale: the edited images (N, 1, H, W) in [0, 1], float32 on the CPU."""
    editor = Editor(pipe, source, target, guidance_scale, num_inference_steps, strength)
    x0 = to_model(pipe, images)
    keep_m = None if keep is None else _to_space(keep, x0)
    timesteps = editor.timesteps

    corrections = None
    if method == "ddpm-inversion":
        points, corrections = editor.noise_maps(x0, generator)
    elif method == "ddim-inversion":
        points = editor.invert(x0)
    else:  # the source noised by the generator, to each step (at strength 1, almost pure noise)
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0)
        points = [editor.noised(x0, noise, t) for t in timesteps]
    x = points[0]
    alphas = editor.scheduler.alphas_cumprod.to(x0.device)
    for k, t in enumerate(timesteps):
        for jump in range(resample if method == "repaint" else 1):
            if keep_m is not None:  # the source's own point at t outside the edit
                x = keep_m * points[k] + (1 - keep_m) * x
            if corrections is None:
                x = editor.step(editor.predict(x, t, editor.target, guided=True), t, x, eta, generator)
            else:
                output = editor.predict(x, t, editor.target, guided=True, start=editor.source)
                x = editor.step(output, t, x, eta, generator, corrections[k])
            if method == "repaint" and jump < resample - 1 and k + 1 < len(timesteps):
                # Back up one step with fresh noise, so the inside and the known outside can agree (RePaint).
                ratio = alphas[t] / alphas[timesteps[k + 1]]
                fresh = torch.randn(x.shape, generator=generator, device="cpu").to(x)
                x = ratio.sqrt() * x + (1 - ratio).sqrt() * fresh
    edited = from_model(pipe, x)
    if keep is not None:  # the kept pixels are the source's, exactly (a decoder would blur them on latents)
        edited = keep * images + (1 - keep) * edited
    return edited


@torch.no_grad()
def edit(pipe, image, source: Sequence, target: Sequence, method: str = DEFAULT_METHOD,
         strength: float | None = None, guidance_scale: float = 2.0, num_inference_steps: int = EDIT_STEPS,
         mask_image=None, keep_mask_image=None, generator: torch.Generator | None = None, resample: int = 2,
         eta: float = 0.0, output_type: str = "pil", guidance_rise: float = DEFAULT_GUIDANCE_RISE,
         return_guidance: bool = False):
    """Edit `image` from its `source` labels (one list of names per image; a text model's: one prompt per image) to
    `target`, as diffusers' image-to-image
    and inpainting pipelines take their arguments: `image` a PIL image, a list of them, or an array or tensor in
    [0, 1] ((N, 1, H, W) or (N, H, W)); `output_type` "pil" (a list of grey images), "np" ((N, H, W, 1) in [0, 1]) or
    "pt" ((N, 1, H, W) in [0, 1], float32 on the CPU).

    `mask_image` (white = may change) and `keep_mask_image` (white = must stay) are masks of the images' size, in the
    same forms; with either, the kept region's output is the source's pixels exactly. `eta` puts fresh noise from
    `generator` back at each step down (DDIM's eta; the inversion up stays deterministic).

    An edit the model itself still reads as its source (`reads_target`, inside the mask) is taken again, with the same
    noise, at guidance raised by `GUIDANCE_STEP` at a time, up to `guidance_scale + guidance_rise` (0: never).
    `return_guidance`: (images, the guidance scale each image was edited at)."""
    if output_type not in ("pil", "np", "pt"):
        raise UsageError(f"output_type {output_type!r}: one of pil, np, pt")
    images = IMAGES.preprocess(image).float().cpu()
    mask, keep_mask = (None if m is None else MASKS.preprocess(m).float().cpu() for m in (mask_image, keep_mask_image))
    if method not in METHODS:
        raise UsageError(f"unknown editing method {method!r}; accepted: {', '.join(METHODS)}")
    strength = DEFAULT_STRENGTH[method] if strength is None else strength
    if not 0 < strength <= 1:
        raise UsageError(f"strength {strength}: give a fraction of the noise schedule in (0, 1]")
    if eta < 0:
        raise UsageError(f"eta {eta}: give 0 (deterministic DDIM) or more (1: as much fresh noise as DDPM)")
    if eta and method == "ddpm-inversion":
        raise UsageError(f"eta {eta}: ddpm-inversion's noise is the source's own at every step; eta is for "
                         f"{', '.join(m for m in METHODS if m != 'ddpm-inversion')}")
    if guidance_rise < 0:
        raise UsageError(f"guidance_rise {guidance_rise}: give 0 (never) or more")
    if method == "repaint" and mask is None:
        raise UsageError("repaint regenerates inside a mask: give mask_image (or --mask auto)")
    keep = None
    if keep_mask is not None or mask is not None:
        keep = keep_mask if keep_mask is not None else 1 - mask
        if keep_mask is not None and mask is not None:
            keep = torch.maximum(keep_mask, 1 - mask)
        keep = keep.expand(len(images), -1, -1, -1)  # one mask for every image: each is taken again on its own
    scales = [guidance_scale] * len(images)
    state = None if generator is None else generator.get_state()
    edited = _edit_once(pipe, images, source, target, method, strength, guidance_scale, num_inference_steps, keep,
                        generator, resample, eta)
    todo = _differ(pipe, source, target)
    scale = guidance_scale
    while todo and scale + GUIDANCE_STEP <= guidance_scale + guidance_rise + 1e-9:
        region = None if keep is None else 1 - keep[todo]
        read = reads_target(pipe, edited[todo], [source[k] for k in todo], [target[k] for k in todo], region,
                            generator=generator)
        todo = [k for k, done in zip(todo, read.tolist(), strict=True) if not done]
        if not todo:
            break
        scale += GUIDANCE_STEP
        if state is not None:  # the same noise as the first pass: only the guidance differs
            generator.set_state(state)
        edited[todo] = _edit_once(pipe, images[todo], [source[k] for k in todo], [target[k] for k in todo], method,
                                  strength, scale, num_inference_steps, None if keep is None else keep[todo],
                                  generator, resample, eta)
        for k in todo:
            scales[k] = scale
    output = IMAGES.postprocess(edited, output_type)
    return (output, scales) if return_guidance else output
