"""What recording the denoising process costs: `pipeline.py`'s sampling loop (`iter_batches`) with and without a
`DenoisingRecorder` on the first batch, the recording's GIF and MP4 writing included.

    python benchmarks/process_recording.py                                # 64 images, 25 steps, 64 and 256 px
    python benchmarks/process_recording.py --preset demo-latent --resolutions 128

Run as `pipeline.py` runs on a CPU (freed memory kept in the process). The UNet is the preset's, freshly
initialised at each resolution (weights do not change the work). The cheapest UNet is the strictest test:
recording's work (moving 2 x `--save_process` images to numpy per step, captioning, encoding) does not grow with
the model, so a larger model makes its share smaller. The two runs alternate, `--repeats` times each; the table
shows the median.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDPMPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from lunggen_diffusers.config import from_dict  # noqa: E402
from lunggen_diffusers.generation.process import DenoisingRecorder  # noqa: E402
from lunggen_diffusers.generation.sampling import DEFAULT_SCHEDULER, iter_batches  # noqa: E402
from lunggen_diffusers.lunggen_pipeline import LungGenPipeline, latent_shape  # noqa: E402
from lunggen_diffusers.runtime import keep_freed_memory  # noqa: E402
from lunggen_diffusers.training.autoencoder import build_autoencoder  # noqa: E402
from lunggen_diffusers.training.model import build_scheduler, build_unet  # noqa: E402
from lunggen_diffusers.utils import markdown_table  # noqa: E402

from common import finish  # noqa: E402  (beside this file)


def build(preset: str, resolution: int):
    """The preset's pipeline at `resolution`, randomly initialised (a latent preset with its autoencoder)."""
    config = from_dict({"preset": preset, "resolution": resolution})
    torch.manual_seed(0)
    if not config.model.latent:
        return DDPMPipeline(unet=build_unet(config).eval(), scheduler=build_scheduler(config))
    vae = build_autoencoder(config).eval()
    unet = build_unet(config, latent=latent_shape(vae, resolution)).eval()
    return LungGenPipeline(unet=unet, scheduler=build_scheduler(config), vae=vae)


def sample(pipe, args, recorder, folder) -> float:
    start = time.perf_counter()
    for _ in iter_batches(pipe, range(args.num_images), 0, DEFAULT_SCHEDULER, args.steps, args.batch_size,
                          progress=False, recorder=recorder):
        pass
    if recorder is not None:
        recorder.save(Path(folder) / "denoising")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)  # pipeline.py's default
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--save_process", type=int, default=4, help="images recorded (of the first batch)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/process_recording.json")
    args = parser.parse_args()
    keep_freed_memory()  # as pipeline.py does on a CPU
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for resolution in args.resolutions:
            pipe = build(args.preset, resolution)
            sample(pipe, argparse.Namespace(**{**vars(args), "num_images": args.batch_size}), None, folder)  # warm-up
            plain, recorded = [], []
            for _ in range(args.repeats):
                plain.append(sample(pipe, args, None, folder))
                recorded.append(sample(pipe, args, DenoisingRecorder(args.save_process), folder))
            plain_s, recorded_s = sorted(plain)[len(plain) // 2], sorted(recorded)[len(recorded) // 2]
            files = {p.suffix: p.stat().st_size for p in Path(folder).glob("denoising.*")}
            rows.append({"resolution": resolution, "plain_s": round(plain_s, 2), "recorded_s": round(recorded_s, 2),
                         "overhead": round(recorded_s / plain_s - 1, 4), "plain_all": plain, "recorded_all": recorded,
                         "gif_bytes": files.get(".gif"), "mp4_bytes": files.get(".mp4")})
            print(rows[-1], flush=True)
    table = markdown_table(
        ["px", f"{args.num_images} images, {args.steps} steps", f"recording {args.save_process}", "overhead",
         "GIF", "MP4"],
        [[r["resolution"], f"{r['plain_s']:.2f} s", f"{r['recorded_s']:.2f} s", f"{100 * r['overhead']:+.1f}%",
          f"{(r['gif_bytes'] or 0) / 1e6:.2f} MB", f"{(r['mp4_bytes'] or 0) / 1e6:.2f} MB" if r["mp4_bytes"] else
          "(no PyAV)"] for r in rows])
    finish({"args": vars(args), "rows": rows}, args.output, table)


if __name__ == "__main__":
    main()
