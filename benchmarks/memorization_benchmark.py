"""Speed and memory of the memorization audit's nearest-neighbour search (chunked matrix products, running top-k),
in one process or split over several (the training set by chunks, as `accelerate launch ... evaluate` does).

    python benchmarks/memorization_benchmark.py                      # 1,000 generated x 10,000 training, CPU
    python benchmarks/memorization_benchmark.py --num_generated 10000 --num_train 100000 --stages cosine
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 benchmarks/memorization_benchmark.py \
        --stages cosine ...                                            # 2 CPU processes (gloo)
    accelerate launch --multi_gpu --num_processes 8 benchmarks/memorization_benchmark.py --num_generated 100000 \
        --num_train 86000

The search cost does not depend on image content, so inputs are random: audit-size pixel images (the NCC search)
and 768-d features (RAD-DINO's width, the cosine search). Prints a table and writes JSON.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from lunggen_diffusers.evaluation.memorization import audit, cosine_search, ncc_search, sharded_search  # noqa: E402
from lunggen_diffusers.runtime import process_device, process_state  # noqa: E402

from common import finish  # noqa: E402  (beside this file)


@dataclass
class BenchmarkArguments:
    num_generated: int = field(default=1000, metadata={"help": "Generated (query) images."})
    num_train: int = field(default=10000, metadata={"help": "Training (key) images."})
    num_null: int = field(default=1000, metadata={"help": "Held-out images for the full audit's null."})
    audit_size: int = field(default=64, metadata={"help": "Side of the NCC images."})
    max_shift: int = field(default=2, metadata={"help": "NCC shift search radius."})
    feature_dim: int = field(default=768, metadata={"help": "Feature width for the cosine search."})
    chunk_size: int = field(default=4096, metadata={"help": "Rows per chunk of the similarity products."})
    device: str | None = field(default=None, metadata={"help": "torch device; default: this process's (CPU or GPU)."})
    stages: str = field(default="ncc,cosine,audit", metadata={"help": "Comma-separated: ncc, cosine, audit."})
    output: str = field(default="benchmarks/results/memorization.json", metadata={"help": "JSON written here."})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed(fn, state):
    state.wait_for_everyone()  # every process starts together; the slowest one sets the time
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    state.wait_for_everyone()
    return time.perf_counter() - start


def main() -> dict:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    state = process_state()
    device = args.device or process_device(state)
    rng = np.random.default_rng(0)  # every process draws the same sets, as every process of a run reads them all
    pixels = lambda n: rng.random((n, args.audit_size**2), dtype=np.float32)  # noqa: E731
    features = lambda n: rng.standard_normal((n, args.feature_dim), dtype=np.float32)  # noqa: E731
    stages = args.stages.split(",")
    wanted_pixels = {"ncc", "audit"} & set(stages)
    gen_p, train_p, null_p = (pixels(n) if wanted_pixels else None
                              for n in (args.num_generated, args.num_train, args.num_null))
    gen_f, train_f, null_f = features(args.num_generated), features(args.num_train), features(args.num_null)
    rss_inputs = peak_rss_mb()
    shifts = (2 * args.max_shift + 1) ** 2
    inner = (args.audit_size - 2 * args.max_shift) ** 2
    ncc_flop = 2 * shifts * args.num_generated * args.num_train * inner
    cos_flop = 2 * args.num_generated * args.num_train * args.feature_dim
    ncc = {"max_shift": args.max_shift, "device": device}
    runs = {
        "ncc": (f"ncc search ({shifts} shifts)", ncc_flop,
                lambda: sharded_search(ncc_search, gen_p, train_p, args.chunk_size, **ncc)),
        "cosine": ("cosine search", cos_flop,
                   lambda: sharded_search(cosine_search, gen_f, train_f, args.chunk_size, device=device)),
        "audit": ("full audit (generated + null)",
                  (ncc_flop + cos_flop) * (args.num_generated + args.num_null) / args.num_generated,
                  lambda: audit(gen_p, gen_f, null_p, null_f, train_p, train_f, max_shift=args.max_shift,
                                chunk_size=args.chunk_size, device=device)),
    }
    unknown = set(stages) - set(runs)
    if unknown:
        raise SystemExit(f"error: unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(runs)}")
    rows = []
    for key in stages:
        name, flop, fn = runs[key]
        seconds = timed(fn, state)
        rows.append({"stage": name, "seconds": round(seconds, 2), "tflop": round(flop / 1e12, 3),
                     "gflop_per_s": round(flop / seconds / 1e9, 1), "peak_rss_mb": round(peak_rss_mb(), 1)})
    if not state.is_main_process:
        return {}
    result = {"args": asdict(args), "processes": state.num_processes, "inputs_rss_mb": round(rss_inputs, 1),
              "stages": rows}
    print(f"{args.num_generated} generated x {args.num_train} training, audit {args.audit_size}px +-{args.max_shift}, "
          f"{args.feature_dim}-d features, {device}, {state.num_processes} process(es) x {torch.get_num_threads()} "
          "threads")
    print(f"{'stage':<32}{'seconds':>10}{'TFLOP':>10}{'GFLOP/s':>10}{'peak RSS MB':>14}")
    for row in rows:
        print(f"{row['stage']:<32}{row['seconds']:>10.2f}{row['tflop']:>10.3f}{row['gflop_per_s']:>10.1f}"
              f"{row['peak_rss_mb']:>14.1f}")
    return finish(result, args.output)


if __name__ == "__main__":
    main()
