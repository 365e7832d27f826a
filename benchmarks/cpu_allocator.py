"""What `runtime.keep_freed_memory()` buys on CPU: a training step and a sampling forward pass, with glibc's default
allocator and with freed memory kept in the process.

    python benchmarks/cpu_allocator.py                                    # lunggen-256, 256 px, batch 4
    python benchmarks/cpu_allocator.py --preset demo --train_batch_size 16 --steps 30

The setting is process-wide and cannot be undone, so each mode runs in its own process (same seed, same tensors).
Reports seconds per step, kernel (system) CPU seconds per step, minor page faults per step and peak RSS; prints a
table and writes JSON.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from lunggen_diffusers.config import from_dict  # noqa: E402
from lunggen_diffusers.runtime import keep_freed_memory, set_cpu_threads  # noqa: E402
from lunggen_diffusers.training.model import build_unet  # noqa: E402

from common import finish  # noqa: E402  (beside this file)


@dataclass
class AllocatorArguments:
    preset: str = field(default="lunggen-256", metadata={"help": "demo or lunggen-256."})
    resolution: int | None = field(default=None, metadata={"help": "Default: the preset's."})
    train_batch_size: int = field(default=4)
    steps: int = field(default=3, metadata={"help": "Timed steps of each kind, after 2 untimed ones."})
    mode: str = field(default="both", metadata={"help": "both, or default / keep (one process, used by `both`)."})
    output: str = field(default="benchmarks/results/cpu_allocator.json", metadata={"help": "JSON written here."})


def timed(fn, steps: int) -> dict:
    for _ in range(2):  # the heap grows until freed blocks fit the next requests
        fn()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        fn()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {
        "s_per_step": seconds / steps,
        "kernel_cpu_s_per_step": (after.ru_stime - before.ru_stime) / steps,
        "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
    }


def measure(args: AllocatorArguments) -> dict:
    set_cpu_threads(None, 1)
    applied = keep_freed_memory() if args.mode == "keep" else False
    overrides = {"preset": args.preset, "output_dir": "unused", "train_batch_size": args.train_batch_size}
    if args.resolution:
        overrides["resolution"] = args.resolution
    config = from_dict(overrides)
    torch.manual_seed(0)
    unet = build_unet(config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    res, bs = config.data.resolution, args.train_batch_size
    x, timesteps = torch.randn(bs, 1, res, res), torch.randint(0, 1000, (bs,))

    def train_step():
        F.mse_loss(unet(x, timesteps).sample, x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample_step():
        unet(x, timesteps)

    train = timed(train_step, args.steps)
    unet.eval()
    sample = timed(sample_step, args.steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": args.mode, "applied": applied, "train": train, "sample": sample, "peak_rss_mib": peak}


def main() -> None:
    (args,) = HfArgumentParser(AllocatorArguments).parse_args_into_dataclasses()
    if args.mode not in ("both", "default", "keep"):
        sys.exit(f"error: --mode {args.mode!r} is not one of: both, default, keep")
    if args.mode != "both":
        print(json.dumps(measure(args)))
        return
    results = []
    for mode in ("default", "keep"):
        argv = sys.argv[1:] + ["--mode", mode]
        out = subprocess.run([sys.executable, __file__, *argv], check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    base, kept = results
    res = args.resolution or from_dict({"preset": args.preset, "output_dir": "unused"}).data.resolution
    print(f"\n{args.preset}: {res}px, batch {args.train_batch_size}, fp32, {torch.get_num_threads()} threads")
    print(f"  {'':<22}{'s/step':>8}{'kernel s':>10}{'faults':>10}{'speed-up':>10}")
    for kind in ("train", "sample"):
        for r in results:
            m = r[kind]
            speedup = base[kind]["s_per_step"] / m["s_per_step"]
            print(f"  {kind + ' ' + r['mode']:<22}{m['s_per_step']:>8.2f}{m['kernel_cpu_s_per_step']:>10.2f}"
                  f"{m['page_faults_per_step'] / 1e6:>9.2f}M{speedup:>9.2f}x")
    print(f"  peak RSS: {base['peak_rss_mib']:.0f} MiB default, {kept['peak_rss_mib']:.0f} MiB kept")
    report = {"args": asdict(args), "resolution": res, "date": time.strftime("%Y-%m-%d"), "results": results}
    finish(report, args.output)


if __name__ == "__main__":
    main()
