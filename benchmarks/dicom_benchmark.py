"""DICOM decode rate: the project's reader (`dicom.read_image`: pixel data, modality LUT, VOI, MONOCHROME1, 8-bit)
against pydicom's own `pixel_array` + `apply_modality_lut` + `apply_voi_lut` on the same files, per transfer
syntax; then the whole prepare pass (decode, square, resize, PNG) over all of them with 1 and all processes.

    python benchmarks/dicom_benchmark.py --num_images 128 --size 1024
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from lunggen_diffusers.data import dicom, folders  # noqa: E402
from lunggen_diffusers.data.decode import decode_images  # noqa: E402
from lunggen_diffusers.utils import markdown_table  # noqa: E402

from common import finish  # noqa: E402  (beside this file)
from dicom_files import dataset, write  # noqa: E402  (the tests' stand-in writer)

GOAL = 0.8  # of pydicom's own rate


@dataclass
class DicomBenchmarkArguments:
    num_images: int = field(default=128, metadata={"help": "Files per transfer syntax."})
    size: int = field(default=1024, metadata={"help": "Rows and columns of each 12-bit image."})
    resolution: int = field(default=256, metadata={"help": "Prepared resolution of the prepare pass."})
    output: str = field(default="benchmarks/results/dicom_benchmark.json")


def _files(folder: Path, n: int, size: int, syntax) -> list[Path]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(n):
        body = 2500 - 1800 * ((xx - 0.5) ** 2 + (yy - 0.55) ** 2) + rng.normal(0, 30, (size, size))
        pixels = np.clip(body, 0, 4095).astype(np.uint16)
        ds = dataset(pixels, RescaleSlope=1, RescaleIntercept=0, WindowCenter=2000, WindowWidth=2500,
                     PatientID=f"B-{i}")
        paths.append(write(ds, folder / f"{i:04d}.dcm", syntax))
    return paths


def _rate(fn, paths) -> float:
    fn(paths[0])  # warm-up (plugin loading)
    start = time.perf_counter()
    for path in paths:
        fn(path)
    return len(paths) / (time.perf_counter() - start)


def _pydicom_own(path):
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    return apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)


def main(args: DicomBenchmarkArguments) -> dict:
    from pydicom.uid import JPEG2000Lossless, RLELossless

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, syntax in (("uncompressed", None), ("RLE lossless", RLELossless),
                             ("JPEG 2000 lossless", JPEG2000Lossless)):
            paths = _files(Path(tmp) / name.replace(" ", "-"), args.num_images, args.size, syntax)
            ours, theirs = _rate(dicom.read_image, paths), _rate(_pydicom_own, paths)
            rows.append({"syntax": name, "mean_file_kb": round(np.mean([p.stat().st_size for p in paths]) / 1024),
                         "ours_images_per_s": ours, "pydicom_images_per_s": theirs, "ratio": ours / theirs})
        prepare = []
        ds = folders.dicom_dataset(Path(tmp) / "uncompressed", Path(tmp) / "report")
        for procs in sorted({1, os.cpu_count() or 1}):
            start = time.perf_counter()
            decode_images(ds, args.resolution, num_proc=procs, work_dir=Path(tmp) / f"work-{procs}")
            rate = len(ds) / (time.perf_counter() - start)
            prepare.append({"num_proc": procs, "images_per_s": rate, "images_per_s_per_process": rate / procs})
    table = markdown_table(
        ["transfer syntax", "KB/file", "ours img/s", "pydicom img/s", "ratio"],
        [[r["syntax"], r["mean_file_kb"], r["ours_images_per_s"], r["pydicom_images_per_s"], r["ratio"]]
         for r in rows]) + "\n\n" + markdown_table(
        ["prepare pass (uncompressed)", "img/s", "img/s per process"],
        [[f"num_proc={p['num_proc']}", p["images_per_s"], p["images_per_s_per_process"]] for p in prepare])
    result = {"args": asdict(args), "read": rows, "prepare": prepare,
              "goal_met": all(r["ratio"] >= GOAL for r in rows)}
    return finish(result, args.output, table)


if __name__ == "__main__":
    (arguments,) = HfArgumentParser(DicomBenchmarkArguments).parse_args_into_dataclasses()
    main(arguments)
