"""What a phantom-trained model draws: each finding's prevalence and the heart's side, read by the phantom classifier
on its samples, beside the training prevalence, and the Fréchet distance on the classifier's features against
held-out phantoms next to the real-vs-real floor at the same size.

    python benchmarks/demo_census.py --model pixel-demo --model latent-demo --num_images 512

Every model is sampled the same way (its default sampler unless `--scheduler` / `--num_inference_steps`), on the
same seeds; held-out phantoms are drawn at each model's resolution (the classifier reads all of them at its own).
Prevalence intervals are Wilson 95% intervals; laterality is the share with the heart on the image's right (the
radiological convention of every phantom).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from lunggen_diffusers.data.phantom import FINDINGS, draw_phantom  # noqa: E402
from lunggen_diffusers.evaluation.metrics import frechet_distance  # noqa: E402
from lunggen_diffusers.evaluation.phantom_classifier import load_classifier  # noqa: E402
from lunggen_diffusers.generation.sampling import DEFAULT_SCHEDULER, DEFAULT_STEPS, generate, load_pipeline  # noqa: E402

from common import census, finish  # noqa: E402  (beside this file)

HELD_OUT_SEED = 12345  # as sampler_benchmark.py: the demo trains on seed 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER)
    parser.add_argument("--num_inference_steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--training_prevalence", type=float, default=0.1, help="The phantom's per-finding share.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output", default="benchmarks/results/demo_census.json")
    args = parser.parse_args()
    classifier = load_classifier()
    n, rows = args.num_images, []
    for model in args.model:
        pipe, _ = load_pipeline(model)
        start = time.perf_counter()
        images = generate(pipe, n, seed=0, scheduler=args.scheduler, num_inference_steps=args.num_inference_steps,
                          batch_size=args.batch_size, output_type="np")
        seconds = (time.perf_counter() - start) / n
        images = np.round(images[..., 0] * 255).astype(np.uint8)
        res = images.shape[-1]
        real = np.stack([draw_phantom(HELD_OUT_SEED, i, res, args.training_prevalence)[0] for i in range(2 * n)])
        f_fake, f_real = classifier.features(images), classifier.features(real)
        rows.append({"model": Path(model).name, "resolution": res, "seconds_per_image": seconds,
                     "fd": frechet_distance(f_fake, f_real[:n]), "fd_floor": frechet_distance(f_real[n:], f_real[:n]),
                     "census": census(images, classifier), "held_out_census": census(real[:n], classifier)})
    header = ["model", "px", "s/image", "FD (floor)"] + list(FINDINGS) + ["heart on right"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:  # each model, then what the classifier reads on held-out phantoms at its resolution: its target
        cells = [f"{v['share']:.3f} [{v['interval'][0]:.3f}, {v['interval'][1]:.3f}]" for v in r["census"].values()]
        lines.append(f"| {r['model']} | {r['resolution']} | {r['seconds_per_image']:.3f} | {r['fd']:.2f} "
                     f"({r['fd_floor']:.2f}) | " + " | ".join(cells) + " |")
        lines.append(f"| held-out phantoms | {r['resolution']} | - | - | "
                     + " | ".join(f"{v['share']:.3f}" for v in r["held_out_census"].values()) + " |")
    finish({"num_images": n, "scheduler": args.scheduler, "steps": args.num_inference_steps,
            "training_prevalence": args.training_prevalence, "rows": rows}, args.output,
           f"{n} images each, {args.scheduler}-{args.num_inference_steps}, training prevalence "
           f"{args.training_prevalence} per finding\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
