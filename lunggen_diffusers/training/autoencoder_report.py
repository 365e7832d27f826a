"""Judge an autoencoder before a latent model is trained on it: one command, one report.

    lunggen-autoencoder-report --vae lunggen-output/autoencoder --output_dir ae-report/
    lunggen-autoencoder-report --vae stabilityai/sd-vae-ft-mse --config my-run.yaml --output_dir ae-report/

The data (source, resolution, held-out split) come from `--config` (default: the training_config.json beside the
autoencoder, which `--stage autoencoder` writes). The latent scale is measured on the training split first when
the autoencoder carries Stable Diffusion's constant. Writes report.json, report.md and reconstructions.png (the last
shows held-out patients: keep it local).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..cli import UsageError, parse_args, run
from ..config import load_config
from ..data.build import build_dataset
from ..evaluation.autoencoder import judge, write_report
from ..evaluation.features import EXTRACTORS, get_extractor
from ..utils import pick_device
from .autoencoder import load_autoencoder
from .autoencoder_stage import measure_scale

SD_SCALING_FACTOR = 0.18215  # AutoencoderKL's default: a Stable Diffusion constant, not a measurement


@dataclass
class AutoencoderReportArguments:
    vae: str = field(metadata={"help": "AutoencoderKL folder or Hub id (or a pipeline's, with a vae/ subfolder)."})
    output_dir: str = field(metadata={"help": "Where report.json, report.md and reconstructions.png go."})
    config: str | None = field(default=None, metadata={
        "help": "The run's config (.json or .yaml): data source and resolution. Default: training_config.json "
                "beside the autoencoder."})
    num_images: int = field(default=256, metadata={"help": "Held-out images to reconstruct."})
    features: str | None = field(default=None, metadata={
        "help": f"Features for the Fréchet distance: one of {', '.join(EXTRACTORS)}. Default: the phantom "
                "classifier for the phantom, raddino otherwise."})
    feature_model: str | None = field(default=None, metadata={"help": "Model id or path for --features raddino."})
    device: str | None = field(default=None, metadata={"help": "cuda, mps or cpu; default: the best available."})


def report_from_args(args: AutoencoderReportArguments) -> dict:
    if args.num_images < 4:
        raise UsageError(f"--num_images {args.num_images}: judge on at least 4 held-out images")
    config_path = args.config or os.path.join(args.vae, "training_config.json")
    if not os.path.isfile(config_path):
        raise UsageError(f"--config {config_path}: no such file (give the run's config: it says which data "
                         "and resolution to judge on)")
    config = load_config(config_path)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, vae=args.vae, latent=True))
    vae = load_autoencoder(args.vae).to(pick_device(args.device)).eval()
    if vae.config.scaling_factor == SD_SCALING_FACTOR:
        dataset, _ = build_dataset(config)
        vae.register_to_config(**measure_scale(vae, dataset, config.model.latent_normalization))
    extractor = get_extractor(args.features, args.feature_model, str(vae.device)) if args.features else None
    report, grid = judge(vae, config, args.num_images, extractor)
    write_report(args.output_dir, report, grid)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    (args,) = parse_args(AutoencoderReportArguments, argv)
    report = run(lambda: report_from_args(args))
    kept = "" if "agreement" not in report else ", findings kept: " + ", ".join(
        f"{k} {v:.3f}" for k, v in report["agreement"].items())
    print(f"PSNR {report['psnr_db']:.2f} dB, SSIM {report['ssim']:.4f}, MS-SSIM {report['ms_ssim']:.4f}, FD "
          f"{report['fd_reconstructions']:.4g} (floor {report['fd_floor']:.4g}){kept}; {args.output_dir}/report.md")


if __name__ == "__main__":
    main()
