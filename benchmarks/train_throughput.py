"""Training speed against the hardware limit: the project's step vs a bare PyTorch step, and model FLOPs utilisation.

    python benchmarks/train_throughput.py                                   # demo preset, 64 px, CPU
    python benchmarks/train_throughput.py --preset lunggen-256 --steps 3 --warmup_steps 3 --train_batch_size 4
    python benchmarks/train_throughput.py --preset lunggen-256 --mixed_precision bf16 --channels_last true \
        --torch_compile true --train_batch_size 32                           # on a GPU

In one run, on the same model, batch size, resolution and optimizer:
1. `project`: `lunggen_diffusers.training.train` itself (data loader, EMA, LR schedule, logging, accumulation 1),
   timed over `--steps` optimizer steps after `--warmup_steps` (its own throughput figure, warm-up excluded);
2. `bare`: the same UNet forward, loss, backward and AdamW step on tensors already in memory;
3. the FLOPs of one step (`torch.utils.flop_counter.FlopCounterMode`) and the device's measured peak for the
   dtype (a large matrix multiply timed in the same run).
Prints a table and writes JSON.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from lunggen_diffusers.config import from_dict  # noqa: E402
from lunggen_diffusers.training.diffusion import train  # noqa: E402
from lunggen_diffusers.training.model import build_unet  # noqa: E402

from common import cpu_name, finish  # noqa: E402  (beside this file)


@dataclass
class BenchmarkArguments:
    preset: str = field(default="demo", metadata={"help": "demo or lunggen-256."})
    steps: int = field(default=40, metadata={"help": "Timed optimizer steps."})
    warmup_steps: int = field(default=10, metadata={"help": "Untimed steps first (allocator, caches, compile)."})
    train_batch_size: int | None = field(default=None, metadata={"help": "Default: the preset's."})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16."})
    channels_last: bool = field(default=False)
    torch_compile: bool = field(default=False)
    output: str = field(default="benchmarks/results/train_throughput.json", metadata={"help": "JSON written here."})


def device_and_dtype(mixed_precision: str) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measured_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul: the practical ceiling for this device and dtype. On a GPU, 8192 (smaller
    products leave an H100 short of its peak, which would flatter the MFU)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 5
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def bare_step_setup(config, device, dtype):
    t = config.training
    unet = build_unet(config).to(device)
    if t.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay, eps=t.adam_epsilon, fused=t.use_fused_adam and device.type == "cuda",
    )
    model = torch.compile(unet) if t.torch_compile else unet
    res, bs = config.data.resolution, t.train_batch_size
    x = torch.randn(bs, 1, res, res, device=device)
    timesteps = torch.randint(0, 1000, (bs,), device=device)
    if t.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = model(x, timesteps).sample
        loss = F.mse_loss(pred.float(), x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return unet, x, timesteps, step


def flops_per_step(unet, x, timesteps) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        unet(x, timesteps).sample.float().pow(2).mean().backward()
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    device, dtype = device_and_dtype(args.mixed_precision)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {
            "preset": args.preset,
            "output_dir": str(Path(tmp) / "run"),
            "max_train_steps": args.warmup_steps + args.steps,
            "logging_steps": args.warmup_steps,  # the project's own throughput window starts after warm-up
            "checkpointing_steps": 10**9,  # checkpoints and previews are not the step; time them separately
            "save_images_steps": None,
            "logger": "none",
            "mixed_precision": args.mixed_precision,
            "channels_last": args.channels_last,
            "torch_compile": args.torch_compile,
            "num_phantom_images": 512,
            "lr_warmup_steps": 0,
            "eval_batch_size": 1,
            "preview_inference_steps": 1,
        }
        if args.train_batch_size:
            overrides["train_batch_size"] = args.train_batch_size
        config = from_dict(overrides)
        batch = config.training.train_batch_size

        project = train(config).images_per_second

        unet, x, timesteps, step = bare_step_setup(config, device, dtype)
        flops = flops_per_step(unet, x, timesteps)
        for _ in range(args.warmup_steps):
            step()
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        bare = args.steps * batch / (time.perf_counter() - start)
        peak = measured_peak(device, dtype)

    per_image = flops / batch
    result = {
        "preset": args.preset,
        "resolution": config.data.resolution,
        "batch_size": batch,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU {cpu_name()}",
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "steps": args.steps,
        "flops_per_step": flops,
        "peak_flops": peak,
        "project_images_per_s": project,
        "bare_images_per_s": bare,
        "overhead_ratio": project / bare,
        "project_mfu": project * per_image / peak,
        "bare_mfu": bare * per_image / peak,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "args": asdict(args),
        "date": time.strftime("%Y-%m-%d"),
    }
    rows = [
        ("step", "images/s", "MFU"),
        ("project (train.py path)", f"{project:.2f}", f"{result['project_mfu']:.1%}"),
        ("bare PyTorch", f"{bare:.2f}", f"{result['bare_mfu']:.1%}"),
    ]
    print(f"\n{args.preset}: {config.data.resolution}px, batch {batch}, {result['dtype']} on {result['device']}, "
          f"{flops / 1e9:.1f} GFLOP/step, measured peak {peak / 1e9:.0f} GFLOP/s")
    for row in rows:
        print(f"  {row[0]:<26}{row[1]:>10}{row[2]:>8}")
    print(f"  overhead ratio (project / bare): {result['overhead_ratio']:.3f}; "
          f"peak RSS {result['peak_rss_mib']:.0f} MiB")
    finish(result, args.output)


if __name__ == "__main__":
    main()
