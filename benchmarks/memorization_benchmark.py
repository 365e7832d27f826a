"""Speed and memory of the memorization audit's nearest-neighbour search (chunked matrix products, running top-k).

    python benchmarks/memorization_benchmark.py                      # 1,000 generated x 10,000 training, CPU
    python benchmarks/memorization_benchmark.py --num_generated 10000 --num_train 100000 --device cuda

The search cost does not depend on image content, so inputs are random: audit-size pixel images (the NCC search)
and 768-d features (RAD-DINO's width, the cosine search). Prints a table and writes JSON.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from lunggen_diffusers.evaluation.memorization import audit, cosine_search, ncc_search  # noqa: E402


@dataclass
class BenchmarkArguments:
    num_generated: int = field(default=1000, metadata={"help": "Generated (query) images."})
    num_train: int = field(default=10000, metadata={"help": "Training (key) images."})
    num_null: int = field(default=1000, metadata={"help": "Held-out images for the full audit's null."})
    audit_size: int = field(default=64, metadata={"help": "Side of the NCC images."})
    max_shift: int = field(default=2, metadata={"help": "NCC shift search radius."})
    feature_dim: int = field(default=768, metadata={"help": "Feature width for the cosine search."})
    chunk_size: int = field(default=4096, metadata={"help": "Rows per chunk of the similarity products."})
    device: str = field(default="cpu", metadata={"help": "torch device."})
    output: str = field(default="benchmarks/results/memorization.json", metadata={"help": "JSON written here."})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> dict:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    rng = np.random.default_rng(0)
    pixels = lambda n: rng.random((n, args.audit_size**2), dtype=np.float32)  # noqa: E731
    features = lambda n: rng.standard_normal((n, args.feature_dim), dtype=np.float32)  # noqa: E731
    gen_p, train_p, null_p = pixels(args.num_generated), pixels(args.num_train), pixels(args.num_null)
    gen_f, train_f, null_f = features(args.num_generated), features(args.num_train), features(args.num_null)
    rss_inputs = peak_rss_mb()
    shifts = (2 * args.max_shift + 1) ** 2
    stages = {
        f"ncc search ({shifts} shifts)": lambda: ncc_search(gen_p, train_p, args.max_shift, args.chunk_size, args.device),
        "cosine search": lambda: cosine_search(gen_f, train_f, args.chunk_size, args.device),
        "full audit (generated + null)": lambda: audit(gen_p, gen_f, null_p, null_f, train_p, train_f,
                                                       max_shift=args.max_shift, chunk_size=args.chunk_size,
                                                       device=args.device),
    }
    rows = []
    for name, fn in stages.items():
        seconds = timed(fn)
        rows.append({"stage": name, "seconds": round(seconds, 2), "peak_rss_mb": round(peak_rss_mb(), 1)})
    result = {"args": asdict(args), "inputs_rss_mb": round(rss_inputs, 1), "stages": rows,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or
              platform.machine(), "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    print(f"{args.num_generated} generated x {args.num_train} training, audit {args.audit_size}px +-{args.max_shift}, "
          f"{args.feature_dim}-d features, {args.device}, {torch.get_num_threads()} threads")
    print(f"{'stage':<32}{'seconds':>10}{'peak RSS MB':>14}")
    for row in rows:
        print(f"{row['stage']:<32}{row['seconds']:>10.2f}{row['peak_rss_mb']:>14.1f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
