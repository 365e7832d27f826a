"""Sampling: load a DDPMPipeline (or a conditional LungGenPipeline), swap in a fast scheduler, generate reproducible
synthetic images, write PNGs.

Image i is a function of (seed, i) and its labels alone: its initial noise and the noise the stochastic schedulers
inject come from its own CPU generator (and `--labels_from` draws its labels from its own generator too), so batch
size never changes which image comes out and any image can be regenerated from its index.
"""

import csv
import glob
import io
import json
import os
import random
import tempfile
from dataclasses import asdict, dataclass, field
from inspect import signature

import numpy as np
import torch
from accelerate.utils import gather_object
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HFValidationError
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from .lunggen_pipeline import MODULE_NAME, LungGenPipeline, guided_denoise
from .runtime import keep_freed_memory, process_device, process_share, process_state
from .utils import atomic_path, image_grid, pick_device

# Order 3 is what diffusers' docs recommend for unconditional sampling (2 is for guided sampling); few-step runs
# keep lower_order_final (the default) so the last steps stay stable.
SCHEDULERS = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "unipc": (UniPCMultistepScheduler, {"solver_order": 3}),
}
# DDIM-20, not DPM-Solver++: on the demo model it is the closest of the fast samplers to held-out phantoms, on
# pixels and on the phantom classifier's features alike, while the probability-flow ODE solvers (dpmsolver++, unipc)
# and DDIM with many steps (which approaches the ODE) stay further away: an under-trained model's ODE keeps errors
# that coarse clipped steps wash out. On features that see anatomy it is still well short of DDPM-1000, and its
# images are smoother and less varied: a default for looking, not for evaluating. The figures are in
# benchmarks/README.md (sampler_benchmark.py).
DEFAULT_SCHEDULER, DEFAULT_STEPS = "ddim", 20
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BIT_DEPTHS = (8, 16)
GRID_MAX_IMAGES = 64
MANIFEST_FIELDS = ("file", "index", "seed", "noise_seed", "scheduler", "steps", "model", "revision", "dtype",
                   "bit_depth")
# A conditional model's images also record what was asked for; a resume must ask the same.
CONDITIONAL_FIELDS = ("labels", "guidance_scale", "request")
UNCONDITIONED = "unconditioned"  # the labels column of an image sampled with the null condition
LABELS_FROM = ("train",)
SYNTHETIC_NOTICE = "research use only"
JOURNAL_PREFIX = "manifest.part-"  # one per process and run; merged into manifest.csv when the run completes


@dataclass
class SamplingArguments:
    model: str = field(metadata={"help": "Local DDPMPipeline folder or Hub model id."})
    output_dir: str = field(metadata={"help": "Folder for the PNGs, grid.png and manifest.csv (resumable)."})
    num_images: int = field(default=16, metadata={"help": "How many images to generate."})
    scheduler: str = field(default=DEFAULT_SCHEDULER, metadata={"help": f"One of {', '.join(SCHEDULERS)}."})
    num_inference_steps: int = field(default=DEFAULT_STEPS, metadata={"help": "Denoising steps."})
    batch_size: int = field(default=16, metadata={"help": "Images per forward pass (does not change the images)."})
    seed: int = field(default=0, metadata={"help": "Base seed; image i depends on (seed, i) only."})
    start_index: int = field(default=0, metadata={"help": "Index of the first image (regenerate any image by it)."})
    revision: str | None = field(default=None, metadata={"help": "Hub branch, tag or commit."})
    bit_depth: int = field(default=8, metadata={"help": "PNG bit depth: 8 or 16 (true 16-bit grayscale)."})
    dtype: str = field(default="fp32", metadata={"help": f"One of {', '.join(DTYPES)}."})
    device: str | None = field(default=None, metadata={"help": "cuda, mps or cpu; default: the best available."})
    findings: str | None = field(default=None, metadata={
        "help": 'Conditional models: comma-separated labels for every image ("Cardiomegaly,Effusion"; "No Finding" '
                "for none); without it or --labels_from the model samples unconditionally."})
    labels_from: str | None = field(default=None, metadata={
        "help": "Conditional models: 'train' draws each image's labels from the training split's label "
                "combinations (stored with the model as counts), for a labeled synthetic data set."})
    guidance_scale: float | None = field(default=None, metadata={
        "help": "Classifier-free guidance (1 = none); default: the model's recommended scale."})


def _check_scheduler(name: str) -> None:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def make_scheduler(name: str, config):
    """A fresh scheduler `name` built from another scheduler's config (the model's training noise schedule)."""
    _check_scheduler(name)
    cls, overrides = SCHEDULERS[name]
    if config.get("clip_sample") and "clip_sample" not in signature(cls.__init__).parameters:
        # The model's own scheduler clips predicted x0 to [-1, 1]; solvers without clip_sample get the same
        # through thresholding (at sample_max_value the threshold is a plain clip). Without it they diverge
        # on pixel models that lean on the clip.
        overrides = {**overrides, "thresholding": True, "sample_max_value": config.get("clip_sample_range", 1.0)}
    return cls.from_config(config, **overrides)


def _torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("dtype 'bf16' is not supported by this GPU; use fp16 or fp32")
    return DTYPES[dtype]


def _model_index(model: str, revision: str | None) -> tuple[str, str]:
    """Path of the model's model_index.json and the revision to record (commit hash for Hub models)."""
    if os.path.isdir(model):
        path = os.path.join(model, "model_index.json")
        if not os.path.isfile(path):
            raise ValueError(f"model folder {model!r} has no model_index.json; it is not a DDPMPipeline")
        return path, ""
    if os.path.exists(model):
        raise ValueError(f"model {model!r} is a file; give a DDPMPipeline folder or a Hub model id")
    try:
        path = hf_hub_download(model, "model_index.json", revision=revision)
    except HFValidationError:
        raise ValueError(f"model {model!r} is neither a local folder nor a valid Hub model id") from None
    except OSError as err:  # LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, ...
        raise FileNotFoundError(
            f"no local folder {model!r}, and no Hub model by that id (revision {revision or 'main'}) online or in "
            f"the local cache ({type(err).__name__})"
        ) from None
    # The Hub cache stores every file under snapshots/<commit>/, so the folder name pins the exact revision.
    return path, os.path.basename(os.path.dirname(path))


def load_pipeline(model: str, revision: str | None = None, device: str | None = None, dtype: str = "fp32"):
    """Load a DDPMPipeline or a LungGenPipeline (safetensors only) onto `device`; returns (pipe, resolved revision)."""
    index_path, resolved = _model_index(model, revision)
    with open(index_path) as f:
        class_name = json.load(f).get("_class_name")
    classes = {"DDPMPipeline": DDPMPipeline, (MODULE_NAME, "LungGenPipeline"): LungGenPipeline}
    cls = classes.get(tuple(class_name) if isinstance(class_name, list) else class_name)
    if cls is None:
        raise ValueError(f"model {model!r} is a {class_name or 'unknown pipeline'}, not a DDPMPipeline or a "
                         "LungGenPipeline")
    target = pick_device(device)
    torch_dtype = _torch_dtype(dtype, target)
    try:
        pipe = cls.from_pretrained(model, revision=resolved or revision, use_safetensors=True, dtype=torch_dtype)
    except OSError as err:  # e.g. a missing component, or weights only as pickle (.bin), which we refuse
        raise FileNotFoundError(f"cannot load {cls.__name__} {model!r}: {str(err).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(target), resolved


def model_label(model: str) -> str:
    """What to record about the model: a Hub id as is, a local folder by its name only (no filesystem path)."""
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model


def noise_seed(seed: int, index: int) -> int:
    """Seed of image `index`'s own generator: a well-mixed 64-bit hash of (seed, index), so no two pairs collide."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def _check_output(output_dir, num_images, num_inference_steps, batch_size, start_index, scheduler, bit_depth):
    """Everything about a save_images call that can be wrong, checked before any model is loaded or run."""
    _check_counts(num_images=num_images, num_inference_steps=num_inference_steps, batch_size=batch_size)
    if start_index < 0:
        raise ValueError(f"start_index must be >= 0, got {start_index}")
    _check_scheduler(scheduler)
    if bit_depth not in BIT_DEPTHS:
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir!r} is a file; give a folder")


def is_conditional(pipe) -> bool:
    return isinstance(pipe, LungGenPipeline)


def request_labels(pipe, indices, seed=0, findings=None, labels_from=None) -> dict[int, list[str] | None]:
    """Each image's labels (None: the null condition). `findings` applies to every image; `labels_from="train"`
    draws image i's labels from the stored label counts with a generator of (seed, i), so they too depend on the
    index alone."""
    if (findings is not None or labels_from is not None) and not is_conditional(pipe):
        raise ValueError("findings were asked of an unconditional model (a DDPMPipeline); train one with "
                         "--condition_on findings to request them")
    if findings is not None and labels_from is not None:
        raise ValueError("give --findings or --labels_from, not both")
    if labels_from is not None and labels_from not in LABELS_FROM:
        raise ValueError(f"--labels_from {labels_from!r}: choose {', '.join(LABELS_FROM)}")
    if labels_from is not None:
        return {i: pipe.labels.draw(random.Random(noise_seed(seed, i))) for i in indices}
    if findings is not None:
        wanted = pipe.labels.canonical(findings)  # checked once, before any image is made
        return dict.fromkeys(indices, wanted)
    return dict.fromkeys(indices)


def resolve_guidance(pipe, guidance_scale: float | None) -> float:
    if not is_conditional(pipe):
        if guidance_scale is not None:
            raise ValueError("--guidance_scale needs a conditional model; this one is a DDPMPipeline")
        return 1.0
    if guidance_scale is None:
        guidance_scale = pipe.config.label_config["guidance_scale"]
    if guidance_scale < 1:
        raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {guidance_scale}")
    return float(guidance_scale)


def iter_batches(pipe, indices, seed=0, scheduler=DEFAULT_SCHEDULER, num_inference_steps=DEFAULT_STEPS, batch_size=16,
                 progress=True, labels=None, guidance_scale=1.0):
    """Yield (indices, images) per batch; images are float32 numpy (B, H, W, C) in [0, 1].

    `labels` maps each index of a conditional model to its labels (None or missing: the null condition).
    """
    _check_counts(num_inference_steps=num_inference_steps, batch_size=batch_size)
    _check_scheduler(scheduler)
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    cfg = unet.config
    size = (cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    indices = list(indices)
    with tqdm(total=len(indices), unit="img", disable=not progress) as bar:
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            generators = [torch.Generator("cpu").manual_seed(noise_seed(seed, i)) for i in batch]
            # fp32 noise on CPU whatever the device and dtype, so every setup starts from the same noise.
            noise = torch.cat([torch.randn((1, cfg.in_channels, *size), generator=g) for g in generators])
            sched = make_scheduler(scheduler, pipe.scheduler.config)
            sched.set_timesteps(num_inference_steps, device=device)
            # Stochastic steps (ddpm, ddim with eta > 0) draw each image's noise from that image's generator.
            step_kwargs = {"generator": generators} if "generator" in signature(sched.step).parameters else {}
            x = noise.to(device=device, dtype=dtype) * sched.init_noise_sigma
            class_labels = null_labels = None
            if is_conditional(pipe):
                class_labels, null_labels = pipe.encode([(labels or {}).get(i) for i in batch], len(batch))
            with torch.inference_mode():
                x = guided_denoise(unet, sched, x, class_labels, null_labels, guidance_scale, step_kwargs)
            # float() before numpy: numpy has no bfloat16 (the stock pipeline's output path crashes there).
            images = (x.float() / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
            bar.update(len(batch))
            yield batch, images


def generate(pipe, num_images, seed=0, scheduler=DEFAULT_SCHEDULER, num_inference_steps=DEFAULT_STEPS, batch_size=16,
             start_index=0, output_type="pil", progress=True, findings=None, labels_from=None, guidance_scale=None):
    """Images start_index .. start_index + num_images - 1: PIL images, or one float32 array (N, H, W, C).

    Conditional models take `findings` (a list of names for every image) or `labels_from="train"`.
    """
    _check_counts(num_images=num_images)
    if start_index < 0:
        raise ValueError(f"start_index must be >= 0, got {start_index}")
    if output_type not in ("pil", "np"):
        raise ValueError(f"unknown output_type {output_type!r}; choose 'pil' or 'np'")
    indices = range(start_index, start_index + num_images)
    labels = request_labels(pipe, indices, seed, findings, labels_from)
    scale = resolve_guidance(pipe, guidance_scale)
    arrays = [images for _, images in iter_batches(pipe, indices, seed, scheduler, num_inference_steps, batch_size,
                                                   progress, labels, scale)]
    images = np.concatenate(arrays)
    return images if output_type == "np" else pipe.numpy_to_pil(images)


def to_png(image: np.ndarray, bit_depth: int) -> Image.Image:
    """(H, W, 1) float in [0, 1] -> 8-bit L, or true 16-bit grayscale (I;16) straight from the float values."""
    if bit_depth not in BIT_DEPTHS:
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if image.shape[-1] != 1:
        raise ValueError(f"PNG writing expects 1-channel (grayscale) images, got {image.shape[-1]} channels")
    if bit_depth == 8:
        return Image.fromarray(np.round(image[..., 0] * 255).astype(np.uint8))  # mode L
    return Image.fromarray(np.round(image[..., 0] * 65535).astype(np.uint16))  # mode I;16


def png_info(row: dict) -> PngInfo:
    """Text chunks that mark an image as synthetic and say how it was made."""
    info = PngInfo()
    info.add_text("Software", "LungGen-Diffusers")
    info.add_text("Description", "Synthetic chest X-ray generated by a diffusion model; not a real patient; "
                                 f"not for diagnosis ({SYNTHETIC_NOTICE}).")
    info.add_text("synthetic", SYNTHETIC_NOTICE)
    for key in ("model", "revision", "seed", "index", "noise_seed", "scheduler", "steps", "labels", "guidance_scale"):
        if key in row:
            info.add_text(key, str(row[key]))
    return info


def _complete_rows(path: str) -> list[dict]:
    """A manifest's rows, without a last line that lacks its newline: what a process killed mid-row leaves."""
    with open(path, newline="") as f:
        text = f.read()
    return list(csv.DictReader(io.StringIO(text[: text.rfind("\n") + 1])))


def _journals(output_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(output_dir), JOURNAL_PREFIX + "*.csv")))


def _read_manifest(output_dir: str, run: dict) -> dict[int, dict]:
    """Rows already written in this folder, by index: manifest.csv and the journals of interrupted processes.
    Refuses a folder made with other settings."""
    manifest = os.path.join(output_dir, "manifest.csv")
    paths = ([manifest] if os.path.exists(manifest) else []) + _journals(output_dir)
    rows = [row for path in paths for row in _complete_rows(path)]
    for row in rows:
        clash = [k for k in run if row.get(k) != str(run[k])]
        if clash:
            k = clash[0]
            raise ValueError(f"output_dir already holds images made with {k}={row.get(k)!r} (this run: "
                             f"{run[k]!r}); use a new folder or the same settings to resume")
    return {int(row["index"]): row for row in rows}


def write_grid(output_dir: str, rows: list[dict], info: PngInfo) -> str:
    """grid.png of the first GRID_MAX_IMAGES images, read back from disk (so a resumed run gets a full grid)."""
    images = []
    for row in rows[:GRID_MAX_IMAGES]:
        with Image.open(os.path.join(output_dir, row["file"])) as im:
            pixels = np.asarray(im)
        if pixels.dtype != np.uint8:  # 16-bit: keep the top 8 bits for viewing
            pixels = (pixels.astype(np.uint32) >> 8).astype(np.uint8)
        images.append(Image.fromarray(pixels))
    path = os.path.join(output_dir, "grid.png")
    with atomic_path(path) as temporary:
        image_grid(images).save(temporary, pnginfo=info)
    return path


def _label_cell(labels: list[str] | None) -> str:
    return UNCONDITIONED if labels is None else "|".join(labels) or "No Finding"


def _request(findings: list[str] | bool, labels_from: str | None) -> str:
    if labels_from is not None:
        return f"labels_from={labels_from}"
    return UNCONDITIONED if findings is False else "findings=" + ("|".join(findings) or "No Finding")


def _journal(output_dir: str, fields) -> tuple[csv.DictWriter, object]:
    """A new row file of this process alone (a unique name: no process, of this run or an earlier one, shares it)."""
    handle, _ = tempfile.mkstemp(prefix=JOURNAL_PREFIX, suffix=".csv", dir=output_dir)
    f = open(handle, "w", newline="")
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    return writer, f


def _remove_leftovers(output_dir: str) -> None:
    """Journals, now merged into manifest.csv, and the temporaries atomic_path leaves when a process is killed
    mid-write (hidden files that would still be read as images by a recursive image listing)."""
    for path in _journals(output_dir) + glob.glob(os.path.join(glob.escape(output_dir), ".image_*.tmp.png")):
        os.remove(path)


def save_images(pipe, output_dir, num_images, seed=0, scheduler=DEFAULT_SCHEDULER, num_inference_steps=DEFAULT_STEPS,
                batch_size=16, start_index=0, bit_depth=8, model="", revision="", progress=True, findings=None,
                labels_from=None, guidance_scale=None):
    """Write image_<index>.png for each image, manifest.csv and grid.png; returns the manifest rows.

    Under `accelerate launch`, every process runs this with the same arguments and takes its own share of the
    images still missing, in whole batches cut the same way whatever the process count (so the same files come
    out of 1 process or 8); the main process alone writes manifest.csv and grid.png, once every image exists.
    Resumable: images already listed in the folder's manifest or in a killed process's journal (and present) are
    skipped. Each PNG is written to a temporary name and renamed, and its row appended to its process's journal
    after, so an interrupted run never leaves a half-written image that a resume would trust. A conditional
    model's manifest and PNGs also carry each image's labels and the guidance scale.
    """
    _check_output(output_dir, num_images, num_inference_steps, batch_size, start_index, scheduler, bit_depth)
    state = process_state()
    wanted = range(start_index, start_index + num_images)
    labels = request_labels(pipe, wanted, seed, findings, labels_from)
    scale = resolve_guidance(pipe, guidance_scale)
    os.makedirs(output_dir, exist_ok=True)
    dtype = str(pipe.unet.dtype).removeprefix("torch.")
    run = {"seed": seed, "scheduler": scheduler, "steps": num_inference_steps, "model": model,
           "revision": revision, "dtype": dtype, "bit_depth": bit_depth}
    fields = MANIFEST_FIELDS
    if is_conditional(pipe):
        run.update(guidance_scale=scale, request=_request(findings is not None and labels[start_index], labels_from))
        fields = MANIFEST_FIELDS + CONDITIONAL_FIELDS
    done = _read_manifest(output_dir, run)
    todo = [i for i in wanted if not (i in done and os.path.isfile(os.path.join(output_dir, done[i]["file"])))]
    # Every process must have read the folder before any writes to it, or they would not agree on what is missing.
    state.wait_for_everyone()
    mine = [todo[j] for j in process_share(len(todo), batch_size, state)]
    made = []
    writer, f = _journal(output_dir, fields)
    with f:
        for batch, images in iter_batches(pipe, mine, seed, scheduler, num_inference_steps, batch_size,
                                          progress and state.is_main_process, labels, scale):
            for index, image in zip(batch, images):
                row = {"file": f"image_{index:06d}.png", "index": index,
                       "noise_seed": noise_seed(seed, index), **run}
                if is_conditional(pipe):
                    row["labels"] = _label_cell(labels[index])
                path = os.path.join(output_dir, row["file"])
                with atomic_path(path) as temporary:
                    to_png(image, bit_depth).save(temporary, format="PNG", pnginfo=png_info(row))
                writer.writerow(row)
                f.flush()  # the row of every renamed image reaches the file before the next image is made
                made.append({k: str(v) for k, v in row.items()})
    done.update((int(row["index"]), row) for row in gather_object(made))
    if state.is_main_process:
        # The manifest whole: one row per image, sorted, with no duplicate left by a re-made image.
        with atomic_path(os.path.join(output_dir, "manifest.csv")) as temporary, \
                open(temporary, "w", newline="") as out:
            merged = csv.DictWriter(out, fieldnames=fields)
            merged.writeheader()
            merged.writerows(done[i] for i in sorted(done))
        _remove_leftovers(output_dir)
        write_grid(output_dir, [done[i] for i in wanted], png_info(run))
    state.wait_for_everyone()  # no process returns before the folder is complete
    return [done[i] for i in wanted]


def sample_from_args(args: SamplingArguments) -> list[dict]:
    """The CLI's work: check the arguments and the launch, load the model (on this process's device), write the
    images."""
    _check_output(args.output_dir, args.num_images, args.num_inference_steps, args.batch_size, args.start_index,
                  args.scheduler, args.bit_depth)
    state = process_state()
    with state.main_process_first():  # a Hub model is downloaded once, then read from the cache by the others
        pipe, revision = load_pipeline(args.model, args.revision, args.device or process_device(state), args.dtype)
    if pipe.device.type == "cpu":
        keep_freed_memory()
    kwargs = {k: v for k, v in asdict(args).items() if k not in ("model", "revision", "dtype", "device")}
    if args.findings is not None:
        kwargs["findings"] = [name.strip() for name in args.findings.split(",") if name.strip()]
    return save_images(pipe, model=model_label(args.model), revision=revision, **kwargs)
