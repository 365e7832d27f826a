"""What a training step and a sampled image cost on the latent route against the pixel route: FLOPs (counted),
seconds (measured) and peak memory (measured), per image.

    python benchmarks/latent_cost.py                                  # CPU, batch 1, the four routes below
    python benchmarks/latent_cost.py --device cuda --batch_size 8     # on a GPU

Routes, each with the project's own presets:
- pixel-256: `lunggen-256` (the LungGen paper's UNet) at 256 px;
- pixel-512: the same UNet at 512 px (what going to 512 px in pixel space costs);
- latent-512: `lunggen-512-latent` (autoencoder 8x down, UNet on 4 x 64 x 64 latents);
- latent-1024: `lunggen-1024-latent` (the same autoencoder, UNet on 4 x 128 x 128 latents).
A training step is the UNet's forward and backward (latents come from the cache: no encoder per step). A sampled
image is `--sampling_steps` UNet forwards plus, on the latent route, one decoder pass. Each route runs in its own
process, so its peak resident memory (CPU) or peak allocated memory (CUDA) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from lunggen_diffusers.config import from_dict  # noqa: E402
from lunggen_diffusers.lunggen_pipeline import (
    decode_latents,  # noqa: E402
    latent_shape,  # noqa: E402
)
from lunggen_diffusers.training.autoencoder import build_autoencoder  # noqa: E402
from lunggen_diffusers.training.model import build_unet  # noqa: E402

from common import finish  # noqa: E402  (beside this file)

ROUTES = {"pixel-256": ("lunggen-256", 256), "pixel-512": ("lunggen-256", 512),
          "latent-512": ("lunggen-512-latent", 512), "latent-1024": ("lunggen-1024-latent", 1024)}


def _timed(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    """(FLOPs of one call, median seconds over `repeats` calls after one warm-up)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(counter.get_total_flops()), sorted(times)[len(times) // 2]


def measure(route: str, batch_size: int, repeats: int, device: str) -> dict:
    """One route's figures, per image; run in a process of its own."""
    preset, resolution = ROUTES[route]
    config = from_dict({"preset": preset, "resolution": resolution})
    dev = torch.device(device)
    latent = None
    vae = None
    if config.model.latent:
        vae = build_autoencoder(config).to(dev).eval()
        latent = latent_shape(vae, resolution)
    unet = build_unet(config, None, latent).to(dev)
    channels, side = latent or (1, resolution)
    x = torch.randn(batch_size, channels, side, side, device=dev)
    t = torch.randint(0, 1000, (batch_size,), device=dev)

    def train_step():
        unet.zero_grad(set_to_none=True)
        unet(x, t).sample.float().pow(2).mean().backward()

    def unet_forward():
        with torch.no_grad():
            unet(x, t)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_flops, train_s = _timed(train_step, repeats, dev)
    unet_flops, unet_s = _timed(unet_forward, repeats, dev)
    decode_flops = decode_s = 0.0
    if vae is not None:
        def decode():
            with torch.no_grad():
                decode_latents(vae, x)
        decode_flops, decode_s = _timed(decode, repeats, dev)
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"route": route, "preset": preset, "resolution": resolution, "model_input": [channels, side, side],
            "unet_parameters_m": sum(p.numel() for p in unet.parameters()) / 1e6,
            "train_gflops_per_image": train_flops / batch_size / 1e9, "train_s_per_image": train_s / batch_size,
            "unet_gflops_per_image": unet_flops / batch_size / 1e9, "unet_s_per_image": unet_s / batch_size,
            "decode_gflops_per_image": decode_flops / batch_size / 1e9, "decode_s_per_image": decode_s / batch_size,
            "peak_memory_gib": peak / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", nargs="*", default=list(ROUTES), choices=list(ROUTES))
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sampling_steps", type=int, default=1000, help="UNet forwards per sampled image.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="benchmarks/results/latent_cost.json")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one route, JSON out
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.batch_size, args.repeats, args.device)))
        return
    rows = []
    for route in args.routes:
        proc = subprocess.run([sys.executable, __file__, "--one", route, "--batch_size", str(args.batch_size),
                               "--repeats", str(args.repeats), "--device", args.device],
                              capture_output=True, text=True, check=True, env=os.environ)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{route}: done", file=sys.stderr)
    base = next((r for r in rows if r["route"] == "pixel-256"), rows[0])
    n = args.sampling_steps
    for r in rows:
        r["sample_gflops_per_image"] = n * r["unet_gflops_per_image"] + r["decode_gflops_per_image"]
        r["sample_s_per_image"] = n * r["unet_s_per_image"] + r["decode_s_per_image"]
    header = ("route", "input to the UNet", "train step GFLOPs", "train step s", f"sample ({n} steps) TFLOPs",
              "sample s", "vs pixel-256 (sample s)", "peak memory GiB")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(
            f"| {r['route']} | {'x'.join(map(str, r['model_input']))} | {r['train_gflops_per_image']:.1f} | "
            f"{r['train_s_per_image']:.3f} | {r['sample_gflops_per_image'] / 1e3:.2f} | {r['sample_s_per_image']:.1f} "
            f"| {r['sample_s_per_image'] / base['sample_s_per_image']:.2f}x | {r['peak_memory_gib']:.2f} |")
    finish({"batch_size": args.batch_size, "sampling_steps": n, "device": args.device, "rows": rows}, args.output,
           "\n".join(lines))


if __name__ == "__main__":
    main()
