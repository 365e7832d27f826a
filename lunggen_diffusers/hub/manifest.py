"""`manifest.json`: what it takes to reproduce (and describe) an export, scrubbed like every published file."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path

from ..config import Config
from ..summaries import DataSummary, RunSummary
from ..utils import atomic_write_text
from .privacy import MANIFEST, check_published, local_paths, scrub_config

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
