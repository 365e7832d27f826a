"""Speed and quality of each sampler against the reference DDPM-1000, on the same seeds (issue #28).

    python benchmarks/sampler_benchmark.py --model lunggen-output --num_images 512 --cache_dir benchmarks/cache

(DDPM-1000 dominates: about 50 minutes for the 512 images a prevalence needs, for the 64-px demo model on two cores
of a Xeon; `--cache_dir` keeps every sampler's images, so it is sampled once per model.)

Every row is read against held-out phantoms drawn as the model's training set was (`--training_prevalence` of each
finding; a seed the model never trained on), on the phantom classifier's features (a CNN trained to read the
phantom's findings, laterality and patient, lunggen_diffusers/evaluation/phantom_classifier.py: a space that sees
anatomy where downsampled pixels reward smooth averages): Fréchet distance, KID, and precision / recall / density /
coverage (k=5; FD alone ranks smooth, alike images above grainy ones that span the data). Pixel FD (8x8) is kept
beside for continuity with older tables. The row "phantoms" is a second held-out set of the same size: the
distance sampling noise alone gives, the floor no sampler can beat.

A distance can look good while the sampler draws the wrong patients, so every row also has its census (the shipped
phantom classifier): the share of images with each finding and with the heart on the image's right, with Wilson 95%
intervals, beside the held-out phantoms' and DDPM-1000's. Further disjoint held-out sets of the same size
(`--census_floor_sets`) give the census its floor: how far apart two sets of real images read at this size.

Goals (per row; model evaluations count, a second-order step's two are two): "default", at most 50 evaluations and
within 1.15x of DDPM-1000's FD on the classifier's features; "fast", at most 25 and within 1.5x; for both, every
finding's share within 0.03 of DDPM-1000's and of the held-out share, and the heart on the image's right (the patient's
left, as on a PA film) in at least 0.995. Prints both tables and which rows qualify, writes JSON and a PNG with the
first images of every sampler (one row each, same seeds so rows are comparable). A share says how often the classifier
reads a finding, not what it read: `sampler_benchmark_findings.png` shows, for each finding, the 8 images of every row
it is surest show it, so a finding drawn tells itself apart from texture read as one.
"""

import hashlib
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from lunggen_diffusers.cli import run  # noqa: E402
from lunggen_diffusers.data.phantom import phantom_dataset  # noqa: E402
from lunggen_diffusers.evaluation.features import pixel_features  # noqa: E402
from lunggen_diffusers.evaluation.metrics import frechet_distance, kernel_inception_distance, prdc  # noqa: E402
from lunggen_diffusers.evaluation.phantom_classifier import (  # noqa: E402
    FINDINGS,
    HEART_RIGHT,
    ClassifierSettings,
    load_classifier,
)
from lunggen_diffusers.generation.sampling import (  # noqa: E402
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    SCHEDULERS,
    generate,
    image_side,
    load_pipeline,
    make_scheduler,
    model_label,
)
from lunggen_diffusers.runtime import keep_freed_memory  # noqa: E402
from lunggen_diffusers.utils import atomic_path  # noqa: E402

from common import census, census_of, finish  # noqa: E402  (beside this file)

REFERENCE = ("ddpm", 1000)
DEFAULT = (DEFAULT_SCHEDULER, DEFAULT_STEPS)
SAMPLERS = [REFERENCE, ("ddim", 20), ("dpmsolver++-sde", 25), ("dpmsolver++", 25), DEFAULT]
# name: (most model evaluations, largest FD / DDPM-1000's FD on the classifier's features)
GOALS = {"default": (50, 1.15), "fast": (25, 1.5)}
GOAL_PREVALENCE_GAP, GOAL_LATERALITY = 0.03, 0.995
HELD_OUT_SEED = 12345  # training uses phantom seed 0


@dataclass
class BenchmarkArguments:
    model: str = field(metadata={"help": "Trained DDPMPipeline folder or Hub id."})
    num_images: int = field(default=512, metadata={"help": "Images per sampler (same seeds for all); a prevalence "
                                                         "near 0.1 needs about 512 to be read to +-0.03."})
    samplers: list[str] = field(default_factory=lambda: [f"{n}-{s}" for n, s in dict.fromkeys(SAMPLERS)], metadata={
        "help": "name-steps each (ddim-20, dpmsolver++-10, ...); ratios and the goal need ddpm-1000 among them."})
    num_reference: int = field(default=1024, metadata={"help": "Held-out phantoms to compare against."})
    training_prevalence: float = field(default=0.1, metadata={
        "help": "Each finding's share in the model's training phantoms (the demo's: 0.1): the held-out phantoms, "
                "the distances' reference and the census target, are drawn with it."})
    batch_size: int = field(default=64)
    seed: int = field(default=0)
    feature_size: int = field(default=8, metadata={"help": "Side of the downsampled pixel features."})
    device: str | None = field(default=None, metadata={"help": "cuda, mps or cpu; default: the best available."})
    num_threads: int | None = field(default=None, metadata={
        "help": "CPU threads for torch; 1 gives steadier timings on a busy shared machine."})
    output_dir: str = field(default="benchmarks/results", metadata={"help": "Where the JSON and the PNG go."})
    cache_dir: str | None = field(default=None, metadata={
        "help": "Keep each sampler's images here and reuse them in later runs (keyed by the model's weights, the "
                "sampler's definition, seed and count): DDPM-1000 is then sampled once per model."})
    timing_images: int = field(default=16, metadata={"help": "Images in the one batch each sampler is timed on."})
    timing_repeats: int = field(default=2, metadata={"help": "Timed runs per sampler; the fastest counts."})
    census_floor_sets: int = field(default=7, metadata={
        "help": "Further held-out sets of --num_images, disjoint: the census gaps between any two held-out sets are "
                "how far apart real images read at this size, the census goal's sampling noise (0: skip)."})


def _uint8(images: np.ndarray) -> np.ndarray:
    """What the PNGs hold: (N, H, W) uint8."""
    return np.round(images[..., 0] * 255).astype(np.uint8)


def _phantoms(num_images: int, resolution: int, start_index: int, finding_prob: float = 0.0) -> np.ndarray:
    data = phantom_dataset(num_images, resolution=resolution, seed=HELD_OUT_SEED, finding_prob=finding_prob,
                           start_index=start_index)
    return np.stack([np.asarray(image) for image in data["image"]])


def _cache_path(args: BenchmarkArguments, pipe, scheduler: str, steps: int) -> str | None:
    """Where a sampler's images for this model live in --cache_dir: a digest of everything that decides them."""
    if args.cache_dir is None:
        return None
    digest = hashlib.sha256()
    for module in (pipe.unet, getattr(pipe, "vae", None)):
        for name, tensor in (module.state_dict().items() if module is not None else ()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str).encode())
    digest.update(repr(SCHEDULERS[scheduler]).encode())
    return os.path.join(args.cache_dir, f"{scheduler}-{steps}-seed{args.seed}-n{args.num_images}-"
                                        f"{digest.hexdigest()[:16]}.npy")


def _sample(args: BenchmarkArguments, pipe, scheduler: str, steps: int) -> np.ndarray:
    """The sampler's images (N, H, W) uint8, from --cache_dir when it holds them."""
    path = _cache_path(args, pipe, scheduler, steps)
    if path and os.path.exists(path):
        return np.load(path)
    images = _uint8(generate(pipe, args.num_images, seed=args.seed, scheduler=scheduler, num_inference_steps=steps,
                             batch_size=args.batch_size, output_type="np"))
    if path:
        os.makedirs(args.cache_dir, exist_ok=True)
        with atomic_path(path) as temporary, open(temporary, "wb") as f:
            np.save(f, images)
    return images


def _ms_per_image(args: BenchmarkArguments, pipe, samplers: list[tuple[str, int]]) -> dict[tuple[str, int], float]:
    """Per sampler, the best of `timing_repeats` runs of one batch of `timing_images`, the samplers taking turns
    (as `timeit` does: the minimum is the work, the rest is what else the machine was doing). Timed apart from the
    scored images, so a cached or a shared-machine run still reports what a sampler costs."""
    best = dict.fromkeys(samplers, float("inf"))
    for _ in range(args.timing_repeats):
        for scheduler, steps in samplers:
            start = time.perf_counter()
            generate(pipe, args.timing_images, seed=args.seed, scheduler=scheduler, num_inference_steps=steps,
                     batch_size=args.timing_images, output_type="np", progress=False)
            best[scheduler, steps] = min(best[scheduler, steps], time.perf_counter() - start)
    return {sampler: 1000 * seconds / args.timing_images for sampler, seconds in best.items()}


def parse_sampler(text: str) -> tuple[str, int]:
    name, _, steps = text.rpartition("-")
    if not name or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"--samplers {text!r}: expected a scheduler name and a step count, such as ddim-20")
    return name, int(steps)


def evaluations(pipe, scheduler: str, steps: int) -> int:
    """UNet evaluations per image (Heun takes two a step)."""
    sched = make_scheduler(scheduler, pipe.scheduler.config)
    sched.set_timesteps(steps)
    return len(sched.timesteps)


def benchmark(args: BenchmarkArguments) -> dict:
    samplers = [parse_sampler(text) for text in args.samplers]
    if args.census_floor_sets < 0:
        raise ValueError(f"--census_floor_sets must be >= 0, got {args.census_floor_sets}")
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    pipe, revision = load_pipeline(args.model, device=args.device)
    # As `pipeline.py` does on CPU (timings are of what users run): freed activations stay in the process.
    kept_freed_memory = pipe.device.type == "cpu" and keep_freed_memory()
    resolution = image_side(pipe)
    classifier = load_classifier(ClassifierSettings(resolution=resolution))
    reader = load_classifier()  # the census reads every model with the same instrument, whatever its resolution
    reference_images = _phantoms(args.num_reference, resolution, 0, args.training_prevalence)
    reference = pixel_features(reference_images, args.feature_size)
    reference_phantom = classifier.features(reference_images)
    floor = _phantoms(args.num_images, resolution, args.num_reference, args.training_prevalence)  # disjoint

    def quality(images: np.ndarray, probabilities: np.ndarray) -> dict:
        phantom = classifier.features(images)
        kid, _ = kernel_inception_distance(phantom, reference_phantom)
        return {"fd": frechet_distance(pixel_features(images, args.feature_size), reference),
                "phantom_fd": frechet_distance(phantom, reference_phantom), "phantom_kid": kid,
                **{f"phantom_{k}": v for k, v in prdc(reference_phantom, phantom).items()},
                "census": census_of(probabilities)}

    floor_probabilities = reader.predict(floor)
    rows = [{"sampler": "phantoms", "steps": 0, "evaluations": 0, "ms_per_image": 0.0,
             **quality(floor, floor_probabilities)}]
    held_out = [rows[0]["census"]] + [
        census(_phantoms(args.num_images, resolution, args.num_reference + k * args.num_images,
                         args.training_prevalence), reader) for k in range(1, args.census_floor_sets + 1)]
    real_gaps = np.array([max_gap(a, b) for a, b in itertools.combinations(held_out, 2)])
    strips, surest = [floor[:8]], [surest_reads(floor, floor_probabilities)]
    for scheduler, steps in samplers:
        images = _sample(args, pipe, scheduler, steps)
        probabilities = reader.predict(images)
        rows.append({"sampler": scheduler, "steps": steps, "evaluations": evaluations(pipe, scheduler, steps),
                     **quality(images, probabilities)})
        strips.append(images[:8])
        surest.append(surest_reads(images, probabilities))
    generate(pipe, 1, num_inference_steps=2, progress=False)  # warm-up: first-call allocations are not sampling
    for row, ms in zip(rows[1:], _ms_per_image(args, pipe, samplers).values(), strict=True):
        row["ms_per_image"] = ms
    ref = next((r for r in rows if (r["sampler"], r["steps"]) == REFERENCE), None)
    for row in rows[1:]:
        row.update(census_goals(row["census"], rows[0]["census"], ref["census"] if ref else None))
    for row in rows[1:] if ref else []:
        row["speedup"] = ref["ms_per_image"] / row["ms_per_image"]
        row["fd_ratio"] = row["fd"] / ref["fd"]
        row["phantom_fd_ratio"] = row["phantom_fd"] / ref["phantom_fd"]
        row["meets"] = [goal for goal, (most, ratio) in GOALS.items() if row["evaluations"] <= most
                        and row["phantom_fd_ratio"] <= ratio and row["meets_census_goals"]]
    default = next((r for r in rows if (r["sampler"], r["steps"]) == DEFAULT), None)
    result = {"settings": {**asdict(args), "model": model_label(args.model), "model_revision": revision,
                           "resolution": resolution, "device": str(pipe.device), "phantom_seed": HELD_OUT_SEED,
                           "phantom_features": classifier.description,
                           "kept_freed_memory": kept_freed_memory},
              "rows": rows,
              # Real against real at this n: the largest finding gap between two disjoint held-out sets.
              "census_floor": None if not len(real_gaps) else {
                  "pairs": len(real_gaps), "median_gap": float(np.median(real_gaps)), "max_gap": float(real_gaps.max()),
                  "share_over_goal": float((real_gaps > GOAL_PREVALENCE_GAP).mean())},
              "sheet_rows": ["phantoms"] + [f"{name}-{steps}" for name, steps in samplers],
              # The default is held to every goal its evaluation count falls under.
              "default_meets": None if ref is None or default is None else {
                  goal: goal in default["meets"] for goal, (most, _) in GOALS.items()
                  if default["evaluations"] <= most}}
    finish(result, os.path.join(args.output_dir, "sampler_benchmark.json"))
    # Rows: phantoms, then each sampler in --samplers order; columns: the same 8 seeds.
    sheet = np.concatenate([np.concatenate(list(s), axis=1) for s in strips], axis=0)
    Image.fromarray(sheet).save(os.path.join(args.output_dir, "sampler_benchmark.png"))
    # One block per finding (FINDINGS order, a blank row between), the same rows as above.
    gap = np.zeros_like(surest[0][0][:4])
    blocks = [np.concatenate([rows_of[i] for rows_of in surest] + [gap], axis=0) for i in range(len(FINDINGS))]
    Image.fromarray(np.concatenate(blocks, axis=0)).save(os.path.join(args.output_dir,
                                                                      "sampler_benchmark_findings.png"))
    return result


def surest_reads(images: np.ndarray, probabilities: np.ndarray, count: int = 8) -> list[np.ndarray]:
    """Per finding, the `count` images the classifier gives it the highest probability, surest first, side by side."""
    return [np.concatenate(list(images[np.argsort(-probabilities[:, i], kind="stable")[:count]]), axis=1)
            for i in range(len(FINDINGS))]


def max_gap(row: dict, other: dict) -> float:
    """The largest gap between two censuses' shares of any finding."""
    return max(abs(row[f]["share"] - other[f]["share"]) for f in row if f != HEART_RIGHT)


def census_goals(row: dict, held_out: dict, reference: dict | None) -> dict:
    """The largest gap of any finding's share to the held-out phantoms' and to DDPM-1000's, and whether the row
    meets the census goals (None where DDPM-1000 was not run)."""
    out = {"prevalence_gap_held_out": max_gap(row, held_out), "laterality": row[HEART_RIGHT]["share"]}
    out["prevalence_gap_ddpm"] = max_gap(row, reference) if reference else None
    out["meets_census_goals"] = None if reference is None else bool(
        max(out["prevalence_gap_held_out"], out["prevalence_gap_ddpm"]) <= GOAL_PREVALENCE_GAP
        and out["laterality"] >= GOAL_LATERALITY)
    return out


def census_table(result: dict) -> str:
    rows = result["rows"]
    findings = [name for name in rows[0]["census"] if name != HEART_RIGHT]
    header = ["sampler", "steps", "ms/image", *findings, "heart on image right", "max gap held-out / ddpm-1000",
              "goals"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [f"{r['census'][f]['share']:.3f} [{r['census'][f]['interval'][0]:.3f}, "
                 f"{r['census'][f]['interval'][1]:.3f}]" for f in (*findings, HEART_RIGHT)]
        gaps = "-" if r["steps"] == 0 else (f"{r['prevalence_gap_held_out']:.3f} / " + (
            "-" if r["prevalence_gap_ddpm"] is None else f"{r['prevalence_gap_ddpm']:.3f}"))
        verdict = {None: "-", True: "yes", False: "no"}[r.get("meets_census_goals")]
        name = "held-out phantoms" if r["steps"] == 0 else r["sampler"]
        lines.append(f"| {name} | {r['steps']} | {r['ms_per_image']:.1f} | " + " | ".join(cells)
                     + f" | {gaps} | {verdict} |")
    return "\n".join(lines)


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:>5.2f}" if "speedup" in row else f"{'floor' if row['steps'] == 0 else '':>5}"


def print_table(result: dict) -> None:
    print(f"{'sampler':<20} {'steps':>5} {'evals':>5} {'ms/image':>9} {'speed-up':>8} | {'pixel FD':>8} {'/ddpm':>5} |"
          f" {'FD':>7} {'/ddpm':>5} {'KID':>7} {'prec':>4} {'rec':>4} {'dens':>4} {'cov':>4} | meets")
    for r in result["rows"]:
        speed = f"{r['speedup']:>7.1f}x" if "speedup" in r else f"{'':>8}"
        print(f"{r['sampler']:<20} {r['steps']:>5} {r['evaluations']:>5} {r['ms_per_image']:>9.1f} {speed} |"
              f" {r['fd']:>8.4f} {_ratio(r, 'fd_ratio')} | {r['phantom_fd']:>7.2f} {_ratio(r, 'phantom_fd_ratio')}"
              f" {r['phantom_kid']:>7.0f} {r['phantom_precision']:>4.2f} {r['phantom_recall']:>4.2f}"
              f" {r['phantom_density']:>4.2f} {r['phantom_coverage']:>4.2f} | {', '.join(r.get('meets', []))}")
    goals = "; ".join(f"{goal}: <= {most} evaluations and FD on the classifier's features <= {ratio}x ddpm-1000's"
                      for goal, (most, ratio) in GOALS.items())
    verdict = result["default_meets"]
    print(f"goals ({goals}; both with the census goals). The default, {DEFAULT[0]}-{DEFAULT[1]}, meets: "
          f"{'(not judged: needs ddpm-1000 and the default among --samplers)' if verdict is None else verdict}")
    print(f"\nCensus (the shipped phantom classifier; goals: each finding within {GOAL_PREVALENCE_GAP} of the "
          f"held-out phantoms' share and of ddpm-1000's; the heart on the image's right, as a PA film shows the "
          f"patient's left, in >= {GOAL_LATERALITY}):")
    print(census_table(result))
    floor = result["census_floor"]
    if floor:
        n = result["settings"]["num_images"]
        print(f"Real vs real at {n} images ({floor['pairs']} pairs of disjoint held-out sets): largest finding gap "
              f"median {floor['median_gap']:.3f}, max {floor['max_gap']:.3f}; over {GOAL_PREVALENCE_GAP} in "
              f"{floor['share_over_goal']:.0%} of pairs.")


if __name__ == "__main__":
    (arguments,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    print_table(run(lambda: benchmark(arguments)))
