"""Generate synthetic chest X-rays from a trained LungGen model (local folder or Hub id).

    python pipeline.py --model lunggen-output --num_images 1000 --output_dir synth/ --batch_size 64 --seed 0
    accelerate launch --multi_gpu --num_processes 8 pipeline.py --model my-org/lunggen-256 --num_images 100000 \
        --output_dir synth/ --scheduler ddpm --num_inference_steps 1000 --dtype bf16
    lunggen-generate --model my-org/lunggen-256 --findings Cardiomegaly Effusion --output_dir synth-cm/
    lunggen-generate --model my-org/lunggen-256 --findings "No Finding" --sex F --age 70 --view PA --output_dir f70/
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ..cli import UsageError, listed, parse_args, run
from ..data.reports import PHANTOM_TEXT, REAL_TEXT, REPORT_COLUMN
from ..runtime import (
    end_processes,
    keep_freed_memory,
    process_device,
    process_state,
    set_cpu_threads,
)
from ..utils import split_spec
from .output_folder import check_output, save_images
from .privacy_filter import PrivacyFilter
from .sampling import (
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    DTYPES,
    SCHEDULERS,
    load_pipeline,
    model_label,
)

PROCESS_IMAGES = 2  # images `--save_process` records when given no number


@dataclass
class SamplingArguments:
    model: str = field(metadata={"help": "Local DDPMPipeline folder or Hub model id."})
    output_dir: str = field(metadata={"help": "Folder for the PNGs, grid.png and manifest.csv (resumable)."})
    num_images: int = field(default=16, metadata={"help": "How many images to generate."})
    scheduler: str = field(default=DEFAULT_SCHEDULER, metadata={
        "help": f"One of {', '.join(SCHEDULERS)}. The default, {DEFAULT_SCHEDULER} at {DEFAULT_STEPS} steps, is the "
                "sampler benchmark's choice against ddpm at 1000 steps, the reference (figures: "
                "benchmarks/README.md)."})
    num_inference_steps: int = field(default=DEFAULT_STEPS, metadata={"help": "Denoising steps (model evaluations; "
                                                                               "ddpm: 1000 for the reference)."})
    batch_size: int = field(default=16, metadata={"help": "Images per forward pass (does not change the images)."})
    seed: int = field(default=0, metadata={"help": "Base seed; image i depends on (seed, i) only."})
    start_index: int = field(default=0, metadata={"help": "Index of the first image (regenerate any image by it)."})
    revision: str | None = field(default=None, metadata={"help": "Hub branch, tag or commit."})
    bit_depth: int = field(default=8, metadata={"help": "PNG bit depth: 8 or 16 (true 16-bit grayscale)."})
    dtype: str = field(default="fp32", metadata={"help": f"One of {', '.join(DTYPES)}."})
    device: str | None = field(default=None, metadata={"help": "cuda, mps or cpu; default: the best available."})
    cpu_threads: int | None = field(default=None, metadata={
        "help": "Threads per process on CPU (recorded in manifest.csv). Default: this machine's cores shared by its "
                "processes. Images are byte-identical between runs only at equal threads per process."})
    findings: list[str] | None = field(default=None, metadata={
        "help": 'Conditional models: the labels of every image, by any name of the vocabulary (Cardiomegaly '
                'Effusion; "No Finding" for none); without it or --labels_from the model samples unconditionally.'})
    labels_from: str | None = field(default=None, metadata={
        "help": "Conditional models: 'train' draws each image's labels from the training split's label "
                "combinations (stored with the model as counts), for a labeled synthetic data set."})
    guidance_scale: float | None = field(default=None, metadata={
        "help": "Classifier-free guidance (1 = none); default: the model's recommended scale."})
    guidance_interval: list[int] | None = field(default=None, metadata={
        "help": "Conditional models: the lowest and highest training timestep to guide at, the conditional model "
                "alone elsewhere (Kynkaanniemi et al. 2024), e.g. 82 579: what it does on the conditional demo is "
                "in benchmarks/README.md. Default: every step."})
    sex: str | None = field(default=None, metadata={
        "help": "Models conditioned on patient_sex: M or F for every image (with --findings, or --labels_from "
                "drawing the findings of that group)."})
    age: float | None = field(default=None, metadata={
        "help": "Models conditioned on patient_age: the age in years (its bin as trained: 0-17, 18-39, 40-59, "
                "60-79, 80+)."})
    view: str | None = field(default=None, metadata={"help": "Models conditioned on view_position: PA or AP."})
    prompt: str | None = field(default=None, metadata={
        "help": "Text models (--condition_on report): the prompt of every image, written as a report (e.g. \"Small "
                "left pleural effusion. PA view.\"; left is the patient's left)."})
    prompts: str | None = field(default=None, metadata={
        "help": "Text models: a file of prompts, one a line, or a CSV file with a 'prompt' (or 'report') column; "
                "the images take the first --num_images of them in order."})
    prompts_from: str | None = field(default=None, metadata={
        "help": "Text models: the reports of a prepared dataset (a save_to_disk folder, FOLDER[:SPLIT], default split "
                "test), image i the i-th report. Reports of a real collection are patient data: the images are "
                "recorded as made from them, and `hub push-dataset` refuses to publish them."})
    negative_prompt: str | None = field(default=None, metadata={
        "help": "Text models: what guidance steers away from, in place of the empty prompt."})
    save_process: int = field(default=0, metadata={
        "help": "Write denoising.gif (and denoising.mp4 with the video extra): the noisy sample beside the predicted "
                "clean image at each step, for this many of the first images (at most --batch_size; the flag alone: "
                f"{PROCESS_IMAGES}). 0: none.", "nargs": "?", "const": PROCESS_IMAGES})
    save_process_every: int = field(default=1, metadata={"help": "With --save_process: a frame every this many "
                                                                  "steps (and the last)."})
    privacy_filter: str | None = field(default=None, metadata={
        "help": "A patient-verifier folder (made by `evaluate --reid`): an image it matches to a training patient is "
                "rejected and redrawn from its next seed; rejected.csv and privacy_filter.json say what and why."})
    privacy_threshold: float | None = field(default=None, metadata={
        "help": "Same-patient probability above which an image is rejected; default: the verifier's, which 1 in 100 "
                "held-out strangers' best matches exceed."})
    privacy_nn_threshold: float | None = field(default=None, metadata={
        "help": "Also reject an image whose pixel NCC (32x32) with a training image exceeds this (e.g. 0.95)."})
    privacy_max_redraws: int = field(default=10, metadata={
        "help": "Redraws of one image before it is left out (and listed in privacy_filter.json)."})


def read_prompts(prompt: str | None, path: str | None, num_images: int) -> str | list[str] | None:
    """--prompt, or --prompts FILE's lines (a .csv file: its 'prompt' or 'report' column), the first `num_images`."""
    if prompt is not None and path is not None:
        raise UsageError("give --prompt or --prompts, not both")
    if path is None:
        return prompt
    if not os.path.isfile(path):
        raise UsageError(f"--prompts {path}: no such file (expected one prompt a line, or a CSV with a 'prompt' "
                         "column)")
    with open(path, newline="", encoding="utf-8") as f:
        if path.endswith(".csv"):
            rows = list(csv.DictReader(f))
            column = next((c for c in ("prompt", "report") if rows and c in rows[0]), None)
            if column is None:
                raise UsageError(f"--prompts {path}: no 'prompt' or 'report' column (it has: "
                                 f"{', '.join(rows[0]) if rows else 'no rows'})")
            texts = [row[column] for row in rows]
        else:
            texts = [line.strip() for line in f if line.strip()]
    if len(texts) < num_images:
        raise UsageError(f"--prompts {path}: {len(texts)} prompts for --num_images {num_images}; give one per image")
    return texts[:num_images]


def dataset_prompts(spec: str, num_images: int) -> tuple[list[str], str]:
    """The first `num_images` reports of a prepared dataset's split, and what they are (`reports.PHANTOM_TEXT` for
    the phantom's, else `reports.REAL_TEXT`: patient data)."""
    import datasets  # only this option reads a dataset

    path, split = split_spec(spec)
    if not (path / "dataset_dict.json").is_file() and not (path / "dataset_info.json").is_file():
        raise UsageError(f"--prompts_from {spec}: not a save_to_disk dataset folder (e.g. one lunggen-prepare wrote)")
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        split = split or "test"
        if split not in loaded:
            raise UsageError(f"--prompts_from {spec}: no split {split!r} (it has: {', '.join(loaded)})")
        loaded = loaded[split]
    if REPORT_COLUMN not in loaded.column_names:
        raise UsageError(f"--prompts_from {spec}: no {REPORT_COLUMN!r} column (it has: "
                         f"{', '.join(loaded.column_names)})")
    if len(loaded) < num_images:
        raise UsageError(f"--prompts_from {spec}: {len(loaded)} reports for --num_images {num_images}")
    rows = loaded.select(range(num_images)).select_columns([REPORT_COLUMN, "patient_id"]
                                                           if "patient_id" in loaded.column_names else [REPORT_COLUMN])
    phantom = all(str(p).startswith("phantom-") for p in rows["patient_id"]) if "patient_id" in rows.column_names \
        else False
    return list(rows[REPORT_COLUMN]), PHANTOM_TEXT if phantom else REAL_TEXT


def sample_from_args(args: SamplingArguments) -> list[dict]:
    """The command's work: check the arguments and the launch, load the model (on this process's device), write the
    images."""
    check_output(args.output_dir, args.num_images, args.num_inference_steps, args.batch_size, args.start_index,
                 args.scheduler, args.bit_depth)
    if not 0 <= args.save_process <= args.batch_size or args.save_process_every < 1:
        raise UsageError(f"--save_process {args.save_process} --save_process_every {args.save_process_every}: "
                         f"record 0 to --batch_size ({args.batch_size}) images, a frame every 1 or more steps")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        raise UsageError(f"--cpu_threads must be a positive integer, got {args.cpu_threads}")
    state = process_state()
    with state.main_process_first():  # a Hub model is downloaded once, then read from the cache by the others
        pipe, revision = load_pipeline(args.model, args.revision, args.device or process_device(state), args.dtype)
    if pipe.device.type == "cpu":
        set_cpu_threads(args.cpu_threads, int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes)))
        keep_freed_memory()
    kwargs = {k: v for k, v in asdict(args).items()
              if k not in ("model", "revision", "dtype", "device", "cpu_threads", "sex", "age", "view", "prompt",
                           "prompts_from") and not k.startswith("privacy_")}
    if args.prompts_from is not None:
        if args.prompt is not None or args.prompts is not None:
            raise UsageError("give one of --prompt, --prompts and --prompts_from")
        kwargs["prompts"], kwargs["prompt_source"] = dataset_prompts(args.prompts_from, args.num_images)
    else:
        kwargs["prompts"] = read_prompts(args.prompt, args.prompts, args.num_images)
    kwargs["privacy_filter"] = PrivacyFilter.load(
        args.privacy_filter, args.privacy_threshold, args.privacy_nn_threshold, args.privacy_max_redraws,
        str(pipe.device)) if args.privacy_filter else None
    kwargs["patient"] = {"sex": args.sex, "age": args.age, "view": args.view}
    kwargs["findings"] = listed(args.findings, "findings")
    return save_images(pipe, model=model_label(args.model), revision=revision, **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    (args,) = parse_args(SamplingArguments, argv)
    rows = run(lambda: sample_from_args(args))
    if process_state().is_main_process:
        print(f"{len(rows)} images in {args.output_dir} (manifest.csv, grid.png)")
        if len(rows) < args.num_images:
            print(f"{args.num_images - len(rows)} image(s) left out: still rejected after --privacy_max_redraws "
                  f"{args.privacy_max_redraws} (privacy_filter.json, rejected.csv)")
    end_processes()


if __name__ == "__main__":
    main()
