"""The utility run: regimes x seeds, each trained once (resumable), then the report on the real test split.

Several processes (`accelerate launch --num_processes N -m lunggen_diffusers.utility ...`) split the (regime, seed)
runs between them rather than training one classifier with DDP: the runs are independent and small, so this
needs no gradient exchange, and each run's result does not depend on how many processes there were. The main
process writes the report once all runs are on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cli import UsageError
from ..evaluation.subgroups import parse_subgroups
from ..utils import atomic_path, stable_hash, write_json
from .classifier import (
    CLASSIFIERS,
    ImageClassifier,
    LinearProbe,
    build_resnet,
    predict,
    train,
)
from .data import ImageSet, patient_rows, real_splits, synthetic_set
from .report import REGIMES, summarize, write_report
from .subgroups import subgroup_summary

_FEATURE_BATCH = 64


@dataclass
class UtilityArguments:
    real: str = field(metadata={"help": "'phantom' (the conditional demo's data) or a prepared dataset folder with "
                                        "train, validation and test splits."})
    synthetic: str = field(metadata={"help": "A pipeline.py output folder of a conditional model (manifest labels)."})
    output_dir: str = field(default="utility", metadata={"help": "utility.json, report.md, utility.png, "
                                                                 "card_section.md and the runs."})
    classifier: str = field(default="resnet", metadata={"help": "resnet (transformers ResNet) or linear (a probe "
                                                                "on --features)."})
    features: str = field(default="pixels", metadata={
        "help": "Linear probe: a feature extractor of lunggen_diffusers.evaluation.features (pixels, raddino)."})
    feature_model: str | None = field(default=None, metadata={"help": "Linear probe: the extractor's model (Hub id "
                                                                      "or folder)."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "resnet: start from this image-classification checkpoint (Hub id or folder) instead of from scratch."})
    hidden_sizes: list[int] = field(default_factory=lambda: [16, 32, 64, 128], metadata={
        "help": "resnet from scratch: channels per stage (one basic block each)."})
    resolution: int = field(default=64, metadata={"help": "Image size the classifier sees (px)."})
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps, the same for every regime."})
    batch_size: int = field(default=32)
    learning_rate: float = field(default=1e-3)
    eval_steps: int = field(default=50, metadata={"help": "Validation macro AUROC every N steps (and at the end)."})
    seeds: int = field(default=3, metadata={"help": "Runs per regime, seeds 0..N-1."})
    regimes: list[str] = field(default_factory=lambda: list(REGIMES), metadata={
        "help": f"Any of: {', '.join(REGIMES)}."})
    low_data_fraction: float = field(default=0.1, metadata={"help": "Share of real training patients in the "
                                                                    "low-data regimes."})
    split_seed: int = field(default=0, metadata={"help": "Seed choosing the low-data patients (apart from --seeds)."})
    bootstrap: int = field(default=1000, metadata={"help": "Patient resamples for the 95%% intervals."})
    cpu_threads: int | None = field(default=None, metadata={
        "help": "Threads per process on CPU (default: the machine's cores shared by its processes). On a busy machine "
                "1 can be much faster: these models are too small to amortise threads waiting for a core."})
    min_positives: int = field(default=10, metadata={"help": "Fewest positive (and negative) test images a finding "
                                                             "needs for an AUROC."})
    subgroups: str | None = field(default=None, metadata={
        "help": "Also report every regime per subgroup of the real test split (comma-separated, of patient_sex, "
                "age_bin, view_position): macro AUROC and the underdiagnosis rate, with gaps to everyone."})


def check_arguments(args: UtilityArguments) -> None:
    if args.classifier not in CLASSIFIERS:
        raise UsageError(f"--classifier {args.classifier!r} is not one of: {', '.join(CLASSIFIERS)}")
    unknown = [r for r in args.regimes if r not in REGIMES]
    if unknown or not args.regimes:
        raise UsageError(f"--regimes {' '.join(unknown) or '(none)'}: choose from {', '.join(REGIMES)}")
    for name in ("max_steps", "batch_size", "eval_steps", "seeds", "bootstrap", "min_positives"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} {getattr(args, name)} must be a positive integer")
    if args.resolution < 16:
        raise UsageError(f"--resolution {args.resolution} must be at least 16")
    if not 0 < args.low_data_fraction <= 1:
        raise UsageError(f"--low_data_fraction {args.low_data_fraction} must be in (0, 1]")
    parse_subgroups(args.subgroups)


def regime_parts(name: str, real_train: ImageSet, synthetic: ImageSet, fraction: float,
                 seed: int) -> list[tuple[str, np.ndarray]]:
    """A regime's training set as (base set, rows) parts of the real 'train' split and the 'synthetic' set."""
    real_rows = (patient_rows(real_train.patients, fraction, seed) if name.startswith("low-real")
                 else np.arange(len(real_train)))
    parts = [("train", real_rows)] if name != "synthetic" else []
    return parts + ([("synthetic", np.arange(len(synthetic)))] if name.endswith("synthetic") else [])


def check_test_positives(test: ImageSet, findings: list[str], minimum: int) -> dict[str, int]:
    positives = {f: int(test.labels[:, k].sum()) for k, f in enumerate(findings)}
    for f, n in positives.items():
        for what, count in (("positive", n), ("negative", len(test) - n)):
            if count < minimum:
                raise UsageError(f"the real test split has {count} {what} image(s) for {f!r}: an AUROC needs at "
                                 f"least --min_positives {minimum} of each")
    return positives


def _digest(data: ImageSet) -> str:
    h = hashlib.sha256(np.ascontiguousarray(data.images).tobytes())
    h.update(data.labels.tobytes())
    h.update("\n".join(data.patients).encode())
    return h.hexdigest()[:16]


def _features(sets: dict[str, ImageSet], args: UtilityArguments, device, cache: Path) -> dict[str, np.ndarray]:
    """Linear probe inputs: each set's features, cached under the output folder by the set's content."""
    from ..evaluation.features import get_extractor

    extractor = get_extractor(args.features, args.feature_model, device=str(device))
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, data in sets.items():
        path = cache / f"{name}-{stable_hash([extractor.identity, _digest(data)])}.npy"
        if path.exists():
            out[name] = np.load(path)
            continue
        out[name] = np.concatenate([extractor.embed(data.images[start:start + _FEATURE_BATCH])
                                    for start in range(0, len(data), _FEATURE_BATCH)]).astype(np.float32)
        with atomic_path(path) as temporary:
            np.save(temporary, out[name])
    return out


def _model(args: UtilityArguments, inputs: np.ndarray, num_labels: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if args.classifier == "linear":
        return LinearProbe(inputs, num_labels)
    return ImageClassifier(build_resnet(num_labels, args.hidden_sizes, args.model_name_or_path))


def _run_settings(args: UtilityArguments, data_key: str) -> dict:
    """What a finished run depends on: a run on disk with other settings is refused, not silently reused."""
    keep = ("classifier", "features", "feature_model", "model_name_or_path", "hidden_sizes", "resolution",
            "max_steps", "batch_size", "learning_rate", "eval_steps", "low_data_fraction", "split_seed")
    return {**{k: getattr(args, k) for k in keep}, "data": data_key}


def _scores_path(path: Path, split: str) -> Path:
    return path.with_suffix(".npy") if split == "test" else path.with_suffix(f".{split}.npy")


def _load_run(path: Path, settings: dict) -> dict | None:
    if not path.exists() or not all(_scores_path(path, split).exists() for split in ("validation", "test")):
        return None  # a run from before validation scores were kept is trained again
    run = json.loads(path.read_text())
    if run["settings"] != settings:
        changed = sorted(k for k in settings if run["settings"].get(k) != settings[k])
        raise UsageError(f"--output_dir {path.parents[2]} holds runs made with other settings ({', '.join(changed)}); "
                         f"use a new --output_dir or the same settings to resume")
    return run


def _subgroups(args: UtilityArguments, test: ImageSet) -> dict[str, list[str]]:
    wanted = parse_subgroups(args.subgroups)
    missing = [g for g in wanted if g not in test.groups]
    if missing:
        raise UsageError(f"--subgroups {','.join(missing)}: the real test split has no such column (patient_sex, "
                         "patient_age or age_bin, view_position)")
    return {g: test.groups[g] for g in wanted}


def run_utility(args: UtilityArguments) -> dict:
    from accelerate import Accelerator

    from ..runtime import check_world_size, set_cpu_threads

    check_arguments(args)
    started = time.time()
    accelerator = Accelerator()
    check_world_size(accelerator)
    if accelerator.device.type == "cpu":
        set_cpu_threads(args.cpu_threads, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    real, findings, description = real_splits(args.real, args.resolution)
    positives = check_test_positives(real["test"], findings, args.min_positives)
    groups = _subgroups(args, real["test"]) if args.subgroups else None
    synthetic = synthetic_set(args.synthetic, findings, args.resolution)
    sets = {**real, "synthetic": synthetic}
    output_dir = Path(args.output_dir)
    with accelerator.main_process_first():  # the others read the cache the main process wrote
        inputs = (_features(sets, args, accelerator.device, output_dir / "features") if args.classifier == "linear"
                  else {name: data.images for name, data in sets.items()})
    data_key = stable_hash([_digest(data) for data in sets.values()])
    settings = _run_settings(args, data_key)
    jobs = [(name, seed) for name in args.regimes for seed in range(args.seeds)]
    for name, seed in jobs[accelerator.process_index::accelerator.num_processes]:
        path = output_dir / "runs" / name / f"seed-{seed}.json"
        if _load_run(path, settings) is not None:
            continue  # finished earlier: a regime is never trained twice
        parts = regime_parts(name, real["train"], synthetic, args.low_data_fraction, args.split_seed)
        x = np.concatenate([inputs[base][rows] for base, rows in parts])
        y = np.concatenate([sets[base].labels[rows] for base, rows in parts])
        run_started = time.time()
        model = _model(args, x, len(findings), seed)
        model, log = train(model, x, y, inputs["validation"], real["validation"].labels, args.max_steps,
                           args.batch_size, args.learning_rate, args.eval_steps, seed, accelerator.device,
                           desc=f"{name} seed {seed}")
        path.parent.mkdir(parents=True, exist_ok=True)
        for split in ("validation", "test"):  # validation's: where the subgroup report's operating point is chosen
            with atomic_path(_scores_path(path, split)) as temporary:
                np.save(temporary, predict(model, inputs[split], accelerator.device))
        write_json(path, {**log, "settings": settings, "seed": seed, "num_train_images": len(x),
                          "wall_time_s": round(time.time() - run_started, 1)})  # last: marks the run finished
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    runs = {name: [_load_run(output_dir / "runs" / name / f"seed-{seed}.json", settings)
                   for seed in range(args.seeds)] for name in args.regimes}
    scores = {split: {name: [np.load(_scores_path(output_dir / "runs" / name / f"seed-{seed}.json", split))
                             for seed in range(args.seeds)] for name in args.regimes}
              for split in ("validation", "test")}
    result = summarize(real["test"].labels, real["test"].patients, scores["test"], findings, args.bootstrap,
                       args.split_seed)
    if groups:
        result["subgroups"] = subgroup_summary(real["test"].labels, real["test"].patients, groups, scores["test"],
                                               args.bootstrap, args.split_seed, real["validation"].labels,
                                               scores["validation"])
    low = real["train"].subset(patient_rows(real["train"].patients, args.low_data_fraction, args.split_seed))
    result.update(
        settings={**{k: v for k, v in asdict(args).items() if k not in ("real", "synthetic", "output_dir")},
                  "pretrained": bool(args.model_name_or_path)},
        data={"real": description, "findings": findings, "test_positives": positives,
              "num_images": {**{s: len(d) for s, d in sets.items()}, "low-real": len(low)},
              "num_patients": {s: len(set(d.patients)) for s, d in {**real, "low-real": low}.items()}},
        bootstrap={"resamples": args.bootstrap, "unit": "patient", "seed": args.split_seed},
        runs={name: {"seeds": list(range(args.seeds)), "best_steps": [r["best_step"] for r in rs],
                     "best_validation": [r["best_validation_macro_auroc"] for r in rs],
                     "train_wall_time_s": [r["wall_time_s"] for r in rs]} for name, rs in runs.items()},
        wall_time_s=round(time.time() - started, 1),
    )
    write_report(output_dir, result)
    return result
