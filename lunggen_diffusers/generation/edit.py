"""`lunggen-edit`: add or remove findings in given radiographs with a conditional model, keeping the patient.

    lunggen-edit --model cond-demo --input cxr.png --add pleural_effusion --mask auto --output_dir edits/
    lunggen-edit --model my-org/lunggen-256 --input /data/pacs-export --remove Cardiomegaly --mask auto \
        --output_dir edits/
    lunggen-edit --model text-demo --input cxr.png --prompt "Consolidation in the left lower zone." --mask auto \
        --output_dir edits/

For each input: `edit_<hash>.png` (the edited image), `difference_<hash>.png` (|edited - source|, stretched) and
`grid_<hash>.png` (source | edited | difference | mask), and a row of manifest.csv. Files are named by the first 12
hex digits of the source image's SHA-256, never by its path or name. An edited image shows a real patient: its PNG
chunks say "derived_from_real" with that hash, never "synthetic", and every Hub push refuses it.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..cli import UsageError, listed, parse_args, run
from ..data.decode import open_image
from ..data.transforms import preprocess_image
from ..runtime import end_processes, process_device, process_state
from ..utils import (
    DERIVED_FROM_REAL,
    IMAGE_EXTENSIONS,
    atomic_path,
    image_grid,
    is_dicom,
    list_images,
)
from ..vocabulary import as_model_names
from .editing import (
    DEFAULT_GUIDANCE_RISE,
    DEFAULT_METHOD,
    DEFAULT_STRENGTH,
    EDIT_STEPS,
    GUIDANCE_STEP,
    Method,
    adds_one_focal_site,
    auto_mask,
    edit,
)
from .sampling import image_side, load_pipeline, model_label, resolve_guidance

logger = logging.getLogger(__name__)
MANIFEST = "manifest.csv"
FIELDS = ("file", "source_sha256", "source", "target", "method", "strength", "guidance_scale", "guidance_rise", "eta",
          "steps", "seed", "mask", "model", "revision")
SITES = {"auto": None, "one": True, "all": False}  # --mask_sites -> auto_mask's one_site
EDITED_NOTICE = ("EDITED from a real patient's radiograph by a diffusion model: patient data, not synthetic and not "
                 "anonymous; research use only, not for diagnosis.")


@dataclass
class EditArguments:
    model: str = field(metadata={"help": "A conditional LungGen model: local folder or Hub id."})
    input: str = field(metadata={"help": "An image file, a folder of images, or a DICOM file or folder."})
    output_dir: str = field(metadata={"help": "Where the edited images, difference maps, grids and manifest go."})
    add: list[str] = field(default_factory=list, metadata={"help": "Findings to add (the model's names)."})
    remove: list[str] = field(default_factory=list, metadata={"help": "Findings to remove."})
    findings: list[str] = field(default_factory=list, metadata={
        "help": "Other findings the image shows, kept on both sides of the edit (default: none)."})
    sex: str | None = field(default=None, metadata={"help": "Models conditioned on sex: the patient's (M or F)."})
    age: float | None = field(default=None, metadata={"help": "Models conditioned on age: the patient's, in years."})
    view: str | None = field(default=None, metadata={"help": "Models conditioned on the view: PA or AP."})
    prompt: str | None = field(default=None, metadata={
        "help": "Text models: edit toward this report (e.g. \"Consolidation in the left lower zone.\"; left is the "
                "patient's left), from --source_prompt."})
    source_prompt: str = field(default="", metadata={
        "help": "Text models: what the image shows now, as a report (default: the empty prompt, the model's "
                "unconditioned reading)."})
    method: Method = field(default=DEFAULT_METHOD)
    strength: float | None = field(default=None, metadata={
        "help": "How far up the noise schedule the edit starts, in (0, 1]; default per method "
                f"({', '.join(f'{k} {v}' for k, v in DEFAULT_STRENGTH.items())})."})
    guidance_scale: float | None = field(default=None, metadata={"help": "Toward the target; default: the model's."})
    guidance_rise: float = field(default=DEFAULT_GUIDANCE_RISE, metadata={
        "help": "An edit the model itself still reads as the source is taken again with guidance raised by "
                f"{GUIDANCE_STEP} at a time, up to this much more (0: never); the manifest records the guidance used."})
    num_inference_steps: int = field(default=EDIT_STEPS, metadata={"help": "Steps of the whole noise schedule."})
    eta: float = field(default=0.0, metadata={
        "help": "ddim-inversion, sdedit, repaint: fresh noise put back at each step on the way down (DDIM's eta): "
                "0 deterministic, 1 as much as DDPM (see docs/editing.md)."})
    mask: str | None = field(default=None, metadata={
        "help": "Where the image may change: a grey PNG of the image's size (white = may change), or `auto` "
                "(DiffEdit: where the model's predictions under the source and target labels disagree). Outside "
                "it the source stays exactly."})
    mask_sites: Literal["auto", "one", "all"] = field(default="auto", metadata={
        "help": "With --mask auto: `one` keeps only the region where the predictions disagree most, `all` every "
                "region; `auto` one when the edit only adds focal findings (a consolidation, nodule or mass sits at "
                "one site), else all."})
    keep_mask: str | None = field(default=None, metadata={"help": "A PNG (white = must stay exactly as it is)."})
    seed: int = field(default=0, metadata={
        "help": "Seed of the noise (ddpm-inversion, sdedit, repaint, eta) and of the auto mask."})
    device: str | None = field(default=None, metadata={"help": "cuda, mps or cpu; default: the best available."})


def read_inputs(spec: str, side: int) -> list[tuple[np.ndarray, str]]:
    """(uint8 (side, side), SHA-256 of the file) for each input image; any mode becomes grey, another size is resized
    (with a warning)."""
    path = Path(spec)
    if path.is_dir():
        files = list_images(path)
    elif path.is_file() and (path.suffix.lower() in IMAGE_EXTENSIONS or is_dicom(path)):
        files = [path]
    else:
        raise UsageError(f"--input {spec}: no such image file or folder")
    if not files:
        raise UsageError(f"--input {spec}: no images in it ({', '.join(IMAGE_EXTENSIONS)} or DICOM)")
    out = []
    for file in files:
        image = open_image(file)
        if image.size != (side, side):
            logger.warning("an input of %dx%d was resized to the model's %dx%d", *image.size, side, side)
        out.append((preprocess_image(image, side), hashlib.sha256(file.read_bytes()).hexdigest()))
    return out


def read_mask(spec: str, side: int, what: str) -> torch.Tensor:
    with Image.open(spec) as image:
        if image.size != (side, side):
            raise UsageError(f"--{what} {spec} is {image.size[0]}x{image.size[1]}; give a mask of the images' size "
                             f"({side}x{side})")
        mask = np.asarray(image.convert("L"), np.float32) / 255
    return torch.from_numpy((mask >= 0.5).astype(np.float32))[None, None]


def labels_of(pipe, args: EditArguments) -> tuple[list[str] | str, list[str] | str]:
    """(source labels, target labels), canonical, with the patient's demographics on both sides; a text edit's
    (source prompt, target prompt)."""
    if args.prompt is not None:
        if getattr(pipe, "text_encoder", None) is None:
            raise UsageError(f"--prompt: --model {args.model} was trained without text (no --condition_on report)")
        if args.add or args.remove or args.findings:
            raise UsageError("give --prompt, or --add / --remove with --findings, not both")
        if args.prompt == args.source_prompt:
            raise UsageError("--prompt and --source_prompt are the same: the edit would change nothing")
        return args.source_prompt, args.prompt
    if getattr(pipe, "labels", None) is None:
        raise UsageError(f"--model {args.model} was trained without labels: it cannot add or remove findings "
                         "(train with --condition_on findings)")
    if not args.add and not args.remove:
        raise UsageError("give --add or --remove (a finding to add or remove)")
    def canonical(flag):  # a finding by any name of the vocabulary; an unknown one is refused by name
        return pipe.labels.canonical(as_model_names(listed(getattr(args, flag), flag), pipe.labels.names))

    base, add, remove = canonical("findings"), canonical("add"), canonical("remove")
    both = set(add) & set(remove)
    if both:
        raise UsageError(f"{sorted(both)} both added and removed")
    patient = pipe.labels.patient(args.sex, args.age, args.view) if (args.sex, args.age, args.view) != \
        (None, None, None) else []
    source = sorted((set(base) | set(remove)) - set(add))
    target = sorted((set(base) | set(add)) - set(remove))
    return source + patient, target + patient


def _cell(request: list[str] | str) -> str:
    """A manifest cell: a prompt as it is, a label list "|"-joined ("No Finding" for none)."""
    return request if isinstance(request, str) else "|".join(request) or "No Finding"


def _stretch(difference: np.ndarray) -> np.ndarray:
    peak = max(float(difference.max()), 1e-6)
    return np.round(difference / peak * 255).astype(np.uint8)


def edit_from_args(args: EditArguments) -> list[dict]:
    if args.num_inference_steps < 1:
        raise UsageError(f"--num_inference_steps {args.num_inference_steps}: give 1 or more")
    state = process_state()
    pipe, revision = load_pipeline(args.model, device=args.device or process_device(state))
    source, target = labels_of(pipe, args)
    side = image_side(pipe)
    if args.mask_sites != "auto" and args.mask != "auto":
        raise UsageError(f"--mask_sites {args.mask_sites} chooses among the auto mask's regions: give --mask auto")
    one_site = SITES[args.mask_sites]
    if one_site is None:
        one_site = adds_one_focal_site(source, target)
    mask = None if args.mask in (None, "auto") else read_mask(args.mask, side, "mask")
    keep = None if args.keep_mask is None else read_mask(args.keep_mask, side, "keep_mask")
    scale = resolve_guidance(pipe, args.guidance_scale)
    inputs = read_inputs(args.input, side)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    mask_cell = {None: None, "auto": f"auto ({'one site' if one_site else 'all sites'})"}.get(args.mask, "given")
    rows = []
    for pixels, digest in inputs:
        images = torch.from_numpy(pixels.astype(np.float32) / 255)[None, None]
        generator = torch.Generator("cpu").manual_seed(args.seed)
        used = mask
        if args.mask == "auto":
            used = auto_mask(pipe, images, [source], [target], generator=generator, one_site=one_site)
        edited, (guidance,) = edit(pipe, images, [source], [target], args.method, args.strength, scale,
                                   args.num_inference_steps, used, keep, generator, eta=args.eta, output_type="pt",
                                   guidance_rise=args.guidance_rise, return_guidance=True)
        result = np.round(edited[0, 0].numpy() * 255).astype(np.uint8)
        row = {"file": f"edit_{digest[:12]}.png", "source_sha256": digest, "source": _cell(source),
               "target": _cell(target), "method": args.method,
               "strength": args.strength if args.strength is not None else DEFAULT_STRENGTH[args.method],
               "guidance_scale": guidance, "guidance_rise": args.guidance_rise, "eta": args.eta,
               "steps": args.num_inference_steps, "seed": args.seed,
               "mask": mask_cell, "model": model_label(args.model),
               "revision": revision or ""}
        info = PngInfo()
        info.add_text("Description", EDITED_NOTICE)
        info.add_text(DERIVED_FROM_REAL, f"sha256:{digest}")
        for key in ("source", "target", "method", "strength", "guidance_scale", "guidance_rise", "eta", "steps", "seed",
                    "model"):
            info.add_text(f"edit_{key}", str(row[key]))
        difference = _stretch(np.abs(result.astype(np.float32) - pixels))
        tiles = [pixels, result, difference] + ([np.round(used[0, 0].numpy() * 255).astype(np.uint8)]
                                                if used is not None else [])
        for name, picture in ((row["file"], result), (f"difference_{digest[:12]}.png", difference),
                              (f"grid_{digest[:12]}.png", np.asarray(image_grid([Image.fromarray(t) for t in tiles],
                                                                                 len(tiles))))):
            with atomic_path(out / name) as temporary:
                Image.fromarray(picture).save(temporary, format="PNG", pnginfo=info)
        rows.append(row)
    manifest = out / MANIFEST
    old = []
    if manifest.is_file():  # a folder edited before: its rows stay, an image edited again is replaced
        with open(manifest, newline="") as f:
            old = list(csv.DictReader(f))
    with atomic_path(manifest) as temporary, open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows([r for r in old if r["file"] not in {row["file"] for row in rows}] + rows)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    (args,) = parse_args(EditArguments, argv)
    rows = run(lambda: edit_from_args(args))
    print(f"{len(rows)} edited image(s) in {args.output_dir} (manifest.csv); they show real patients: keep them local")
    end_processes()


if __name__ == "__main__":
    main()
