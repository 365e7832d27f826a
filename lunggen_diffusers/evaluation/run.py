"""One evaluation run: read the image sets, embed them (cached), score generated against real images next to the
real-vs-real floor, measure diversity, audit memorization against the training set, and write the report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .. import __version__
from ..cli import UsageError
from ..runtime import process_device, process_state
from ..utils import split_spec
from ..vocabulary import finding_lists, subgroup_columns
from .features import DEFAULT_FEATURE_MODEL, extract, get_extractor
from .images import ImageSource, load_source
from .memorization import audit, matched_patients
from .metrics import (
    frechet_distance,
    kernel_inception_distance,
    mean_pairwise_ms_ssim,
    ms_ssim_scales,
    prdc,
    random_pairs,
)
from .reid import VerifierRecipe, reid_risk, verifier_for
from .reid import extractor as reid_extractor
from .report import nearest_pairs_image, write_report
from .subgroups import (
    ANY_FINDING,
    dataset_metadata,
    demographic_agreement,
    finding_matrix,
    manifest_metadata,
    parse_subgroups,
    subgroup_report,
)


@dataclass
class EvaluationArguments:
    real: str = field(metadata={"help": "Held-out real images: an image folder or a saved dataset, PATH[:SPLIT]. "
                                        "Patient-disjoint from --train; also the memorization audit's null."})
    fake: str = field(metadata={"help": "Generated images: an image folder or a saved dataset, PATH[:SPLIT]."})
    train: str | None = field(default=None, metadata={"help": "Training images for the memorization audit "
                                                              "(PATH[:SPLIT]); no audit without it."})
    output_dir: str = field(default="eval", metadata={"help": "Where metrics.json, report.md and images go."})
    features: Literal["raddino", "pixels", "inception", "phantom"] = field(
        default="raddino", metadata={"help": "Feature extractor for FD, KID, PRDC and the feature similarity."})
    feature_model: str = field(default=DEFAULT_FEATURE_MODEL, metadata={
        "help": "raddino: Hub id or local folder of a transformers image encoder; inception: optional local "
                "weights file for torch-fidelity."})
    image_size: int = field(default=256, metadata={"help": "Every image is converted to L and resized to this."})
    batch_size: int = field(default=32, metadata={"help": "Images per feature-extraction batch."})
    k: int = field(default=5, metadata={"help": "Nearest neighbours for precision/recall/density/coverage."})
    null_percentile: float = field(default=99.9, metadata={
        "help": "Flag a generated image whose similarity exceeds this percentile of the held-out null."})
    top_k: int = field(default=16, metadata={"help": "Closest generated/training pairs shown in nearest_pairs.png."})
    audit_size: int = field(default=64, metadata={"help": "Side of the downsampled images the pixel NCC compares."})
    max_shift: int = field(default=2, metadata={"help": "NCC is maximised over shifts up to this many audit pixels."})
    chunk_size: int = field(default=4096, metadata={
        "help": "Rows per block of the audit's similarity products: device memory is chunk_size^2 floats; processes "
                "split the training set in whole blocks."})
    diversity_pairs: int = field(default=500, metadata={"help": "Random image pairs for the MS-SSIM diversity."})
    kid_subsets: int = field(default=100, metadata={"help": "Random subsets averaged by KID."})
    kid_subset_size: int = field(default=1000, metadata={"help": "Rows per KID subset (capped by the set sizes)."})
    cache_dir: str | None = field(default=None, metadata={
        "help": "Feature cache (default ~/.cache/lunggen_diffusers/features)."})
    device: str | None = field(default=None, metadata={"help": "torch device; default: CUDA, then MPS, then the CPU."})
    seed: int = field(default=0, metadata={"help": "Seed of every random choice (halves, pairs, KID subsets)."})
    subgroups: str | None = field(default=None, metadata={
        "help": "Also report every figure per subgroup: comma-separated, of patient_sex, age_bin, view_position "
                "(--real a saved dataset with those columns; generated subgroups from manifest.csv's labels)."})
    subgroup_bootstrap: int = field(default=200, metadata={
        "help": "Patient resamples for the subgroup intervals (Bonferroni-adjusted over subgroups)."})
    reid: str | None = field(default=None, metadata={
        "help": "Re-identification risk: a patient-verifier folder. Absent, one is trained there on --train's "
                "patients and judged on --real's (local only: it holds the training set's embeddings)."})
    reid_backbone: Literal["cnn", "raddino"] = field(default="cnn", metadata={
        "help": "Verifier trained with --reid: a small CNN, or a head over frozen --feature_model features "
                "(RAD-DINO; a local folder works offline)."})
    reid_steps: int = field(default=1000, metadata={"help": "Training steps of a verifier trained with --reid."})


def _check(args: EvaluationArguments) -> None:
    positive = ("image_size", "batch_size", "k", "audit_size", "chunk_size", "diversity_pairs", "kid_subsets",
                "kid_subset_size", "subgroup_bootstrap", "reid_steps")
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.null_percentile < 100:
        raise UsageError(f"--null_percentile must lie strictly between 0 and 100, got {args.null_percentile}")
    if args.top_k < 0 or args.max_shift < 0:
        raise UsageError(f"--top_k and --max_shift must be >= 0, got {args.top_k} and {args.max_shift}")
    if args.audit_size <= 2 * args.max_shift:
        raise UsageError(f"--audit_size {args.audit_size} must exceed 2 * --max_shift ({2 * args.max_shift})")
    ms_ssim_scales(args.image_size, args.image_size)
    parse_subgroups(args.subgroups)
    if args.reid and not args.train:
        raise UsageError(f"--reid {args.reid} needs --train: the risk is measured against the training patients")


def split_halves(n: int, patient_ids: list[str] | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of range(n), patient-disjoint when patient IDs are known (whole patients are dealt, in random
    order, to the smaller half), else a random split of the indices."""
    rng = np.random.default_rng(seed)
    if patient_ids is None:
        order = rng.permutation(n)
        return np.sort(order[: n // 2]), np.sort(order[n // 2:])
    by_patient: dict[str, list[int]] = {}
    for i, patient in enumerate(patient_ids):
        by_patient.setdefault(patient, []).append(i)
    if len(by_patient) < 2:
        raise UsageError("the real images come from a single patient; a real-vs-real floor needs at least two")
    halves: tuple[list[int], list[int]] = ([], [])
    for patient in rng.permutation(sorted(by_patient)):
        min(halves, key=len).extend(by_patient[patient])
    return np.array(sorted(halves[0])), np.array(sorted(halves[1]))


def distribution_metrics(real: np.ndarray, fake: np.ndarray, args: EvaluationArguments) -> dict[str, float]:
    kid, kid_std = kernel_inception_distance(real, fake, args.kid_subsets, args.kid_subset_size, args.seed)
    return {"fd": frechet_distance(real, fake), "kid": kid, "kid_std": kid_std, **prdc(real, fake, args.k)}


def diversity(source: ImageSource, args: EvaluationArguments) -> float:
    pairs = random_pairs(len(source), args.diversity_pairs, args.seed)
    used = np.unique(pairs)
    return mean_pairwise_ms_ssim(source.read(used, args.image_size), np.searchsorted(used, pairs))


def _check_disjoint(real: ImageSource, train: ImageSource) -> None:
    if real.fingerprint == train.fingerprint:
        raise UsageError(f"--real {real.spec} and --train {train.spec} are the same images; the audit's null needs "
                         "held-out images")
    if real.patient_ids and train.patient_ids:
        shared = set(real.patient_ids) & set(train.patient_ids)
        if shared:
            raise UsageError(f"--real and --train share {len(shared)} patient(s); the audit's null needs held-out "
                             "patients (use a patient-wise split)")


def _metadata(source: ImageSource, side: str) -> dict[str, list]:
    if source._dataset is not None:
        return dataset_metadata(source)
    if side == "real":
        raise UsageError(f"--subgroups needs --real as a saved dataset with patient_sex / patient_age / view_position "
                         f"columns; {source.spec} is an image folder")
    return manifest_metadata(source, str(split_spec(source.spec)[0]))


def subgroup_figures(args: EvaluationArguments, real: ImageSource, fake: ImageSource, real_f: np.ndarray,
                     fake_f: np.ndarray) -> dict:
    """The subgroup report: figures per subgroup, finding rates (read by the phantom classifier on both sides
    with --features phantom, else the real labels against what the generated images were asked for), and, on
    phantom features, whether generated images show the patient they were asked for."""
    groups = parse_subgroups(args.subgroups)
    meta = {"real": _metadata(real, "real"), "fake": _metadata(fake, "fake")}
    found = {side: subgroup_columns(m) for side, m in meta.items()}
    values = {side: {g: found[side].get(g, [""] * len(source)) for g in groups}
              for side, source in (("real", real), ("fake", fake))}
    missing = [g for g in groups if g not in found["real"]]
    if missing:
        raise UsageError(f"--subgroups {','.join(missing)}: --real {real.spec} has no such column (patient_sex, "
                         "patient_age or age_bin, view_position)")
    extra = {}
    if args.features == "phantom":
        from .phantom_classifier import FINDINGS, load_classifier

        classifier = load_classifier(device="cpu")
        read = {side: classifier.predict(np.concatenate(list(source.batches(args.image_size, args.batch_size))))
                for side, source in (("real", real), ("fake", fake))}
        findings = list(FINDINGS)
        matrices = {side: (r[:, :len(FINDINGS)] >= 0.5).astype(np.float64) for side, r in read.items()}
        extra["findings_read_by"] = "the phantom classifier, on both sides"
        extra["demographic_agreement"] = demographic_agreement(read["fake"], found["fake"])  # all groups asked
    else:
        findings = sorted({f for row in meta["real"].get("finding_labels", []) for f in finding_lists([row])[0]})
        matrices = {side: finding_matrix(m, findings) if "finding_labels" in m else None for side, m in meta.items()}
        extra["findings_read_by"] = "labels: the real set's, and what each generated image was asked for"
    if all(m is not None for m in matrices.values()) and findings:
        # "Any finding" is the label underdiagnosis turns on (Seyyed-Kalantari et al. 2021), and pools the
        # findings' evidence: a subgroup given half of every finding shows most clearly there.
        findings = [*findings, ANY_FINDING]
        matrices = {side: np.concatenate([m, m.max(1, keepdims=True)], 1) for side, m in matrices.items()}
    report = subgroup_report(real_f, fake_f, values["real"], values["fake"], real.patient_ids, matrices["real"],
                             matrices["fake"], findings, args.k, args.subgroup_bootstrap, args.seed)
    return {**report, **extra}


def run_evaluation(args: EvaluationArguments) -> dict | None:
    """Evaluate and write `output_dir/{metrics.json, report.md, nearest_pairs.png, memorized_patients.csv}`.

    Under `accelerate launch` every process embeds its share of each image set and searches its share of the
    training set; the main process alone scores, writes and returns the report (the others return None)."""
    _check(args)
    state = process_state()
    device = args.device or process_device(state)
    real, fake = load_source(args.real), load_source(args.fake)
    train = load_source(args.train) if args.train else None
    if train is not None:
        _check_disjoint(real, train)
    with state.main_process_first():  # a Hub encoder is downloaded once, then read from the cache by the others
        extractor = get_extractor(args.features, args.feature_model, device, args.batch_size)
    wanted = {"features": extractor}
    if train is not None:
        wanted["pixels"] = get_extractor("pixels", pixel_size=args.audit_size)
    verifier = None
    if args.reid:
        recipe = VerifierRecipe(args.reid_backbone, args.feature_model, steps=args.reid_steps, seed=args.seed)
        with state.main_process_first():  # the main process trains and saves it; the others load it
            verifier = verifier_for(args.reid, train, real, recipe, args.image_size, args.cache_dir, device)
        wanted["verifier"] = reid_extractor(verifier)
    embed = {name: extract(source, wanted, args.image_size, args.batch_size, args.cache_dir)
             for name, source in (("real", real), ("fake", fake), ("train", train)) if source is not None}
    real_f, fake_f = embed["real"]["features"], embed["fake"]["features"]
    if min(len(real_f), len(fake_f)) < 2 * (args.k + 1):
        raise UsageError(f"need at least {2 * (args.k + 1)} real and generated images for k={args.k}, got "
                         f"{len(real_f)} real and {len(fake_f)} generated")
    result = None
    if train is not None:
        result = audit(embed["fake"]["pixels"], fake_f, embed["real"]["pixels"], real_f, embed["train"]["pixels"],
                       embed["train"]["features"], args.null_percentile, args.max_shift, args.chunk_size, device)
    if not state.is_main_process:
        return None

    half_a, half_b = split_halves(len(real), real.patient_ids, args.seed)
    same_size = np.sort(np.random.default_rng(args.seed).choice(len(fake_f), min(len(half_b), len(fake_f)), False))
    notes = []
    if real.patient_ids is None:
        notes.append("--real has no patient_id column: its halves are a random split of images, so one patient can "
                     "sit in both and the real-vs-real floor is optimistic.")
    metrics = {
        "fake_vs_real": distribution_metrics(real_f, fake_f, args),
        "fake_vs_real_half": distribution_metrics(real_f[half_a], fake_f[same_size], args),
        "real_vs_real": distribution_metrics(real_f[half_a], real_f[half_b], args),
        "diversity": {"ms_ssim_fake": diversity(fake, args), "ms_ssim_real": diversity(real, args),
                      "scales": ms_ssim_scales(args.image_size, args.image_size)},
    }
    counts = {"real": len(real), "fake": len(fake), "train": len(train) if train else 0,
              "real_half_a": len(half_a), "real_half_b": len(half_b)}
    patients, pairs = None, None
    if result is not None:
        ids = train.patient_ids or [f"image-{i}" for i in range(len(train))]
        patients = matched_patients(result, ids)
        if train.patient_ids is None:
            notes.append("--train has no patient_id column: matches are counted per training image, and --real "
                         "cannot be checked to be patient-disjoint from it.")
        if len(real) < 100 / (100 - args.null_percentile):
            notes.append(f"the null has {len(real)} images, fewer than the {100 / (100 - args.null_percentile):.0f} "
                         f"a {args.null_percentile}th percentile needs: the threshold is close to the null's maximum.")
        pairs = nearest_pairs_image(fake, train, result, args.top_k, args.image_size)
    if args.subgroups:
        metrics["subgroups"] = subgroup_figures(args, real, fake, real_f, fake_f)
    reid_rows = None
    if verifier is not None:
        metrics["reidentification"], reid_rows = reid_risk(
            verifier, embed["fake"]["verifier"], embed["real"]["verifier"], real.patient_ids,
            embed["train"]["verifier"], train.patient_ids, fake.names(), args.seed)
    recipe = {**asdict(args), "device": device, "extractor": extractor.description, "extractor_id": extractor.identity,
              "grayscale": "every image converted to L and centre-cropped/resized (antialiased) to image_size",
              "real_split": "patient-disjoint halves" if real.patient_ids else "random image halves",
              "matched_by": "patient" if train is not None and train.patient_ids else "image",
              "lunggen_diffusers": __version__}
    return write_report(Path(args.output_dir), recipe, counts, metrics, result, patients, pairs, notes, reid_rows)
