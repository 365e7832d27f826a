"""What may leave the machine, in one place: config scrubbing, the upload allow-list, the leak check.

- Scrubbed: data paths (`train_data_dir`, `cache_dir`, `pseudonym_key`, a local `dataset_name`) become "<local>";
  run paths (`output_dir`, `logging_dir`, `resume_from_checkpoint`) keep their last folder name; the token never
  travels.
- Uploaded: only ALLOW_PATTERNS, minus IGNORE_PATTERNS (checkpoints, logs, evaluation pairs, pickles).
- Checked: every published text (card, manifest, config, eval summary, included card sections) is refused if it
  holds one of the run's local paths, something shaped like a patient identifier (PATIENT_ID_PATTERNS), or, for a
  run on DICOM, any identifying header value the reader saw (found through the salted digests it left beside the
  data, `phi_digests.json`; the values themselves are kept nowhere). This is the second line of defence: manifests
  and label counts carry no identifier by construction.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from huggingface_hub.utils import filter_repo_objects

from ..cli import UsageError
from ..data.folders import PHI_DIGESTS
from ..data.registry import source_report_dir
from ..generation.process import DENOISING, TRAINING_PROGRESS
from ..utils import find_secret

MANIFEST = "manifest.json"
TRAINING_CONFIG = "training_config.json"
CARD = "README.md"
EVAL_SUMMARY = "eval_results.json"  # the eval report's non-identifying `model_card` section, kept for the card
PIPELINE_CODE = "lunggen_pipeline.py"  # a conditional or latent model's pipeline class: the project's code, no data
SAMPLES = "samples.png"
# The process videos the card shows (generation.process); their MP4s stay local, for slides and talks.
DENOISING_GIF, TRAINING_PROGRESS_GIF = f"{DENOISING}.gif", f"{TRAINING_PROGRESS}.gif"
# A latent model's autoencoder report (figures only; its reconstruction grid shows held-out patients and stays local).
AUTOENCODER_REPORT = "autoencoder_report.json"
# A text model's prompt settings: guidance default, what its text was, templated example prompts (never a report).
PROMPT_CONFIG = "prompt_config.json"
ALLOW_PATTERNS = [
    "model_index.json", "scheduler/*.json", "unet/config.json", "unet/*.safetensors", "vae/config.json",
    "vae/*.safetensors", "text_encoder/config.json", "text_encoder/*.safetensors", "tokenizer/*.json",
    "tokenizer/*.txt", PIPELINE_CODE, CARD, MANIFEST, TRAINING_CONFIG, EVAL_SUMMARY, AUTOENCODER_REPORT, PROMPT_CONFIG,
    SAMPLES, "samples/*.png", DENOISING_GIF, TRAINING_PROGRESS_GIF,
]
# Belt and braces under the allow-list: what must never leave the machine even if a pattern above widens.
IGNORE_PATTERNS = ["checkpoint-*", "logs/*", "eval/*", "autoencoder/*", "cache/*", "*.bin", "*.pt", "*.pth", "*.ckpt",
                   "*.pkl", "*.pickle",
                   "*memorized_patients*", "*reidentified_patients*", "*nearest_pairs*", "*gallery.npz",
                   f"*{PHI_DIGESTS}"]
LOCAL = "<local>"
DATA_PATH_OPTIONS = ("train_data_dir", "cache_dir", "pseudonym_key")  # "<local>" (dataset_name too, when a folder)
RUN_PATH_OPTIONS = ("output_dir", "logging_dir", "resume_from_checkpoint")  # scrubbed to their folder name
PATIENT_ID_PATTERNS = {
    # NIH image names: the first 8 digits are the patient.
    "an NIH image name": re.compile(r"\b\d{8}_\d{3}(?:\.png)?\b", re.IGNORECASE),
    # The built-in phantom's patient ids (lunggen_diffusers/data/phantom.py).
    "a phantom patient id": re.compile(r"\bphantom-\d+-p?\d+\b"),
    # The DICOM reader's patient pseudonyms (lunggen_diffusers/data/dicom.py): local keys, never published either.
    "a DICOM patient pseudonym": re.compile(r"\bdicom-(?:[0-9a-f]{16}|image-\d+)\b"),
    # A value labelled as a patient id, or a table column of them (memorized_patients.csv's layout).
    "a patient id": re.compile(r"\bpatient[ _-]?id\s*[:=#]?\s*\d+|\bpatient\s*#\s*\d+|\|\s*patient[ _-]?id\s*\|",
                               re.IGNORECASE),
}


def _is_local_dataset(name: str) -> bool:
    folder = name.partition(":")[0]
    return Path(folder).exists() or os.path.isabs(folder) or folder.startswith((".", "~")) or folder.count("/") > 1


def scrub_config(flat: dict[str, Any]) -> dict[str, Any]:
    """A copy of a flat config with no local path in it (the token is never there: `Config.to_dict` drops it)."""
    clean = {k: v for k, v in flat.items() if k != "hub_token"}
    for name in DATA_PATH_OPTIONS:
        if clean.get(name):
            clean[name] = [LOCAL] * len(clean[name]) if isinstance(clean[name], list) else LOCAL
    if clean.get("dataset_name") and _is_local_dataset(clean["dataset_name"]):
        clean["dataset_name"] = LOCAL
    for name in RUN_PATH_OPTIONS:
        if clean.get(name):
            clean[name] = os.path.basename(os.path.normpath(clean[name]))
    return clean


def _folders(value) -> list[str]:
    """An option's path(s): --train_data_dir may hold several."""
    return [v for v in (value if isinstance(value, list) else [value]) if v]


class Forbidden(list):
    """What no published text may hold: the run's local path strings (the list) and the digests of the identifying
    DICOM header values of its source (`phi`, one dict per digests file found)."""

    def __init__(self, paths: list[str], phi: list[dict]):
        super().__init__(paths)
        self.phi = phi


def _phi_digests(flat: dict[str, Any]) -> list[dict]:
    """The digests a DICOM source left: in the cache beside a --train_data_dir folder, or in a prepared folder."""
    places = []
    for root in _folders(flat.get("train_data_dir")):
        places.append(source_report_dir(SimpleNamespace(cache_dir=flat.get("cache_dir")), root) / PHI_DIGESTS)
    if flat.get("dataset_name") and _is_local_dataset(flat["dataset_name"]):
        places.append(Path(flat["dataset_name"].partition(":")[0]) / PHI_DIGESTS)
    return [json.loads(p.read_text()) for p in places if p.is_file()]


def local_paths(flat: dict[str, Any], output_dir: Path, *folders: Path) -> Forbidden:
    """The run's local path strings (as written and absolute), plus `folders`', that no published text may hold,
    with the digests of its DICOM source's identifying header values."""
    values = [v for name in DATA_PATH_OPTIONS + RUN_PATH_OPTIONS for v in _folders(flat.get(name))]
    if flat.get("dataset_name") and _is_local_dataset(flat["dataset_name"]):
        values.append(flat["dataset_name"].partition(":")[0])
    paths = {str(Path(p).resolve()) for p in (output_dir, *folders)}
    for value in filter(None, values):
        paths.add(os.path.abspath(os.path.expanduser(value)))
        if os.path.basename(os.path.normpath(value)) != value:  # a bare folder name is what scrubbing keeps
            paths.add(value)
    return Forbidden(sorted(p for p in paths if len(p) > 1), _phi_digests(flat))


def check_published(text: str, paths: list[str], what: str) -> None:
    """Refuse `text` (one line naming the leak) if it holds a local path, looks like it names a patient, or holds
    an identifying DICOM header value of the source (never repeated in the message)."""
    for path in paths:
        if path in text:
            raise UsageError(f"{what} would publish the local path {path!r}; remove it (published files hold no "
                             "local paths or patient identifiers)")
    for kind, pattern in PATIENT_ID_PATTERNS.items():
        found = pattern.search(text)
        if found:
            raise UsageError(f"{what} would publish {kind} ({found.group(0).strip()!r}); remove it (published files "
                             "hold no local paths or patient identifiers)")
    for digests in getattr(paths, "phi", []):
        found = find_secret(text, digests)
        if found is not None:
            at = text.upper().index(found)
            raise UsageError(f"{what} would publish an identifying DICOM header value of the training data (at "
                             f"character {at}, {len(found)} characters); remove it")


def files_to_upload(output_dir) -> list[str]:
    """The output folder's files the push sends (relative POSIX paths): the allow-list minus the ignore list."""
    folder = Path(output_dir)
    listing = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    return list(filter_repo_objects(listing, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))
