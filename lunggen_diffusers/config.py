"""The one configuration object that travels the whole road: CLI, presets, YAML/JSON files, checkpoints, exports.

Precedence, lowest first: dataclass defaults < `--preset` < `--config FILE` < command-line flags. Option names
follow diffusers' `examples/unconditional_image_generation/train_unconditional.py` where one exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from transformers import HfArgumentParser

from .cli import UsageError, parse
from .vocabulary import CONDITIONS

REPORT = "report"  # the --condition_on choice of a text model (the others are label conditions)


@dataclass
class DataConfig:
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id or a `save_to_disk` folder (optionally `folder:split`)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_data_dir: list[str] | None = field(
        default=None,
        metadata={"action": "extend",
                  "help": "A source folder (NIH, CheXpert, MIMIC-CXR-JPG, PadChest, IU X-ray, DICOM, VinDr-CXR, RSNA, "
                          "class folders, any image folder); repeat it (or give several) to train on several at once."},
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    split: str = field(default="train", metadata={"help": "Split to train on (patient-wise splits)."})
    resolution: int = field(default=64, metadata={"help": "Training resolution (square)."})
    center_crop: bool = field(
        default=True, metadata={"help": "Centre-crop non-square images; false pads them to square (no distortion)."}
    )
    num_phantom_images: int = field(default=2000, metadata={"help": "Phantom images when no data source is given."})
    phantom_finding_prob: float = field(default=0.1, metadata={"help": "Per-finding probability in the phantom."})
    phantom_images_per_patient: float = field(default=1.0, metadata={
        "help": "Mean images per phantom patient: 1, every image its own patient; above 1, each patient's number "
                "of studies is long-tailed around this mean (3.64 gives NIH ChestX-ray14's share of patients "
                "with one image, 0.57), the anatomy the same on each."})
    phantom_finding_scale: list[str] | None = field(default=None, metadata={
        "help": "Plant a bias: SUBGROUP:FACTOR multiplies the phantom's finding probability within a subgroup "
                "(patient_sex=F:0.5 gives women half the prevalence), to check that subgroup reports find it."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    augment: bool = field(
        default=False,
        metadata={"help": "Anatomy-preserving augmentation: small rotation, scale, brightness/contrast. Never flips."},
    )
    augment_rotation: float = field(default=5.0, metadata={"help": "Max rotation in degrees when --augment."})
    augment_scale: float = field(default=0.05, metadata={"help": "Max relative zoom when --augment."})
    augment_intensity: float = field(default=0.1, metadata={"help": "Max brightness/contrast change when --augment."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for the one-time decode/resize pass."}
    )
    max_failed_fraction: float = field(
        default=0.5, metadata={"help": "Error out when more than this fraction of image files cannot be read."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where prepared (decoded, resized) data is cached."})
    source: Literal["auto", "nih", "mimic", "padchest", "chexpert", "iu_xray", "vindr", "rsna", "dicom",
                    "class_folders", "image_folder"] = field(
        default="auto",
        metadata={"help": "What --train_data_dir holds: auto (recognised by its files), nih, mimic, padchest, "
                          "chexpert, iu_xray, vindr, rsna, dicom, class_folders or image_folder."},
    )
    uncertain_labels: Literal["ones", "zeros", "ignore"] = field(
        default="ones",
        metadata={"help": "CheXpert's uncertain (-1) observations: 'ones' (positive, the U-Ones policy), 'zeros' "
                          "(negative, U-Zeros) or 'ignore' (leave out every image with one)."},
    )
    vindr_label_rule: Literal["majority", "any"] = field(
        default="majority",
        metadata={"help": "VinDr-CXR: a finding is present when a majority of the image's radiologists marked it, "
                          "or 'any' one of them (more sensitive, more single-reader false positives)."},
    )
    dicom_percentiles: list[float] | None = field(
        default=None,
        metadata={"help": "DICOM images with no VOI (no window, no VOI LUT): map these two percentiles of each image "
                          "to black and white (e.g. 0.5 99.5) instead of its minimum and maximum."},
    )
    pseudonym_key: str | None = field(
        default=None,
        metadata={"help": "DICOM: a key file (16+ random bytes) the Patient ID pseudonyms are keyed with (HMAC). A "
                          "team that shares one gets the same pseudonyms and the same patient-wise split on every "
                          "machine; default: this installation's own key (~/.config/lunggen_diffusers/pseudonym.key, "
                          "made on first use), so another machine splits the same folder differently."},
    )
    # NIH ChestX-ray14 filters (used when the source is an NIH folder or a prepared NIH dataset).
    view_position: Literal["PA", "AP", "all"] = field(default="all", metadata={"help": "NIH view filter."})
    include_findings: list[str] | None = field(
        default=None, metadata={"help": 'Keep only images with one of these findings (e.g. "No Finding").'}
    )
    exclude_findings: list[str] | None = field(default=None, metadata={"help": "Drop images with any of these."})
    max_images_per_patient: int | None = field(
        default=None, metadata={"help": "Cap images per patient (deterministic choice); limits memorization."}
    )
    min_age: int | None = field(default=None, metadata={"help": "Minimum patient age (inclusive)."})
    max_age: int | None = field(default=None, metadata={"help": "Maximum patient age (inclusive)."})
    validation_fraction: float = field(
        default=0.05, metadata={"help": "Fraction of training patients held out as the validation split."}
    )
    test_fraction: float = field(
        default=0.2, metadata={"help": "Fraction of patients in the test split when no official split lists exist."}
    )
    split_seed: int = field(
        default=0, metadata={"help": "Seed choosing validation patients; apart from --seed so splits never move."}
    )
    condition_on: list[str] | None = field(
        default=None,
        metadata={"help": "Train a conditional model: findings, optionally view_position, patient_sex, "
                          "patient_age (in bins 0-17, 18-39, 40-59, 60-79, 80+) and source (columns of the data; "
                          "source with several --train_data_dir); and/or report (the text of --caption_column, "
                          "through a text encoder and cross-attention). Exports a LungGenPipeline instead of a "
                          "DDPMPipeline."},
    )
    caption_column: str = field(
        default="report",
        metadata={"help": "With --condition_on report: the column of report text (the phantom's own reports, a "
                          "collection's report; collections without reports get a prompt built from their labels)."},
    )


@dataclass
class ModelConfig:
    block_out_channels: list[int] = field(
        default_factory=lambda: [32, 64, 128, 128], metadata={"help": "UNet channels per resolution level."}
    )
    layers_per_block: int = field(default=1, metadata={"help": "ResNet layers per UNet block."})
    attention_resolutions: list[int] = field(
        default_factory=lambda: [16], metadata={"help": "Feature-map sizes (px) that get self-attention."}
    )
    norm_num_groups: int = field(default=32, metadata={"help": "GroupNorm groups (must divide every channel count)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout inside the ResNet blocks."})
    ddpm_num_steps: int = field(default=1000, metadata={"help": "Diffusion (training) timesteps."})
    ddpm_beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = field(default="linear")
    prediction_type: Literal["epsilon", "v_prediction"] = field(default="epsilon")
    rescale_betas_zero_snr: bool = field(
        default=False,
        metadata={"help": "Rescale the noise schedule so that its last timestep is pure noise (zero terminal SNR, Lin "
                          "et al. 2024) and sample from that timestep ('trailing' spacing); needs v_prediction."},
    )
    text_encoder: str | None = field(
        default=None,
        metadata={"help": "With --condition_on report: a transformers text encoder (Hub id or folder; a CLIP text "
                          "model, CXR-BERT, BiomedBERT, or a Stable Diffusion folder's text_encoder/ and "
                          "tokenizer/), frozen unless --train_text_encoder. Default: a byte-pair tokenizer trained "
                          "on the training reports and a small random CLIP text transformer over it."},
    )
    text_encoder_hidden_size: int = field(default=128, metadata={"help": "Width of the encoder made from scratch."})
    text_encoder_layers: int = field(default=2, metadata={"help": "Transformer layers of that encoder."})
    tokenizer_vocab_size: int = field(default=1000, metadata={"help": "Tokens of the tokenizer made from scratch."})
    latent: bool = field(
        default=False,
        metadata={"help": "The latent route: the UNet learns an autoencoder's latents (cached once per prepared data "
                          "set) and the exported pipeline decodes them; for 512 px and beyond."},
    )
    vae: str | None = field(
        default=None,
        metadata={"help": "Latent route: an AutoencoderKL (folder or Hub id, or its `vae/` subfolder) to use, or to "
                          "start from with --stage autoencoder; a 3-channel one gets the gray image on every input "
                          "channel and its output channels averaged. Default: the one trained into "
                          "OUTPUT_DIR/autoencoder."},
    )
    vae_block_out_channels: list[int] = field(
        default_factory=lambda: [64, 128, 256, 256],
        metadata={"help": "Autoencoder channels per level; each level after the first halves the side."},
    )
    vae_layers_per_block: int = field(default=1, metadata={"help": "Autoencoder ResNet layers per block."})
    vae_norm_num_groups: int = field(default=32, metadata={"help": "Autoencoder GroupNorm groups."})
    latent_channels: int = field(default=4, metadata={"help": "Channels of the autoencoder's latent."})
    latent_normalization: Literal["global", "channel"] = field(
        default="global",
        metadata={"help": "How the UNet's latents are standardised, measured on the training set: global (one "
                          "scale and shift, as Stable Diffusion) or channel (each channel to zero mean and unit "
                          "variance, stored as the autoencoder's latents_mean / latents_std)."},
    )


@dataclass
class TrainingConfig:
    output_dir: str = field(default="lunggen-output", metadata={"help": "Where the pipeline and checkpoints go."})
    seed: int = field(default=0, metadata={"help": "Seed for data order, noise and initialisation."})
    train_batch_size: int = field(default=32, metadata={"help": "Batch size per process."})
    eval_batch_size: int = field(default=16, metadata={"help": "Images in each preview grid."})
    num_epochs: int = field(default=100, metadata={"help": "Epochs, unless --max_train_steps is set."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Optimizer steps; overrides --num_epochs."})
    gradient_accumulation_steps: int = field(default=1)
    learning_rate: float = field(default=1e-4)
    lr_scheduler: str = field(default="cosine", metadata={"help": "Any diffusers.optimization.get_scheduler name."})
    lr_warmup_steps: int = field(default=500)
    adam_beta1: float = field(default=0.95)
    adam_beta2: float = field(default=0.999)
    adam_weight_decay: float = field(default=1e-6)
    adam_epsilon: float = field(default=1e-8)
    max_grad_norm: float = field(default=1.0)
    use_ema: bool = field(default=True, metadata={"help": "Keep an EMA of the weights and export it."})
    ema_inv_gamma: float = field(default=1.0)
    ema_power: float = field(default=0.75)
    ema_max_decay: float = field(default=0.9999)
    snr_gamma: float | None = field(default=None, metadata={"help": "Min-SNR loss weighting gamma (5.0 is typical)."})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(default="no", metadata={"help": "bf16 on recent GPUs."})
    gradient_checkpointing: bool = field(default=False)
    allow_tf32: bool = field(default=True, metadata={"help": "TF32 matmuls on Ampere+ GPUs (no effect on CPU)."})
    channels_last: bool = field(default=False, metadata={"help": "channels_last memory format (faster on CUDA)."})
    use_fused_adam: bool = field(default=True, metadata={"help": "Fused AdamW on CUDA (ignored elsewhere)."})
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the UNet."})
    cpu_threads: int | None = field(
        default=None,
        metadata={
            "help": "Threads per process on CPU. Default: this machine's cores shared by its processes "
            "(`accelerate launch` sets OMP_NUM_THREADS=1, which would leave all but one core idle)."
        },
    )
    dataloader_num_workers: int = field(default=0)
    checkpointing_steps: int = field(default=500)
    checkpoints_total_limit: int | None = field(default=2)
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "`latest` or a checkpoint folder."})
    save_images_steps: int | None = field(default=None, metadata={"help": "Write a preview grid every N steps."})
    preview_inference_steps: int = field(default=25, metadata={
        "help": "Steps of the default fast sampler for previews."})
    logger: Literal["tensorboard", "wandb", "all", "none"] = field(default="tensorboard")
    logging_dir: str = field(default="logs", metadata={"help": "Relative to --output_dir."})
    logging_steps: int = field(default=10, metadata={"help": "Log loss and lr every N steps."})
    condition_dropout: float = field(
        default=0.1,
        metadata={"help": "Conditional models: share of training images shown the null condition, so one model "
                          "also learns the unconditional score that classifier-free guidance needs."},
    )
    guidance_scale: float = field(
        default=2.0, metadata={"help": "Conditional models: the guidance scale stored as the pipeline's default."}
    )
    train_text_encoder: bool = field(
        default=False,
        metadata={"help": "Train the text encoder with the UNet (default: frozen, a user's pretrained one and the "
                          "one made without --text_encoder alike; the latter collapsed when trained from its first "
                          "step: docs/text.md)."},
    )
    stage: Literal["all", "autoencoder", "diffusion"] = field(
        default="all",
        metadata={"help": "all (the latent route: autoencoder, its report, then the latent model; the pixel route: "
                          "the model), autoencoder (train and judge the autoencoder alone, in OUTPUT_DIR/autoencoder) "
                          "or diffusion (the model alone, on --vae or OUTPUT_DIR/autoencoder)."},
    )
    vae_max_train_steps: int = field(default=20000, metadata={"help": "Autoencoder optimizer steps."})
    vae_train_batch_size: int = field(default=8, metadata={"help": "Autoencoder batch size per process."})
    vae_learning_rate: float = field(default=1e-4, metadata={"help": "Autoencoder learning rate."})
    vae_crop_size: int | None = field(
        default=None,
        metadata={"help": "Train the autoencoder on random square crops of this side (it is convolutional: what it "
                          "learns on crops holds for the whole image), for more steps in the same time. Never "
                          "flipped."},
    )
    vae_ssim_weight: float = field(
        default=0.5,
        metadata={"help": "Weight of a (1 - SSIM) term beside the L1 reconstruction loss: on the phantom it kept "
                          "more of a nodule's contrast than L1 alone (benchmarks/HISTORY.md, 'Autoencoder'). 0 turns "
                          "it off."},
    )
    vae_kl_weight: float = field(
        default=1e-6, metadata={"help": "Weight of the KL term beside the L1 reconstruction loss (as in Stable "
                                        "Diffusion's autoencoder: a nearly deterministic latent)."}
    )


@dataclass
class HubConfig:
    push_to_hub: bool = field(default=False)
    hub_model_id: str | None = field(default=None)
    hub_private_repo: bool = field(default=True, metadata={"help": "Create the Hub repo private (default)."})
    hub_token: str | None = field(default=None, metadata={"help": "Else HF_TOKEN or the cached login."})


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    preset: str = "demo"

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-ready; reloadable with `--config training_config.json`."""
        flat = {"preset": self.preset}
        for part in (self.data, self.model, self.training, self.hub):
            flat.update(dataclasses.asdict(part))
        flat.pop("hub_token")  # never written anywhere
        return flat


_PARTS = (DataConfig, ModelConfig, TrainingConfig, HubConfig)

# A preset is a YAML file of options in presets/, named by its file, that `--config` reads as well; its
# `when_conditioned` block applies on top when --condition_on is given (any --config file may hold one too).
PRESET_DIR = Path(__file__).with_name("presets")
WHEN_CONDITIONED = "when_conditioned"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_file(name: str) -> Path:
    if name not in preset_names():
        raise UsageError(f"--preset {name!r} is not one of: {', '.join(preset_names())}")
    return PRESET_DIR / f"{name}.yaml"




def _read_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file (expected a .yaml, .yml or .json file)")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(p.read_text()) or {}
    elif p.suffix == ".json":
        values = json.loads(p.read_text())
    else:
        raise UsageError(f"--config {path}: unknown file type {p.suffix!r} (expected .yaml, .yml or .json)")
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values")
    return values


def known_options() -> set[str]:
    return {f.name for part in _PARTS for f in dataclasses.fields(part)} | {"preset"}


def _check_keys(values: dict[str, Any], where: str) -> None:
    overlay = values.get(WHEN_CONDITIONED) or {}
    if not isinstance(overlay, dict):
        raise UsageError(f"{where}: {WHEN_CONDITIONED} must be a mapping of option names to values")
    unknown = sorted(set(values) - known_options() - {WHEN_CONDITIONED}) + sorted(set(overlay) - known_options())
    if unknown:
        raise UsageError(f"{where}: unknown option(s) {', '.join(unknown)}")


def _options(values: dict[str, Any], conditional: bool) -> dict[str, Any]:
    """A file's options, its `when_conditioned` block applied when the run is conditional."""
    overlay = values.get(WHEN_CONDITIONED) or {}
    return {**{k: v for k, v in values.items() if k != WHEN_CONDITIONED}, **(overlay if conditional else {})}


def preset_values(name: str, conditional: bool = False) -> dict[str, Any]:
    """The options preset `name` sets (its file's, without the `preset` key naming it)."""
    values = _read_file(str(preset_file(name)))
    _check_keys(values, f"preset {name}")
    if values.get("preset", name) != name:
        raise UsageError(f"{preset_file(name)} names preset {values['preset']!r}; a preset file names itself")
    return {k: v for k, v in _options(values, conditional).items() if k != "preset"}


def choices() -> dict[str, tuple[str, ...]]:
    """Each option typed as a `Literal`, with its values: what HfArgumentParser offers as argparse choices."""
    return {name: get_args(hint) for part in _PARTS for name, hint in get_type_hints(part).items()
            if get_origin(hint) is Literal}


def label_conditions(config: Config) -> list[str] | None:
    """The --condition_on choices that are labels (a condition vector), without the report; None if there are none."""
    return [c for c in config.data.condition_on or [] if c != REPORT] or None


def validate(config: Config) -> Config:
    if isinstance(config.data.train_data_dir, str):  # a config file or a caller giving one folder as a string
        config.data.train_data_dir = [config.data.train_data_dir]
    flat = config.to_dict()
    for name, allowed in choices().items():  # the command line's argparse checks these; a config file, here
        if flat[name] not in allowed:
            raise UsageError(f"--{name} {flat[name]!r} is not one of: {', '.join(allowed)}")
    m = config.model
    if m.vae:
        m.latent = True
    if m.rescale_betas_zero_snr and m.prediction_type != "v_prediction":
        raise UsageError(f"--rescale_betas_zero_snr needs --prediction_type v_prediction, not {m.prediction_type!r} "
                         "(at zero SNR the noise says nothing about the image); the demo preset sets it: add "
                         "--rescale_betas_zero_snr false to train another prediction type")
    res, levels = config.data.resolution, len(m.block_out_channels)
    factor = 2 ** (len(m.vae_block_out_channels) - 1) if m.latent and not m.vae else 1
    multiple = factor * 2 ** (levels - 1)
    if res < 8 or res % multiple:
        examples = ", ".join([str(r) for r in (64, 128, 256, 512, 1024) if r % multiple == 0][:3])
        raise UsageError(
            f"--resolution {res} cannot be divided down by the {'autoencoder and the ' if factor > 1 else ''}"
            f"UNet's {levels} levels: use a multiple of {multiple} (e.g. {examples})"
        )
    for name, channels, groups in (("norm_num_groups", m.block_out_channels, m.norm_num_groups),
                                   ("vae_norm_num_groups", m.vae_block_out_channels, m.vae_norm_num_groups)):
        bad_groups = [c for c in channels if c % groups]
        if bad_groups:
            raise UsageError(f"--{name} {groups} does not divide {name.replace('norm_num_groups', '')}"
                             f"block_out_channels {bad_groups}")
    crop = config.training.vae_crop_size
    if crop is not None and not (8 <= crop <= res and crop % 2 ** (len(m.vae_block_out_channels) - 1) == 0):
        raise UsageError(f"--vae_crop_size {crop}: give a side between 8 and --resolution {res} that the "
                         f"autoencoder's {len(m.vae_block_out_channels)} levels divide down")
    if m.latent and config.data.augment:
        raise UsageError("--augment works on pixels, and the latent route trains on latents cached once: "
                         "leave --augment off with --latent")
    if config.training.stage != "all" and not m.latent:
        raise UsageError(f"--stage {config.training.stage} belongs to the latent route: add --latent (or --vae)")
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_epochs", "checkpointing_steps",
                 "vae_max_train_steps", "vae_train_batch_size"):
        if getattr(config.training, name) < 1:
            raise UsageError(f"--{name} {getattr(config.training, name)} must be a positive integer")
    if config.training.max_train_steps is not None and config.training.max_train_steps < 1:
        raise UsageError(f"--max_train_steps {config.training.max_train_steps} must be a positive integer")
    if config.data.dataset_name and config.data.train_data_dir:
        raise UsageError("give either --dataset_name or --train_data_dir, not both")
    p = config.data.dicom_percentiles
    if p is not None and not (len(p) == 2 and 0 <= p[0] < p[1] <= 100):
        raise UsageError(f"--dicom_percentiles {' '.join(map(str, p))}: give two percentiles, low < high, in [0, 100]")
    if not 0 <= config.training.condition_dropout < 1:
        raise UsageError(f"--condition_dropout {config.training.condition_dropout} must be in [0, 1)")
    if config.training.guidance_scale < 1:
        raise UsageError(f"--guidance_scale {config.training.guidance_scale} must be >= 1 (1 = no guidance)")
    on = config.data.condition_on
    if on is not None and (set(on) - {*CONDITIONS, REPORT} or not {"findings", REPORT} & set(on)
                           or (set(on) & set(CONDITIONS[1:]) and "findings" not in on)):
        raise UsageError(f"--condition_on {' '.join(on)}: choose findings, optionally with "
                         f"{', '.join(CONDITIONS[1:-1])} and {CONDITIONS[-1]}; or {REPORT}, alone or with those")
    if (config.model.text_encoder or config.training.train_text_encoder) and REPORT not in (on or []):
        raise UsageError("--text_encoder and --train_text_encoder belong to a text model: add --condition_on report")
    phantom_finding_scales(config.data.phantom_finding_scale)  # the form; the phantom judges the values
    if config.hub.push_to_hub and not config.hub.hub_model_id:
        raise UsageError("--push_to_hub needs --hub_model_id (e.g. my-org/lunggen-256)")
    return config


def phantom_finding_scales(items: list[str] | None) -> dict[str, float]:
    """`--phantom_finding_scale patient_sex=F:0.5 age_bin=0-17:2` -> {"patient_sex=F": 0.5, "age_bin=0-17": 2.0}. The
    form is checked here; which subgroups and factors the phantom takes, by the phantom."""
    scales = {}
    for item in items or []:
        name, _, factor = item.rpartition(":")
        try:
            scales[name] = float(factor)
        except ValueError:
            raise UsageError(f"--phantom_finding_scale {item!r}: give SUBGROUP:FACTOR, e.g. patient_sex=F:0.5") \
                from None
    return scales


def from_dict(values: dict[str, Any]) -> Config:
    """Build a validated Config from a flat mapping (a saved `training_config.json`, say), preset applied first."""
    _check_keys(values, "config")
    preset = values.get("preset", "demo")
    conditional = bool(values.get("condition_on"))
    merged = {**preset_values(preset, conditional), **_options(values, conditional)}
    parts = [
        part(**{f.name: merged[f.name] for f in dataclasses.fields(part) if f.name in merged}) for part in _PARTS
    ]
    return validate(Config(*parts, preset=preset))


def parse_args(argv: list[str] | None = None) -> Config:
    """Parse `train.py`'s command line: `--preset`, `--config FILE`, then any dataclass field as a flag."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    file_values = _read_file(known.config) if known.config else {}
    _check_keys(file_values, f"--config {known.config}")
    preset = known.preset or file_values.get("preset", "demo")
    preset_file(preset)  # an unknown name is refused before anything else

    parser = HfArgumentParser(_PARTS)
    parser.add_argument("--preset", default=preset, help=f"One of: {', '.join(preset_names())} "
                                                         f"(lunggen_diffusers/presets/NAME.yaml).")
    parser.add_argument("--config", default=None, help="A .yaml or .json file of options; flags override it.")
    conditioned = argparse.ArgumentParser(add_help=False)
    conditioned.add_argument("--condition_on", nargs="*", default=None)
    on = conditioned.parse_known_args(rest)[0].condition_on or file_values.get("condition_on")
    file_options = {k: v for k, v in _options(file_values, bool(on)).items() if k != "preset"}
    parser.set_defaults(**{**preset_values(preset, bool(on)), **file_options})
    *parts, extra = parse(parser, rest + ["--preset", preset])
    return validate(Config(*parts, preset=extra.preset))


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def load_config(path: str | Path) -> Config:
    """A saved `training_config.json`, or any .json / .yaml config file."""
    return from_dict(_read_file(str(path)))
