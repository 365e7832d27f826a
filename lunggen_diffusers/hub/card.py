"""The model card: facts gathered from an export folder, worded by the Jinja template `model_card.md` beside this
file and rendered with `huggingface_hub.ModelCard.from_template`.

Python collects (manifest, pipeline configs, evaluation summary, other tools' sections) and checks; the template
says everything. Every text the card publishes passes `privacy.check_published` before a byte is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..cli import UsageError
from ..data.conditioning import prevalence
from ..generation.sampling import DEFAULT_SCHEDULER, DEFAULT_STEPS, scheduler_code
from ..lunggen_pipeline import (
    DEFAULT_GUIDANCE_SCALE,
    LabelSpace,
    describe_standardisation,
    normalize,
)
from ..utils import atomic_write_text
from ..vocabulary import SUBGROUPS
from .privacy import (
    AUTOENCODER_REPORT,
    CARD,
    DENOISING_GIF,
    EVAL_SUMMARY,
    LOCAL,
    MANIFEST,
    PIPELINE_CODE,
    PROMPT_CONFIG,
    SAMPLES,
    TRAINING_CONFIG,
    TRAINING_PROGRESS_GIF,
    check_published,
    local_paths,
)

TEMPLATE = Path(__file__).with_name("model_card.md")
SECTION_FILE = "card_section.md"
# Sections other tools write, in the order the card shows them (after the evaluation), with the tool that writes each.
SECTIONS = {"fidelity": "benchmarks/fidelity_benchmark.py --output_dir DIR",
            "utility": "python -m lunggen_diffusers.utility --output_dir DIR",
            "reader_study": "lunggen-reader-study analyze STUDY --output_dir DIR"}
KEPT_SECTIONS = "card_sections"  # local copies (never uploaded), so a later push or card keeps the sections
TAGS = ["medical-imaging", "chest-x-ray", "ddpm", "diffusers-training", "synthetic-data", "lunggen"]
# The Hub has no task for label-conditioned image generation: such models keep the unconditional-image-generation
# pipeline_tag (text-to-image would promise a prompt) and say the rest in tags; custom_code marks trust_remote_code.
CONDITIONAL_TAGS = ["class-conditional", "classifier-free-guidance", "custom_code"]
TEXT_TAGS = ["text-to-image", "report-to-image", "classifier-free-guidance", "custom_code"]
LATENT_TAGS = ["latent-diffusion", "custom_code"]
LICENSE_NAME = "lunggen-research-only"
NIH = re.compile(r"\bNIH\b|ChestX-?ray-?1?4", re.IGNORECASE)


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UsageError(f"{path.parent}: no {path.name} ({what})")
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
        raise UsageError("evaluation metrics have no `model_card` section (write them with "
                         "`python -m lunggen_diffusers.evaluate`)")
    return eval_metrics["model_card"]


def _sections(folder: Path, dirs: dict[str, str | None], paths: list[str]) -> dict[str, str]:
    """Each given DIR's card_section.md, else the kept copy, verbatim, after the privacy check."""
    found = {}
    for name, producer in SECTIONS.items():
        path = Path(dirs[name]) / SECTION_FILE if dirs.get(name) else folder / KEPT_SECTIONS / f"{name}.md"
        if dirs.get(name) and not path.is_file():
            raise UsageError(f"--{name}_dir {dirs[name]}: no {SECTION_FILE} in it (written by {producer})")
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8").strip()
        where = f"{path.parent.name}/{path.name}"
        if not text.startswith("## "):
            raise UsageError(f"{where} must start with a '## ' heading, got {text.partition(chr(10))[0][:60]!r}")
        check_published(text, paths, where)
        found[name] = text
    return found


def keep_sections(folder: Path, sections: dict[str, str]) -> None:
    for name, text in sections.items():
        (folder / KEPT_SECTIONS).mkdir(exist_ok=True)
        atomic_write_text(folder / KEPT_SECTIONS / f"{name}.md", text + "\n")


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


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _label_config(folder: Path) -> dict | None:
    """A conditional model's stored labels (its folder ships the pipeline code); None for a plain DDPMPipeline or
    an unconditional latent model."""
    if not (folder / PIPELINE_CODE).is_file():
        return None
    index = read_json(folder / "model_index.json", "not a pipeline export")
    labels = index.get("label_config")
    if not labels and not index.get("prompt_config") and not (folder / "vae").is_dir():
        raise UsageError(f"{folder}: has {PIPELINE_CODE} but model_index.json has no label_config; re-export the "
                         "conditional model with training, or remove the file for an unconditional one")
    return labels


def _text(folder: Path) -> dict | None:
    """A text model's prompt settings and encoder, for the card (its examples are templated, never a report)."""
    index = read_json(folder / "model_index.json", "not a pipeline export")
    prompt_config = index.get("prompt_config")
    if not prompt_config and (folder / PROMPT_CONFIG).is_file():
        prompt_config = {**read_json(folder / PROMPT_CONFIG, "a text model's prompt settings"),
                         "stable_diffusion": index.get("_class_name") == "StableDiffusionPipeline"}
    if not prompt_config:
        return None
    encoder = read_json(folder / "text_encoder" / "config.json", "a text model's encoder")
    layers = encoder.get("num_hidden_layers")
    return {**prompt_config, "encoder": f"{(encoder.get('architectures') or ['?'])[0]} ({layers} layers, "
                                        f"width {encoder.get('hidden_size')})"}


def _conditioning(labels: dict) -> dict:
    """Vocabulary by block, training prevalence (from the stored combination counts) and the guidance default."""
    space = LabelSpace(labels)
    total = sum(space.counts.values())
    shares = prevalence(labels) if total else {}
    findings_of = [set(combination.split("|")) & set(space.findings) for combination in space.counts]
    no_finding = sum(count for count, found in zip(space.counts.values(), findings_of, strict=True) if not found)
    return {
        "findings": space.findings, "groups": space.groups, "total": total, "shares": shares,
        "no_finding_share": no_finding / total if total else None,
        # The pipeline's own default when a call gives no guidance_scale (lunggen_pipeline.py, __call__).
        "guidance_scale": labels.get("guidance_scale", DEFAULT_GUIDANCE_SCALE),
        "project_default_guidance": DEFAULT_GUIDANCE_SCALE,
        "example": next((f for f in space.findings if normalize(f) == "cardiomegaly"),
                        space.findings[0] if space.findings else None),
    }


def demographics_rows(counts: dict[str, dict[str, int]]) -> tuple[list[tuple], list[str]]:
    """(group, value, images, share) rows of the training data's subgroups, and the underrepresented ones: under
    half the share an even split of their group would give (under 25% of one of two sexes, 10% of five age bins)."""
    rows, under = [], []
    for group, values in counts.items():
        known = {v: n for v, n in values.items() if v != "unknown"}
        total = sum(values.values())
        for value, n in values.items():
            rows.append((group, value, n, n / total))
            if value != "unknown" and n / total < 0.5 / len(SUBGROUPS.get(group, known) or known):
                under.append(f"{group}={value} ({n / total:.1%})")
        under += [f"{group}={value} (none)" for value in SUBGROUPS.get(group, ()) if value not in values]
    return rows, under


def _card_data(summary: dict | None, cfg: dict, model_id: str, nih: bool, phantom: bool) -> ModelCardData:
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
    return ModelCardData(
        license="other", license_name=LICENSE_NAME, pipeline_tag="unconditional-image-generation",
        datasets=[hub_dataset.partition(":")[0]] if hub_dataset else None,
        model_name=model_id.split("/")[-1] if eval_results else None, eval_results=eval_results,
    )


def _context(folder: Path, manifest: dict, summary: dict | None, model_id: str, nih: bool, phantom: bool,
             labels: dict | None, sections: dict[str, str]) -> dict:
    """Every variable the template reads (beside the card data's own keys)."""
    unet = read_json(folder / "unet" / "config.json", "not a pipeline export")
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json", "not a pipeline export")
    steps = scheduler["num_train_timesteps"]
    latent = None
    if (folder / "vae").is_dir():
        vae = read_json(folder / "vae" / "config.json", "not a pipeline export")
        report = folder / AUTOENCODER_REPORT
        latent = {"vae": vae, "side": unet["sample_size"], "channels": unet["in_channels"],
                  "factor": 2 ** (len(vae["block_out_channels"]) - 1),
                  "standardisation": describe_standardisation(vae),
                  "report": json.loads(report.read_text()) if report.is_file() else None}
    return {
        "title": model_id.split("/")[-1], "model_id": model_id, "latent": latent,
        "res": latent["side"] * latent["factor"] if latent else unet["sample_size"],
        "channels": 1, "steps": steps, "scheduler": scheduler,
        # pipeline.py's default sampler (chosen on benchmarks/sampler_benchmark.py), as plain diffusers code.
        "sampler": dict(zip(("cls", "code"), scheduler_code(DEFAULT_SCHEDULER, scheduler), strict=True),
                        name=DEFAULT_SCHEDULER,
                        steps=min(DEFAULT_STEPS, max(1, steps // 2))),
        "samples": (folder / SAMPLES).is_file(), "denoising": (folder / DENOISING_GIF).is_file(),
        "training_progress": (folder / TRAINING_PROGRESS_GIF).is_file(), "nih": nih, "phantom": phantom,
        "data": manifest["data"], "config": manifest["config"], "seed": manifest["seed"],
        "training": manifest["training"], "duration": _duration(manifest["training"]["wall_time_s"]),
        "libraries": manifest["libraries"], "git_commit": manifest.get("git_commit"),
        "git_dirty": manifest.get("git_dirty"), "evaluation": summary, "fmt": _fmt, "flatten": _flatten,
        "conditional": _conditioning(labels) if labels else None, "sections": sections, "text": _text(folder),
        "demographics": demographics_rows(manifest["data"].get("demographics") or {}),
    }


def build_card(folder: Path, eval_metrics: dict | None = None, repo_id: str | None = None, eval_dir=None,
               fidelity_dir=None, utility_dir=None,
               reader_study_dir=None) -> tuple[ModelCard, dict | None, dict[str, str]]:
    """The card for `folder`, the evaluation summary and the included sections it shows, in memory."""
    if eval_dir is not None:
        if eval_metrics is not None:
            raise UsageError("give eval_metrics or eval_dir, not both")
        eval_metrics = read_json(Path(eval_dir) / "metrics.json", "written by python -m lunggen_diffusers.evaluate")
    dirs = {"fidelity": fidelity_dir, "utility": utility_dir, "reader_study": reader_study_dir}
    paths = local_paths(raw_config(folder), folder, *(Path(d) for d in (eval_dir, *dirs.values()) if d))
    sections = _sections(folder, dirs, paths)
    manifest = read_json(folder / MANIFEST, "written at export by the training loop")
    cfg, summary = manifest["config"], _eval_summary(folder, eval_metrics)
    source = manifest["data"]["source"]
    nih = bool(NIH.search(source))
    phantom = "phantom" in source.lower() and not nih
    model_id = repo_id or cfg.get("hub_model_id") or cfg.get("output_dir") or folder.name
    labels = _label_config(folder)
    data = _card_data(summary, cfg, model_id, nih, phantom)
    card = ModelCard.from_template(data, template_path=str(TEMPLATE),
                                   **_context(folder, manifest, summary, model_id, nih, phantom, labels, sections))
    text = _text(folder) is not None
    tags = TAGS + (CONDITIONAL_TAGS if labels else []) + (TEXT_TAGS if text else []) + \
        (LATENT_TAGS if (folder / "vae").is_dir() else [])
    return populate_model_card(card, tags=list(dict.fromkeys(tags))), summary, sections


def raw_config(folder: Path) -> dict:
    path = folder / TRAINING_CONFIG
    return json.loads(path.read_text()) if path.is_file() else {}


def card_files(folder: Path, card: ModelCard, summary: dict | None) -> dict[str, str]:
    """The texts a card brings (README.md, the kept eval summary), each checked for leaks."""
    files = {CARD: str(card)}
    if summary is not None:
        files[EVAL_SUMMARY] = json.dumps({"model_card": summary}, indent=2, sort_keys=True) + "\n"
    paths = local_paths(raw_config(folder), folder)
    for name, text in files.items():
        check_published(text, paths, name)
    return files
