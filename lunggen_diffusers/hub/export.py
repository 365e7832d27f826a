"""The export folder, written in one place for training and for the `hub` command:

    model_index.json, unet/, scheduler/   the pipeline (DDPMPipeline, or LungGenPipeline + lunggen_pipeline.py);
    vae/                                  safetensors, the EMA weights; a latent model's autoencoder in vae/
    autoencoder_report.json               a latent model's autoencoder report (evaluation.autoencoder)
    samples.png                           a fixed-seed grid of the default sampler
    denoising.gif / .mp4                  two images denoised step by step (x_t beside the predicted x0)
    training_progress.gif / .mp4          the preview grids in step order (the same noise at every preview)
    training_config.json                  the run's config (written by training when it starts)
    manifest.json                         provenance: config (scrubbed), seed, data summary, versions, commit
    README.md, eval_results.json          the model card and the evaluation summary it shows
    card_sections/                        kept copies of the sections other tools wrote (never uploaded)

`export_pipeline` writes all of it (and pushes when the config asks); `write_model_card` rewrites the card alone
(`python -m lunggen_diffusers.hub card`). Every text goes through the privacy check before a byte is written.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path

from ..config import Config
from ..generation.process import save_animations
from ..summaries import DataSummary, RunSummary
from ..utils import SAMPLE_GRID, atomic_write_text, synthetic_png_info
from .card import build_card, card_files, keep_sections
from .privacy import (
    AUTOENCODER_REPORT,
    MANIFEST,
    PROMPT_CONFIG,
    SAMPLES,
    check_published,
    local_paths,
    scrub_config,
)
from .push import push_to_hub

LIBRARIES = ("torch", "diffusers", "accelerate", "transformers", "datasets", "huggingface_hub", "safetensors",
             "numpy", "pillow")


def _git_commit() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():  # installed as a package: an enclosing repository is not this project's
        return None, None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # not a git checkout (a pip install), or no git
        return None, None
    return commit, bool(dirty)


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def write_manifest(output_dir, config: Config, data: DataSummary, run: RunSummary) -> dict:
    """Write `manifest.json` into `output_dir` and return it. Main process only."""
    folder = Path(output_dir)
    commit, dirty = _git_commit()
    manifest = {
        "format_version": 1,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": scrub_config(config.to_dict()),
        "seed": config.training.seed,
        "data": dataclasses.asdict(data),
        "training": {"global_step": run.global_step, "wall_time_s": round(run.wall_time_s, 1),
                     "hardware": run.hardware, "final_loss": run.final_loss},
        "libraries": _versions(),
        "git_commit": commit,
        "git_dirty": dirty,
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    check_published(text, local_paths(config.to_dict(), folder), MANIFEST)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / MANIFEST, text)
    return manifest


def write_model_card(output_dir, eval_metrics: dict | None = None, repo_id: str | None = None, eval_dir=None,
                     fidelity_dir=None, utility_dir=None, reader_study_dir=None):
    """(Re)write README.md from manifest.json, plus the evaluation's `model_card` section (`eval_metrics`, or
    `eval_dir`/metrics.json) and the `card_section.md` of `fidelity_dir` / `utility_dir` / `reader_study_dir` (the
    analysis folder) when given."""
    folder = Path(output_dir)
    card, summary, sections = build_card(folder, eval_metrics, repo_id, eval_dir, fidelity_dir, utility_dir,
                                         reader_study_dir)
    for name, text in card_files(folder, card, summary).items():
        atomic_write_text(folder / name, text)
    keep_sections(folder, sections)
    return card


def export_pipeline(output_dir, pipe, samples, config: Config, data: DataSummary, run: RunSummary,
                    autoencoder_report: dict | None = None, animations: dict | None = None,
                    prompt_config: dict | None = None) -> None:
    """The whole export folder from a built pipeline and its sample grid (a PIL image), with a latent model's
    autoencoder report, `animations` (file stem: frames, `generation.process`) and a text model's `prompt_config`
    (in `prompt_config.json` too, where a stock pipeline's model_index.json has no place for it); the push when the
    config asks for it. Main process only."""
    folder = Path(output_dir)
    pipe.save_pretrained(folder, safe_serialization=True)
    if prompt_config is not None:
        text = json.dumps(prompt_config, indent=2, sort_keys=True) + "\n"
        check_published(text, local_paths(config.to_dict(), folder), PROMPT_CONFIG)
        atomic_write_text(folder / PROMPT_CONFIG, text)
    samples.save(folder / SAMPLES, pnginfo=synthetic_png_info(SAMPLE_GRID))
    save_animations(animations or {}, folder)
    write_manifest(folder, config, data, run)
    if autoencoder_report is not None:
        text = json.dumps(autoencoder_report, indent=2, sort_keys=True) + "\n"
        check_published(text, local_paths(config.to_dict(), folder), AUTOENCODER_REPORT)
        atomic_write_text(folder / AUTOENCODER_REPORT, text)
    write_model_card(folder)
    if config.hub.push_to_hub:
        push_to_hub(folder, config.hub.hub_model_id, private=config.hub.hub_private_repo, token=config.hub.hub_token)
