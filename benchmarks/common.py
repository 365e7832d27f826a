"""What every benchmark ends with: the table it prints, one environment line (a timing means nothing without the
machine it ran on), and its JSON with that environment inside.

    from common import finish  # beside this file
    finish(result, args.output, table)

and the phantom census the sampler and demo benchmarks share: what share of images the phantom classifier reads each
finding in, and the heart on the image's right, each with its Wilson 95% interval.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from lunggen_diffusers.data.phantom import FINDINGS  # noqa: E402
from lunggen_diffusers.evaluation.phantom_classifier import HEART_RIGHT, OUTPUTS  # noqa: E402
from lunggen_diffusers.evaluation.stats import wilson  # noqa: E402
from lunggen_diffusers.utils import write_json  # noqa: E402

LIBRARIES = ("torch", "diffusers", "accelerate", "datasets", "numpy", "pillow")


def cpu_name() -> str:
    """The CPU's model name (lscpu's), which platform.processor() leaves empty on Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """The machine and the software a measurement ran on."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return {
        "cpu": cpu_name(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "libraries": found,
    }


def environment_line(env: dict) -> str:
    where = env["gpu"] or f"{env['cpu']}, {env['cpus']} CPUs, {env['torch_threads']} torch threads"
    libraries = ", ".join(f"{k} {v}" for k, v in env["libraries"].items())
    return f"on {where}; load {env['load_average']}; python {env['python']}, {libraries}"


def finish(result: dict, path: str | Path | None, table: str | None = None) -> dict:
    """Print `table` and the environment line, and write `result` (with the environment added) as JSON to `path`
    (atomically; skipped when None)."""
    result["environment"] = environment()
    if table:
        print(table)
    print(environment_line(result["environment"]))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(path, result)
        print(f"wrote {path}")
    return result


def census(images: np.ndarray, classifier) -> dict:
    return census_of(classifier.predict(images))


def census_of(probabilities: np.ndarray) -> dict:
    """The census from the phantom classifier's outputs (one row per image)."""
    decided = probabilities >= 0.5
    n = len(probabilities)
    row = {name: {"share": float(decided[:, i].mean()), "interval": wilson(int(decided[:, i].sum()), n)}
           for i, name in enumerate(FINDINGS)}
    heart = OUTPUTS.index(HEART_RIGHT)
    row[HEART_RIGHT] = {"share": float(decided[:, heart].mean()), "interval": wilson(int(decided[:, heart].sum()), n)}
    return row
