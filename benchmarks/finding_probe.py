"""Why a conditional phantom model does or does not draw a finding: a one-step probe of its denoiser.

    python benchmarks/finding_probe.py --model cond-demo --finding nodule

Each held-out phantom is rendered twice from one seed, with and without the finding (the same anatomy, exposure and
noise), both are noised to timestep t with the same noise, and the model estimates the clean image in one step.
Per t (and the noise level it means, sigma = sqrt((1 - alpha_bar) / alpha_bar) in [-1, 1] pixel units):
- retention: the share of the finding's contrast (with minus without, summed over the pixels it raises by more than
  0.05) that is still there in the estimates, asked for the finding (label on) or for no finding (label off). A
  denoiser that can draw the finding keeps it wherever the noise leaves it visible, and keeps more when told it is
  there;
- label adds: on the image without the finding, the largest amount by which asking for the finding rather than for
  no finding raises the estimate anywhere (mean over images), beside the finding's own peak contrast;
- x0 MSE: the estimate's mean squared error over the whole image (label on), what training minimises, and the
  share of that squared error that falls on the finding's pixels: how much getting the finding right can lower it;
- retention (label on) with the finding's contrast scaled by each of `--contrast_scales`: a linear denoiser keeps
  the same share at every scale, an exact one keeps more of a finding the further it stands above the noise.
Per start t0 of the whole reverse chain (DDPM, every step from t0 to 0, the same noise with and without the finding):
the contrast still there at the end, label on and off, and the share of the label-on images that the phantom
classifier reads as having the finding, beside its reading of the clean images with the finding at 0.5-1x its
contrast (how faint a finding it still counts). One step can keep a finding that the chain of steps below it
erases, and the chain is what sampling runs.
Prints three tables and writes JSON.
"""

import os
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from diffusers import DDPMScheduler  # noqa: E402

from lunggen_diffusers.cli import run  # noqa: E402
from lunggen_diffusers.data.phantom import FINDINGS, render_phantom  # noqa: E402
from lunggen_diffusers.evaluation.phantom_classifier import load_classifier  # noqa: E402
from lunggen_diffusers.generation.sampling import is_conditional, load_pipeline, model_label  # noqa: E402
from lunggen_diffusers.lunggen_pipeline import guided_denoise  # noqa: E402
from lunggen_diffusers.utils import markdown_table  # noqa: E402

from common import finish  # noqa: E402  (beside this file)

# Neither training (seed 0), the sampler benchmark (12345), the classifier nor the fidelity benchmark (24680).
PROBE_SEED = 13579
CONTRAST_THRESHOLD = 0.05
READ_SCALES = (0.5, 0.7, 0.8, 0.9, 1.0)


@dataclass
class ProbeArguments:
    model: str = field(metadata={"help": "A conditional model folder (LungGenPipeline) trained on the phantom."})
    finding: str = field(default="nodule", metadata={"help": f"One of {', '.join(FINDINGS)}."})
    timesteps: list[int] = field(default_factory=lambda: [10, 25, 50, 100, 150, 200, 300])
    contrast_scales: list[float] = field(default_factory=lambda: [0.25, 1.0, 3.0])
    chain_from: list[int] = field(default_factory=lambda: [10, 25, 50],
                                  metadata={"help": "Start timesteps of the whole reverse chain (DDPM, every step)."})
    num_images: int = field(default=32)
    num_threads: int | None = field(default=None, metadata={"help": "CPU threads for torch."})
    output: str = field(default="benchmarks/results/finding_probe.json")


def _render(resolution: int, count: int, findings: list[str]) -> torch.Tensor:
    """Phantoms 0 .. count - 1 of the probe's seed as model input; one seed per image, whatever the findings."""
    pixels = np.stack([render_phantom(resolution, np.random.default_rng([PROBE_SEED, i]), findings)
                       for i in range(count)])
    return torch.from_numpy(pixels).float().div(127.5).sub(1).unsqueeze(1)


def load_conditional(model: str, finding: str, num_threads: int | None):
    """(pipeline, revision) of a conditional phantom model on CPU, once `finding` is known to be a phantom finding."""
    if finding not in FINDINGS:
        raise ValueError(f"--finding {finding!r} is not a phantom finding; choose from {', '.join(FINDINGS)}")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    pipe, revision = load_pipeline(model, device="cpu")
    if not is_conditional(pipe):
        raise ValueError(f"--model {model_label(model)!r} is unconditional; train one with --condition_on findings")
    return pipe, revision


def probe(args: ProbeArguments) -> dict:
    if args.num_images < 1:
        raise ValueError(f"--num_images must be >= 1, got {args.num_images}")
    if not args.contrast_scales or min(args.contrast_scales) <= 0:
        raise ValueError(f"--contrast_scales {args.contrast_scales}: give scales > 0 (1 is the finding as rendered)")
    pipe, revision = load_conditional(args.model, args.finding, args.num_threads)
    steps = pipe.scheduler.config.num_train_timesteps
    for name in ("timesteps", "chain_from"):
        bad = [t for t in getattr(args, name) if not 0 <= t < steps]
        if bad:
            raise ValueError(f"--{name} {bad} outside the model's 0..{steps - 1}")
    resolution, n = pipe.unet.config.sample_size, args.num_images
    with_it, without = _render(resolution, n, [args.finding]), _render(resolution, n, [])
    contrast = with_it - without
    mask = contrast > CONTRAST_THRESHOLD
    on, off = (pipe.encode([labels] * n, n)[0] for labels in ([args.finding], []))
    alpha_bar, prediction = pipe.scheduler.alphas_cumprod, pipe.scheduler.config.prediction_type

    def estimate(x0: torch.Tensor, labels: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        a, s = alpha_bar[t].sqrt(), (1 - alpha_bar[t]).sqrt()
        x_t = a * x0 + s * noise
        out = pipe.unet(x_t, t, encoder_hidden_states=None, class_labels=labels).sample
        return a * x_t - s * out if prediction == "v_prediction" else (x_t - s * out) / a

    rows = []
    with torch.inference_mode():
        for t in args.timesteps:
            noise = torch.randn(with_it.shape, generator=torch.Generator().manual_seed(t))
            with_on, without_on = estimate(with_it, on, t, noise), estimate(without, on, t, noise)
            with_off, without_off = estimate(with_it, off, t, noise), estimate(without, off, t, noise)
            kept = {name: float((w - wo)[mask].sum() / contrast[mask].sum())
                    for name, (w, wo) in (("on", (with_on, without_on)), ("off", (with_off, without_off)))}
            added = (without_on - without_off).amax(dim=(1, 2, 3))
            error = (with_on - with_it) ** 2
            scaled = [float((estimate(without + k * contrast, on, t, noise) - without_on)[mask].sum()
                            / (k * contrast[mask].sum())) for k in args.contrast_scales]
            rows.append({"timestep": t, "sigma": float(((1 - alpha_bar[t]) / alpha_bar[t]).sqrt()),
                         "retention_label_on": kept["on"], "retention_label_off": kept["off"],
                         "label_adds": float(added.clamp(min=0).mean()),
                         "x0_mse": float(error.mean()), "error_share": float(error[mask].sum() / error.sum()),
                         "retention_at_scales": scaled})

    def chain(x0: torch.Tensor, labels: torch.Tensor, t0: int) -> torch.Tensor:
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(timesteps=list(range(t0, -1, -1)))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t0))
        x = scheduler.add_noise(x0, noise, torch.full((n,), t0))
        # The same step noise with and without the finding, so the two ends differ by what is left of it.
        return guided_denoise(pipe.unet, scheduler, x, labels,
                              step_kwargs={"generator": torch.Generator().manual_seed(t0 + 1)})

    classifier, column = load_classifier(), FINDINGS.index(args.finding)

    def reads(x: torch.Tensor) -> float:
        return float((classifier.predict(_to_uint8(x))[:, column] > 0.5).mean())

    chains = []
    with torch.inference_mode():
        for t0 in args.chain_from:
            ends = {name: (chain(with_it, labels, t0), chain(without, labels, t0))
                    for name, labels in (("on", on), ("off", off))}
            kept = {name: float((w - wo)[mask].sum() / contrast[mask].sum()) for name, (w, wo) in ends.items()}
            chains.append({"start_timestep": t0, "sigma": float(((1 - alpha_bar[t0]) / alpha_bar[t0]).sqrt()),
                           "retention_label_on": kept["on"], "retention_label_off": kept["off"],
                           "classifier_reads_label_on": reads(ends["on"][0])})
    return {"settings": {**{k: v for k, v in asdict(args).items() if k != "output"}, "model": model_label(args.model),
                         "model_revision": revision, "probe_seed": PROBE_SEED},
            "finding_peak_contrast": float(contrast.amax(dim=(1, 2, 3)).mean()),
            "finding_pixels": float(mask.sum() / n), "rows": rows,
            "classifier_reads_clean": {k: reads(without + k * contrast) for k in READ_SCALES}, "chains": chains}


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return torch.round((x[:, 0] / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).numpy()


def table(result: dict) -> str:
    return markdown_table(
        ["t", "sigma", "retention, label on", "retention, label off", "label adds (peak)", "x0 MSE",
         "its share on the finding"],
        [[r["timestep"], r["sigma"], r["retention_label_on"], r["retention_label_off"], r["label_adds"], r["x0_mse"],
          r["error_share"]]
         for r in result["rows"]])


if __name__ == "__main__":
    (arguments,) = HfArgumentParser(ProbeArguments).parse_args_into_dataclasses()
    outcome = run(lambda: probe(arguments))
    finish(outcome, arguments.output)
    print(table(outcome))
    print(markdown_table(
        ["t", "sigma", *(f"retention at {k:g}x contrast" for k in arguments.contrast_scales)],
        [[r["timestep"], r["sigma"], *r["retention_at_scales"]] for r in outcome["rows"]]))
    print(markdown_table(
        ["chain from t0", "sigma", "retention, label on", "retention, label off", "classifier reads it (label on)"],
        [[c["start_timestep"], c["sigma"], c["retention_label_on"], c["retention_label_off"],
          c["classifier_reads_label_on"]] for c in outcome["chains"]]))
    print("the classifier reads it on the clean images, at its contrast times "
          + ", ".join(f"{k:g}: {share:.2f}" for k, share in outcome["classifier_reads_clean"].items()))
    print(f"{arguments.finding}: peak contrast {outcome['finding_peak_contrast']:.3f} over "
          f"{outcome['finding_pixels']:.1f} pixels per image (mean); written {arguments.output}")
