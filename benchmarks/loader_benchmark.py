"""Images per second of the training data loader (PNG bytes -> uint8 batches) with 0, 2 and 8 DataLoader workers.

    python benchmarks/loader_benchmark.py --num_images 320 --resolution 256 --num_workers 0 2 8

Generates NIH-like PNGs (as prepare_benchmark.py does; `--source_size`, 1024 as NIH's by default), prepares them at
`--resolution` with `plan_nih` + `decode_splits`, then iterates the training loader itself (`loop.build_dataloader`:
shuffled, whole batches decoded from the Arrow bytes in the workers) for at least `--at_least` images per worker count,
after one untimed epoch that starts the workers. For reference, the same pixels stored as uint8 (the format before PNGs)
read with one Arrow take per batch. Prints a table and writes JSON.
"""

import os
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from prepare_benchmark import make_nih_like  # noqa: E402

from lunggen_diffusers.cli import run  # noqa: E402
from lunggen_diffusers.config import DataConfig, from_dict  # noqa: E402
from lunggen_diffusers.data import nih  # noqa: E402
from lunggen_diffusers.data.decode import stored_pixels  # noqa: E402
from lunggen_diffusers.training.loop import build_dataloader  # noqa: E402

from common import finish  # noqa: E402  (beside this file)


@dataclass
class BenchmarkArguments:
    num_images: int = field(default=320, metadata={"help": "Generated NIH-like PNGs."})
    source_size: int = field(default=1024, metadata={"help": "Their side (NIH's: 1024; smaller generates faster)."})
    resolution: int = field(default=256, metadata={"help": "Prepared (and loaded) resolution."})
    num_workers: list[int] = field(default_factory=lambda: [0, 2, 8], metadata={"help": "Worker counts to time."})
    batch_size: int = field(default=32, metadata={"help": "Images per batch."})
    at_least: int = field(default=2048, metadata={"help": "Images timed per worker count."})
    distinct_phantoms: int = field(default=4, metadata={"help": "Phantoms rendered (2 s each); the rest vary them."})
    work_dir: str | None = field(default=None, metadata={"help": "Where the PNGs go (default: a temporary folder)."})
    output_json: str = field(default="benchmarks/results/loader_benchmark.json")


def time_loader(loader, at_least: int) -> float:
    for _ in loader:  # one epoch: workers start, files come into the page cache
        pass
    started, seen = time.perf_counter(), 0
    while seen < at_least:
        for batch in loader:
            seen += batch["pixel_values"].shape[0]
    return seen / (time.perf_counter() - started)


def time_uint8_take(ds: datasets.Dataset, batch_size: int, at_least: int) -> float:
    """The format before PNGs: one Arrow take of uint8 `pixel_values` per shuffled batch, in the main process."""
    table = ds.with_format("arrow", columns=["pixel_values"])
    started, seen = time.perf_counter(), 0
    while seen < at_least:
        order = np.random.default_rng(seen).permutation(len(ds))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            pixels = table[order[start : start + batch_size]]["pixel_values"].combine_chunks()
            seen += len(torch.from_numpy(np.array(pixels.to_numpy(zero_copy_only=False), dtype=np.uint8)))
    return seen / (time.perf_counter() - started)


def main(args: BenchmarkArguments) -> dict:
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        root = Path(tmp) / "NIH"
        print(f"generating {args.num_images} NIH-like {args.source_size}px PNGs ...")
        make_nih_like(root, args.num_images, args.distinct_phantoms, args.source_size)
        settings = DataConfig(resolution=args.resolution, preprocessing_num_workers=os.cpu_count(),
                              validation_fraction=0.0, test_fraction=0.0)
        dsdict, _, _ = nih.decode_splits(nih.plan_nih(root, settings), settings, Path(tmp) / "work")
        ds = dsdict["train"]
        cells = ds.with_format("arrow")["image"]
        png_kb = float(np.mean([len(b) for b in cells.combine_chunks().field("bytes").to_pylist()]))
        rows = []
        for workers in args.num_workers:
            config = from_dict({"resolution": args.resolution, "train_batch_size": args.batch_size,
                                "dataloader_num_workers": workers})
            accelerator = types.SimpleNamespace(num_processes=1, device=torch.device("cpu"))
            rate = time_loader(build_dataloader(ds, None, config, accelerator), args.at_least)
            rows.append({"num_workers": workers, "images_per_s": rate})
            print(f"  {workers} workers: {rate:,.0f} img/s")
        pixels = stored_pixels(cells)
        features = datasets.Features({"pixel_values": datasets.Array2D(pixels.shape[1:], "uint8")})
        uint8 = datasets.Dataset.from_dict({"pixel_values": list(pixels)}, features=features)
        reference = time_uint8_take(uint8, args.batch_size, args.at_least)
    result = {
        "num_images": len(ds), "resolution": args.resolution, "batch_size": args.batch_size,
        "mean_png_kb": round(png_kb / 1024, 1), "loader": rows, "uint8_take_images_per_s": reference,
        "args": asdict(args),
    }
    print(f"\n{len(ds)} images at {args.resolution}px (PNG mean {png_kb / 1024:.1f} KB), batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"{'loader':<34}{'img/s':>10}")
    for r in rows:
        print(f"{'PNG -> uint8, ' + str(r['num_workers']) + ' workers':<34}{r['images_per_s']:>10,.0f}")
    print(f"{'uint8 Arrow take (before), main':<34}{reference:>10,.0f}")
    finish(result, args.output_json)
    return result


if __name__ == "__main__":
    run(lambda: main(HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()[0]))
