"""Wall time of PRDC (precision, recall, density, coverage) on realistic set sizes, CPU or GPU.

    python benchmarks/prdc_benchmark.py                              # 10,000 x 10,000, 768-d and 64-d
    python benchmarks/prdc_benchmark.py --num_real 2000 --num_fake 2000 --dims 768

Two cases per width: independent Gaussian draws (the usual case) and fake = real (every k-th neighbour is a tie,
the case rounding used to break). Timing does not depend on the data beyond that, so inputs are random.
Prints a table and writes JSON.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from lunggen_diffusers.evaluation.metrics import prdc  # noqa: E402

from common import finish  # noqa: E402  (beside this file)


@dataclass
class BenchmarkArguments:
    num_real: int = field(default=10000, metadata={"help": "Real rows."})
    num_fake: int = field(default=10000, metadata={"help": "Generated rows."})
    dims: list[int] = field(default_factory=lambda: [768, 64], metadata={"help": "Feature widths (768: RAD-DINO; "
                                                                               "64: 8x8 pixel features)."})
    k: int = field(default=5, metadata={"help": "Neighbours."})
    output: str = field(default="benchmarks/results/prdc.json", metadata={"help": "JSON written here."})


def main() -> dict:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    rows = []
    for dim in args.dims:
        rng = np.random.default_rng(0)
        real = rng.standard_normal((args.num_real, dim), dtype=np.float32)
        fake = rng.standard_normal((args.num_fake, dim), dtype=np.float32)
        for case, other in (("independent", fake), ("identical", real)):
            start = time.perf_counter()
            scores = prdc(real, other, k=args.k)
            rows.append({"dim": dim, "case": case, "seconds": round(time.perf_counter() - start, 2),
                         **{name: round(value, 4) for name, value in scores.items()}})
    result = {"args": asdict(args), "rows": rows}
    print(f"{args.num_fake} fake x {args.num_real} real, k={args.k}, {torch.get_num_threads()} threads")
    print(f"{'dim':>5} {'case':<12}{'seconds':>9}{'precision':>11}{'recall':>8}{'density':>9}{'coverage':>10}")
    for r in rows:
        print(f"{r['dim']:>5} {r['case']:<12}{r['seconds']:>9.2f}{r['precision']:>11.4f}{r['recall']:>8.4f}"
              f"{r['density']:>9.4f}{r['coverage']:>10.4f}")
    return finish(result, args.output)


if __name__ == "__main__":
    main()
