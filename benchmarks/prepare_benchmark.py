"""Speed of the NIH prepare pass against plain PNG decoding (its practical limit).

    python benchmarks/prepare_benchmark.py --num_images 128 --resolution 256 --num_proc 1 2

Generates NIH-like 1024x1024 8-bit PNGs (phantoms with their noise, so they compress like radiographs) in the
`images_001/images/` layout with a Data_Entry CSV, then times, on the same files:
- decode: `PIL.Image.open(path).load()` in one process, nothing else (the limit a prepare pass can approach);
- prepare: `plan_nih` + `decode_splits` (decode, any mode -> L, Lanczos resize, PNG Arrow cache) with each `num_proc`.
The training loader's read speed of the result is loader_benchmark.py's.
Prints a table and writes JSON. Files are in the page cache for every timing (each measured pass follows a full
read of the files), so the figures are CPU-bound, as on a local SSD.
"""

import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from lunggen_diffusers.cli import run  # noqa: E402
from lunggen_diffusers.config import DataConfig  # noqa: E402
from lunggen_diffusers.data import nih  # noqa: E402
from lunggen_diffusers.data.phantom import render_phantom  # noqa: E402

from common import finish  # noqa: E402  (beside this file)


@dataclass
class BenchmarkArguments:
    num_images: int = field(default=128, metadata={"help": "Generated 1024x1024 PNGs."})
    resolution: int = field(default=256, metadata={"help": "Prepared resolution."})
    num_proc: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "Process counts to time."})
    distinct_phantoms: int = field(default=4, metadata={"help": "Phantoms rendered (2 s each); the rest vary them."})
    work_dir: str | None = field(default=None, metadata={"help": "Where the PNGs go (default: a temporary folder)."})
    output_json: str = field(default="benchmarks/results/prepare_benchmark.json")


def make_nih_like(root: Path, num_images: int, distinct: int, size: int = 1024) -> float:
    """NIH layout, CSV and `num_images` size x size PNGs (NIH's are 1024); returns the mean file size in KB."""
    folder = root / "images_001" / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    bases = [render_phantom(size, rng).astype(np.int16) for _ in range(min(distinct, num_images))]
    rows = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
            "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"]
    for i in range(num_images):
        name = f"{i // 3 + 1:08d}_{i % 3:03d}.png"
        # Fresh noise per file: distinct content, the same compressibility as the phantom's own noise.
        pixels = bases[i % len(bases)] + rng.integers(-2, 3, (size, size))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L").save(folder / name)
        rows.append(f"{name},No Finding,{i % 3},{i // 3 + 1},{40 + i % 40},{'MF'[i % 2]},{('PA', 'AP')[i % 5 == 0]},"
                    "1024,1024,0.143,0.143")
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(rows) + "\n")
    return float(np.mean([p.stat().st_size for p in folder.iterdir()]) / 1024)


def time_decode(paths: list[Path]) -> float:
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image.load()
    return len(paths) / (time.perf_counter() - started)


def time_prepare(root: Path, settings: DataConfig, work_dir: Path):
    started = time.perf_counter()
    _, report, _ = nih.decode_splits(nih.plan_nih(root, settings), settings, work_dir)
    return report["prepared_images"] / (time.perf_counter() - started)


def main(args: BenchmarkArguments) -> dict:
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        root = Path(tmp) / "NIH"
        print(f"generating {args.num_images} NIH-like 1024x1024 PNGs ...")
        mean_kb = make_nih_like(root, args.num_images, args.distinct_phantoms)
        paths = sorted((root / "images_001" / "images").iterdir())
        time_decode(paths)  # warm the page cache
        decode = time_decode(paths)
        rows = []
        for procs in args.num_proc:
            settings = DataConfig(resolution=args.resolution, preprocessing_num_workers=procs, test_fraction=0.2)
            time_decode(paths)
            rate = time_prepare(root, settings, Path(tmp) / f"work-{procs}")
            rows.append({"num_proc": procs, "images_per_s": rate, "images_per_s_per_process": rate / procs,
                         "fraction_of_plain_decode": rate / procs / decode})
    result = {
        "num_images": args.num_images, "resolution": args.resolution, "mean_png_kb": round(mean_kb, 1),
        "plain_decode_images_per_s": decode, "prepare": rows,
        "args": asdict(args),
    }
    print(f"\n{args.num_images} PNGs of 1024x1024 (mean {mean_kb:.0f} KB) -> {args.resolution}px, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"{'pass':<24}{'img/s':>10}{'img/s/proc':>12}{'x decode':>10}")
    print(f"{'plain PIL decode':<24}{decode:>10.1f}{decode:>12.1f}{1:>10.2f}")
    for r in rows:
        print(f"{'prepare num_proc=' + str(r['num_proc']):<24}{r['images_per_s']:>10.1f}"
              f"{r['images_per_s_per_process']:>12.1f}{r['fraction_of_plain_decode']:>10.2f}")
    return finish(result, args.output_json)


if __name__ == "__main__":
    run(lambda: main(HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()[0]))
