"""Publishing: the reproducibility manifest, the model card, and the push to the Hugging Face Hub.

    python -m lunggen_diffusers.hub card lunggen-output [--eval_dir eval/]     # (re)write README.md
    python -m lunggen_diffusers.hub push lunggen-output --repo_id my-org/lunggen-256 [--private false]

The manifest and the card never hold a local path or a patient identifier: path-valued options are scrubbed to a
folder name or "<local>", and every published text is checked against the run's local paths before it is written
or sent. The push uploads an allow-list (pipeline, card, manifest, scrubbed config, sample grids, eval summary) in
one private-by-default commit; checkpoints, logs, pickles and anything from the source data stay local.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, HTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import filter_repo_objects
from transformers import HfArgumentParser

from .config import Config, DataConfig, HubConfig, ModelConfig, TrainingConfig
from .sampling import DEFAULT_STEPS
from .summaries import DataSummary, RunSummary

MANIFEST = "manifest.json"
TRAINING_CONFIG = "training_config.json"
CARD = "README.md"
EVAL_SUMMARY = "eval_results.json"  # the eval report's non-identifying `model_card` section, kept for the card
ALLOW_PATTERNS = [
    "model_index.json", "scheduler/*.json", "unet/config.json", "unet/*.safetensors",
    CARD, MANIFEST, TRAINING_CONFIG, EVAL_SUMMARY, "samples.png", "samples/*.png",
]
# Belt and braces under the allow-list: what must never leave the machine even if a pattern above widens.
IGNORE_PATTERNS = ["checkpoint-*", "logs/*", "eval/*", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle",
                   "*memorized_patients*", "*nearest_pairs*"]
LOCAL = "<local>"
DATA_PATH_OPTIONS = ("train_data_dir", "cache_dir")  # scrubbed to "<local>" (dataset_name too, when a folder)
RUN_PATH_OPTIONS = ("output_dir", "logging_dir", "resume_from_checkpoint")  # scrubbed to their folder name
LIBRARIES = ("torch", "diffusers", "accelerate", "transformers", "datasets", "huggingface_hub", "safetensors",
             "numpy", "pillow")
TAGS = ["medical-imaging", "chest-x-ray", "ddpm", "diffusers-training", "synthetic-data", "lunggen"]
LICENSE_NAME = "lunggen-research-only"
NIH = re.compile(r"\bNIH\b|ChestX-?ray-?1?4", re.IGNORECASE)
EVAL_HEADINGS = {"metrics": "Generated vs real",
                 "real_vs_real_floor": "Real-vs-real floor (what real images score against each other: read the "
                                       "metrics above against it)"}


def _is_local_dataset(name: str) -> bool:
    folder = name.partition(":")[0]
    return Path(folder).exists() or os.path.isabs(folder) or folder.startswith((".", "~")) or folder.count("/") > 1


def scrub_config(flat: dict[str, Any]) -> dict[str, Any]:
    """A copy of a flat config with no local path in it (the token is never there: `Config.to_dict` drops it)."""
    clean = {k: v for k, v in flat.items() if k != "hub_token"}
    for name in DATA_PATH_OPTIONS:
        if clean.get(name):
            clean[name] = LOCAL
    if clean.get("dataset_name") and _is_local_dataset(clean["dataset_name"]):
        clean["dataset_name"] = LOCAL
    for name in RUN_PATH_OPTIONS:
        if clean.get(name):
            clean[name] = os.path.basename(os.path.normpath(clean[name]))
    return clean


def _local_paths(flat: dict[str, Any], output_dir: Path) -> list[str]:
    """The run's local path strings (as written and absolute) that no published text may contain."""
    values = [flat.get(name) for name in DATA_PATH_OPTIONS + RUN_PATH_OPTIONS]
    if flat.get("dataset_name") and _is_local_dataset(flat["dataset_name"]):
        values.append(flat["dataset_name"].partition(":")[0])
    paths = {str(output_dir.resolve())}
    for value in filter(None, values):
        paths.add(os.path.abspath(os.path.expanduser(value)))
        if os.path.basename(os.path.normpath(value)) != value:  # a bare folder name is what scrubbing keeps
            paths.add(value)
    return sorted(p for p in paths if len(p) > 1)


def _check_no_local_paths(text: str, paths: list[str], what: str) -> None:
    for path in paths:
        if path in text:
            raise ValueError(f"{what} would publish the local path {path!r}; remove it (published files hold no "
                             "local paths or patient identifiers)")


def _git_commit() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parents[1]
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
    """Write `manifest.json`: what it takes to reproduce (and describe) this export. Main process only."""
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
    _check_no_local_paths(text, _local_paths(config.to_dict(), folder), MANIFEST)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(text)
    return manifest


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no {path.name} ({what})")
    return json.loads(path.read_text())


def _eval_summary(folder: Path, eval_metrics: dict | None) -> dict | None:
    """The `model_card` section of the evaluation report: given, else eval/metrics.json, else the kept copy."""
    if eval_metrics is None:
        for candidate in (folder / "eval" / "metrics.json", folder / EVAL_SUMMARY):
            if candidate.is_file():
                eval_metrics = json.loads(candidate.read_text())
                break
        else:
            return None
    if not isinstance(eval_metrics.get("model_card"), dict):
        raise ValueError("evaluation metrics have no `model_card` section (write them with "
                         "`python -m lunggen_diffusers.evaluate`)")
    return eval_metrics["model_card"]


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_fmt, value)) or "[]"
    return "none" if value is None else str(value).replace("|", "\\|")


def _table(rows: dict[str, Any], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(v)} |" for k, v in rows.items()]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _hyperparameters(cfg: dict[str, Any]) -> str:
    sections, seen = [], {"preset"}
    for title, part in (("Data", DataConfig), ("Model", ModelConfig), ("Training", TrainingConfig),
                        ("Hub", HubConfig)):
        names = [f.name for f in dataclasses.fields(part) if f.name in cfg]
        seen.update(names)
        sections.append(f"**{title}**\n\n" + _table({n: cfg[n] for n in names}, ("option", "value")))
    other = {k: v for k, v in cfg.items() if k not in seen}
    if other:  # options of a newer or older config version
        sections.append("**Other**\n\n" + _table(other, ("option", "value")))
    return f"Preset `{cfg.get('preset')}`, then these values (the full saved config):\n\n" + "\n\n".join(sections)


def _data_section(manifest: dict, cfg: dict, nih: bool) -> str:
    data = manifest["data"]
    lines = [f"- Source: {data['source']}.", f"- Split: `{data['split']}`, {data['num_images']:,} images."]
    if data.get("per_split_counts"):
        counts = ", ".join(f"{k}: {_fmt(v)}" for k, v in data["per_split_counts"].items())
        patient_wise = " (patient-wise: no patient is in two splits)" if nih else ""
        lines.append(f"- Counts per split: {counts}{patient_wise}.")
    if nih:
        filters = {k: cfg.get(k) for k in ("view_position", "include_findings", "exclude_findings",
                                           "max_images_per_patient", "min_age", "max_age")}
        active = [f"`{k}` = {_fmt(v)}" for k, v in filters.items() if v not in (None, "all")]
        lines.append(f"- Filters: {', '.join(active) or 'none (all views, findings and ages)'}.")
    if cfg.get("max_train_samples"):
        lines.append(f"- Truncated to the first {cfg['max_train_samples']:,} images (`max_train_samples`).")
    res = cfg.get("resolution")
    square = "centre-cropped" if cfg.get("center_crop") else "padded"
    lines.append(f"- Preprocessing: every image converted to 8-bit grayscale, {square} to a square, resized with "
                 f"antialiasing to {res}x{res}, scaled to [-1, 1]. Never flipped horizontally (chest anatomy is "
                 "not left-right symmetric).")
    if cfg.get("augment"):
        lines.append(f"- Augmentation: rotation up to {cfg['augment_rotation']} degrees, zoom up to "
                     f"{cfg['augment_scale']:.0%}, brightness/contrast up to {cfg['augment_intensity']:.0%}.")
    listing = data["image_list_sha256"]
    listing = f"SHA-256 of the split's image list `{listing}` (to check a rebuilt split is the same one)" if listing \
        else "no image list hash (the source has no image identifiers)"
    lines.append(f"- Dataset fingerprint `{data['fingerprint']}`; {listing}.")
    return "\n".join(lines)


def _procedure_section(manifest: dict, cfg: dict) -> str:
    t, libs = manifest["training"], manifest["libraries"]
    commit = manifest.get("git_commit")
    code = (f"`{commit}`" + (" (with uncommitted changes)" if manifest.get("git_dirty") else "")) if commit \
        else "not recorded (not run from a git checkout)"
    lines = [
        f"- Optimizer steps: {t['global_step']:,}; wall time {_duration(t['wall_time_s'])} on {t['hardware']}.",
        f"- Seed: {manifest['seed']}; mixed precision: `{cfg.get('mixed_precision')}`; "
        f"EMA weights exported: {'yes' if cfg.get('use_ema') else 'no'}.",
    ]
    if t.get("final_loss") is not None:
        lines.append(f"- Final training loss: {t['final_loss']:.4g}.")
    lines += [f"- LungGen-Diffusers commit: {code}.",
              "- Libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items()) + ".",
              "", _hyperparameters(cfg)]
    return "\n".join(lines)


def _eval_section(summary: dict | None) -> str:
    no_audit = "### Memorization audit\n\nNo memorization audit was run for this export."
    if summary is None:
        return ("No evaluation was run for this export: no image-quality metrics are reported. Evaluate before "
                "relying on the samples (`python -m lunggen_diffusers.evaluate`).\n\n" + no_audit)
    settings = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    parts = [_table(settings, ("setting", "value"))] if settings else []
    for key, value in summary.items():
        if isinstance(value, dict) and key != "memorization":
            parts.append(f"### {EVAL_HEADINGS.get(key, key)}\n\n" + _table(_flatten(value), ("metric", "value")))
    if summary.get("memorization"):
        parts.append("### Memorization audit\n\nHow close generated images come to their nearest training image, "
                     "against held-out real images as the null (summary numbers only: no training image or patient "
                     "identifier is published):\n\n" + _table(_flatten(summary["memorization"]), ("measure", "value")))
    else:
        parts.append(no_audit)
    return "\n\n".join(parts)


def _limitations(source: str, nih: bool, phantom: bool) -> str:
    common = ("- The model can reproduce near-copies of training images; read the memorization audit (or run one) "
              "before sharing generated images.\n- Generated images can hold anatomically implausible details and "
              "carry no diagnosis: they are not labelled and must not be read as findings.\n"
              "- Not validated by radiologists for this release.")
    if phantom:
        return ("- Trained on a procedural chest phantom, not on patient images: a demonstration of the pipeline. "
                "Its samples are not realistic radiographs.\n" + common)
    if nih:
        population = (
            "- Population of the source: NIH ChestX-ray14 holds 112,120 frontal images of 30,805 patients from one "
            "US hospital (the NIH Clinical Center). Across all images: 60% PA and 40% AP views (AP views come from "
            "sicker, often bedridden patients), 56% from male patients, median age 49 (0 to 95), 54% labelled "
            "\"No Finding\". Groups rare in that population are rare in the samples.\n"
            "- Labels were text-mined from radiology reports (expected accuracy above 90%, not verified image by "
            "image), so the findings the model learned are noisily defined; devices, tubes and text markers in "
            "the source images can appear in samples.\n")
    else:
        population = (f"- The population, views and findings are those of the training source ({source}), which "
                      "this card cannot describe: check that source's documentation.\n")
    return population + common


def _citations(nih: bool) -> str:
    text = (
        "```bibtex\n"
        "@misc{lunggen2026,\n"
        "  title  = {LungGen: Synthetic Chest X-Ray Generation via Denoising Diffusion Probabilistic Models},\n"
        "  author = {Varun P and Pratham Vinayak Raykar and Mervin Sumith Sequeira and Suhan N and "
        "Sharathchandra N R},\n"
        "  year   = {2026},\n  publisher = {Zenodo},\n  doi    = {10.5281/zenodo.18454685},\n"
        "  url    = {https://zenodo.org/records/18454685}\n}\n\n"
        "@inproceedings{ho2020ddpm,\n"
        "  title     = {Denoising Diffusion Probabilistic Models},\n"
        "  author    = {Jonathan Ho and Ajay Jain and Pieter Abbeel},\n"
        "  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},\n"
        "  year      = {2020},\n  eprint    = {2006.11239},\n  archivePrefix = {arXiv}\n}\n"
    )
    if nih:
        text += (
            "\n@inproceedings{wang2017chestxray8,\n"
            "  title     = {ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on Weakly-Supervised "
            "Classification and Localization of Common Thorax Diseases},\n"
            "  author    = {Xiaosong Wang and Yifan Peng and Le Lu and Zhiyong Lu and Mohammadhadi Bagheri and "
            "Ronald M. Summers},\n"
            "  booktitle = {IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},\n"
            "  pages     = {3462--3471},\n  year      = {2017}\n}\n"
        )
    text += "```"
    if nih:
        text += ("\n\n**Acknowledgement.** The training images are from the NIH ChestX-ray14 dataset; the NIH "
                 "Clinical Center is the data provider (https://nihcc.app.box.com/v/ChestXray-NIHCC).")
    return text


def _data_terms(nih: bool) -> str:
    if nih:
        return ("The training data keeps its own terms: NIH ChestX-ray14 asks users to link its download site, "
                "cite the CVPR 2017 paper and acknowledge the NIH Clinical Center as the data provider.")
    return "The training data keeps its own terms."


def _usage(model_id: str, steps: int) -> str:
    # DDIM is the project's default fast sampler (benchmarks/sampler_benchmark.py); it keeps the model's x0 clipping.
    fast = min(DEFAULT_STEPS, max(1, steps // 2))
    return f"""```python
import torch
from diffusers import DDIMScheduler, DDPMPipeline

pipe = DDPMPipeline.from_pretrained("{model_id}")
# The sampler it was trained for: {steps} DDPM steps.
images = pipe(batch_size=4, num_inference_steps={steps}, generator=torch.manual_seed(0)).images
# About 50x faster, DDIM with {fast} steps: smoother, less varied images than DDPM's. Use DDPM to evaluate.
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
images = pipe(batch_size=4, num_inference_steps={fast}, generator=torch.manual_seed(0)).images
images[0].save("synthetic_cxr.png")  # 8-bit grayscale PNG
```

With LungGen-Diffusers, `python pipeline.py --model {model_id} --num_images 100 --output_dir synth/` writes
reproducible PNGs (8- or 16-bit, marked as synthetic in their text chunks) and a `manifest.csv`."""


def _build_card(folder: Path, eval_metrics: dict | None = None, repo_id: str | None = None
                ) -> tuple[ModelCard, dict | None]:
    manifest = _read_json(folder / MANIFEST, "written at export by the training loop")
    unet = _read_json(folder / "unet" / "config.json", "not a DDPMPipeline export")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json", "not a DDPMPipeline export")
    cfg, summary = manifest["config"], _eval_summary(folder, eval_metrics)
    source = manifest["data"]["source"]
    nih = bool(NIH.search(source))
    phantom = "phantom" in source.lower() and not nih
    model_id = repo_id or cfg.get("hub_model_id") or cfg.get("output_dir") or folder.name
    res, channels = unet["sample_size"], unet["in_channels"]
    steps = scheduler["num_train_timesteps"]

    hub_dataset = cfg.get("dataset_name") if cfg.get("dataset_name") not in (None, LOCAL) else None
    eval_results = None
    if summary and summary.get("metrics"):
        reference = str(summary.get("reference", "held-out real images"))
        eval_results = [
            EvalResult(task_type="unconditional-image-generation", dataset_type=hub_dataset or
                       ("nih-chest-xray14" if nih else "lunggen-phantom" if phantom else "image-folder"),
                       dataset_name=reference, metric_type=name, metric_name=name, metric_value=value)
            for name, value in _flatten(summary["metrics"]).items() if isinstance(value, (int, float))
        ] or None
    data = ModelCardData(
        license="other", license_name=LICENSE_NAME, pipeline_tag="unconditional-image-generation",
        datasets=[hub_dataset.partition(":")[0]] if hub_dataset else None,
        model_name=model_id.split("/")[-1] if eval_results else None, eval_results=eval_results,
    )
    samples = "![samples](samples.png)\n\n*Samples from the exported weights, generated at export.*\n\n" \
        if (folder / "samples.png").is_file() else ""
    body = f"""
# {model_id.split("/")[-1]}: synthetic chest X-rays ({res}x{res})

An unconditional denoising diffusion probabilistic model (DDPM) that generates **synthetic** frontal chest
X-rays, trained with LungGen-Diffusers (Hugging Face Diffusers) following the LungGen study. Every image it makes
is synthetic: it depicts no real patient.

> **Research use only. Not for clinical use or diagnosis.**

{samples}## What it generates

- {res}x{res} pixels, {channels} channel (grayscale); the pipeline returns values in [0, 1] as 8-bit PIL
  images (mode `L`).
- Unconditional: findings, views or demographics cannot be requested.
- Noise schedule: {steps}-step DDPM, `{scheduler.get("beta_schedule")}` betas, `{scheduler.get("prediction_type")}`
  prediction.

## How to use

{_usage(model_id, steps)}

## Training data

{_data_section(manifest, cfg, nih)}

No patient identifier and no local file path is stored in this card, the manifest or the config.

## Training procedure

{_procedure_section(manifest, cfg)}

`manifest.json` beside this card records the same in machine-readable form (config, seed, versions, commit,
dataset fingerprint, counts, wall time).

## Evaluation

{_eval_section(summary)}

## Intended use

Research use only: methods research on generative models of chest radiographs, synthetic-data experiments and
teaching. Not for clinical use or diagnosis, not for building or validating clinical tools without independent
validation on real data, and not to be presented as real patient images.

## Limitations and biases

{_limitations(source, nih, phantom)}

## License

`other` (`{LICENSE_NAME}`): the weights may be used, shared and adapted for research and education with
attribution (cite below); no clinical or diagnostic use. {_data_terms(nih)}

## Citation

{_citations(nih)}
"""
    card = populate_model_card(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"), tags=TAGS)
    return card, summary


def _raw_config(folder: Path) -> dict:
    path = folder / TRAINING_CONFIG
    return json.loads(path.read_text()) if path.is_file() else {}


def _card_files(folder: Path, card: ModelCard, summary: dict | None) -> dict[str, str]:
    files = {CARD: str(card)}
    if summary is not None:
        files[EVAL_SUMMARY] = json.dumps({"model_card": summary}, indent=2, sort_keys=True) + "\n"
    paths = _local_paths(_raw_config(folder), folder)
    for name, text in files.items():
        _check_no_local_paths(text, paths, name)
    return files


def write_model_card(output_dir, eval_metrics: dict | None = None, repo_id: str | None = None) -> ModelCard:
    """(Re)write README.md from manifest.json (+ the evaluation's `model_card` section when there is one)."""
    folder = Path(output_dir)
    card, summary = _build_card(folder, eval_metrics, repo_id)
    for name, text in _card_files(folder, card, summary).items():
        (folder / name).write_text(text)
    return card


def files_to_upload(output_dir) -> list[str]:
    """The output folder's files the push sends (relative POSIX paths): the allow-list minus the ignore list."""
    folder = Path(output_dir)
    listing = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    return list(filter_repo_objects(listing, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))


def _hub_error(err: Exception, repo_id: str, folder: Path) -> RuntimeError:
    kept = f"nothing was uploaded and {folder.name}/ is unchanged"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, OfflineModeIsEnabled):
        why = "offline mode is on (HF_HUB_OFFLINE=1); unset it to push"
    elif isinstance(err, LocalTokenNotFoundError) or status == 401:
        why = "not logged in or the token is invalid: run `hf auth login`, set HF_TOKEN or pass --token"
    elif status == 403:
        why = f"the token may not write to {repo_id!r}: use a token with write access to that namespace"
    elif isinstance(err, HfHubHTTPError):
        why = f"the Hub answered HTTP {status}"
    else:
        why = f"the Hub is unreachable ({type(err).__name__})"
    return RuntimeError(f"cannot push to {repo_id}: {why}; {kept}")


def push_to_hub(output_dir, repo_id: str, private: bool = True, token: str | None = None,
                commit_message: str = "Upload LungGen DDPM pipeline, model card and manifest") -> str:
    """Create the repo (private unless told otherwise) and upload the allow-listed files in one commit.

    The card is rebuilt for `repo_id` and the config is sent scrubbed, both from memory; README.md is written
    locally only after the upload succeeded, so a failed push leaves the output folder as it was."""
    folder = Path(output_dir)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder}: no model_index.json; give a folder exported by training")
    card, summary = _build_card(folder, None, repo_id)
    generated = _card_files(folder, card, summary)
    raw = _raw_config(folder)
    if raw:
        generated[TRAINING_CONFIG] = json.dumps(scrub_config(raw), indent=2, sort_keys=True) + "\n"
    paths = _local_paths(raw, folder)
    _check_no_local_paths((folder / MANIFEST).read_text(), paths, MANIFEST)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
                  for name in files_to_upload(folder) if name not in generated]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=text.encode())
                   for name, text in generated.items()]
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_commit(repo_id, operations, commit_message=commit_message)
    except (OSError, HTTPError) as err:  # OfflineModeIsEnabled, HfHubHTTPError and no-token are OSErrors
        raise _hub_error(err, repo_id, folder) from None
    for name in (CARD, EVAL_SUMMARY):
        if name in generated:
            (folder / name).write_text(generated[name])
    return str(url)


@dataclass
class PushArguments:
    repo_id: str = field(metadata={"aliases": ["--hub_model_id"], "help": "Hub repo, e.g. my-org/lunggen-256."})
    private: bool = field(default=True, metadata={"aliases": ["--hub_private_repo"],
                                                  "help": "Create the repo private (default); false: public."})
    token: str | None = field(default=None, metadata={"aliases": ["--hub_token"],
                                                      "help": "Else HF_TOKEN or the cached login."})
    commit_message: str = field(default="Upload LungGen DDPM pipeline, model card and manifest")


@dataclass
class CardArguments:
    eval_dir: str | None = field(default=None, metadata={"help": "Evaluation folder holding metrics.json."})
    repo_id: str | None = field(default=None, metadata={"help": "Hub id to show in the usage snippet."})


COMMANDS = {"push": PushArguments, "card": CardArguments}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m lunggen_diffusers.hub {push,card} OUTPUT_DIR [options] (--help for options)",
              file=sys.stderr)
        return 2
    parser = HfArgumentParser(COMMANDS[argv[0]], prog=f"python -m lunggen_diffusers.hub {argv[0]}")
    parser.add_argument("output_dir", help="The exported training output folder.")
    args, extra = parser.parse_args_into_dataclasses(args=argv[1:])
    try:
        if isinstance(args, PushArguments):
            url = push_to_hub(extra.output_dir, args.repo_id, args.private, args.token, args.commit_message)
            print(f"pushed {extra.output_dir} to {url} ({'private' if args.private else 'public'})")
        else:
            metrics = _read_json(Path(args.eval_dir) / "metrics.json", "written by evaluation") \
                if args.eval_dir else None
            write_model_card(extra.output_dir, metrics, args.repo_id)
            print(f"wrote {Path(extra.output_dir) / CARD}")
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
