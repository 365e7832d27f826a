"""Re-identification on phantom patients with several studies (issue #42): the verifier, the planted check, the cost.

1. The patient verifier (`evaluate --reid`'s default recipe) trained on `--num_train` phantom images of patients with
   NIH's mean of 3.64 studies, judged on `--num_held_out` images of other patients: AUROC (goal >= 0.95), the share
   of same-patient pairs found at a 1% pair false-match rate, training seconds.
2. The planted check: `--num_planted` other studies of training patients (same patient, never a training image)
   must be flagged against the held-out null; as many images of new patients (independent) must not.
3. Scoring cost: `--num_scored` images against `--num_gallery` training images through the evaluation's own path
   (read and embed once each, one matrix product per chunk), seconds.

    python benchmarks/reid_benchmark.py        # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from lunggen_diffusers.data.phantom import draw_study, patients_of, phantom_dataset  # noqa: E402
from lunggen_diffusers.evaluation.features import extract  # noqa: E402
from lunggen_diffusers.evaluation.images import load_source  # noqa: E402
from lunggen_diffusers.evaluation.reid import VerifierRecipe, extractor, reid_risk, train_verifier  # noqa: E402

from common import finish  # noqa: E402  (beside this file)

SEED, PER_PATIENT, FINDING_PROB = 4242, 3.64, 0.1
GOALS = {"auroc": 0.95}


def _folder(path: Path, images) -> str:
    path.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(path / f"image_{i:05d}.png", compress_level=1)
    return str(path)


def _risk(verifier, source, held, train, size: int, cache: str) -> dict:
    ex = {"verifier": extractor(verifier)}
    embed = {name: extract(s, ex, size, cache_dir=cache)["verifier"]
             for name, s in (("set", source), ("held", held), ("train", train))}
    summary, _ = reid_risk(verifier, embed["set"], embed["held"], held.patient_ids, embed["train"],
                           train.patient_ids, source.names())
    keys = ("share_generated", "share_generated_interval", "share_null", "share_null_interval", "flagged",
            "patients_matched", "threshold")
    return {k: summary[k] for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num_train", type=int, default=4000)
    parser.add_argument("--num_held_out", type=int, default=1500)
    parser.add_argument("--num_planted", type=int, default=500)
    parser.add_argument("--num_scored", type=int, default=10_000)
    parser.add_argument("--num_gallery", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=VerifierRecipe.steps)
    parser.add_argument("--output", default="benchmarks/results/reid_benchmark.json")
    args = parser.parse_args()
    size = args.resolution
    work = Path(tempfile.mkdtemp(prefix="reid-benchmark-"))
    try:
        train = phantom_dataset(args.num_train, size, SEED, FINDING_PROB, images_per_patient=PER_PATIENT)
        held = phantom_dataset(args.num_held_out, size, SEED, FINDING_PROB, start_index=args.num_train,
                               images_per_patient=PER_PATIENT)
        datasets.DatasetDict({"train": train, "test": held}).save_to_disk(work / "data")
        train_src, held_src = load_source(f"{work / 'data'}:train"), load_source(f"{work / 'data'}:test")
        counts = np.bincount([p for p, _ in patients_of(SEED, PER_PATIENT, 0, args.num_train)])
        patients = np.flatnonzero(counts)
        # Study numbers after each patient's last training study: images of training patients no set holds.
        planted = [draw_study(SEED, p, counts[p] + i // len(patients), size, FINDING_PROB)[0]
                   for i, p in enumerate(np.resize(patients, args.num_planted))]
        independent = [draw_study(SEED, 10**7 + i, 0, size, FINDING_PROB)[0] for i in range(args.num_planted)]
        sets = {"planted": load_source(_folder(work / "planted", planted)),
                "independent": load_source(_folder(work / "independent", independent))}

        start = time.perf_counter()
        verifier = train_verifier(train_src, held_src, VerifierRecipe(resolution=size, steps=args.steps), size)
        train_seconds = time.perf_counter() - start
        c = verifier.config
        figures = {"auroc": c["auroc"], "true_match_rate_at_1pct_pairs": c["true_match_rate"],
                   "train_images": c["train_images"], "train_patients": c["train_patients"],
                   "held_out_patients": c["held_out_patients"], "train_seconds": round(train_seconds, 1)}
        checks = {name: _risk(verifier, source, held_src, train_src, size, str(work / "cache"))
                  for name, source in sets.items()}

        # Scoring cost at scale: a gallery and a scored set cut from the phantoms already made (the cost does not
        # depend on the pictures), read and embedded through the evaluation's path, then searched.
        rows = np.resize(np.arange(len(train)), args.num_gallery)
        train.select(rows).save_to_disk(work / "gallery")
        scored = np.resize(np.stack([np.asarray(im) for im in held["image"]]), (args.num_scored, size, size))
        scored_src = load_source(_folder(work / "scored", scored))
        gallery_src = load_source(str(work / "gallery"))
        start = time.perf_counter()
        ex = {"verifier": extractor(verifier)}
        gallery = extract(gallery_src, ex, size, cache_dir=str(work / "cost-cache"))["verifier"]
        mine = extract(scored_src, ex, size, cache_dir=str(work / "cost-cache"))["verifier"]
        embedded = time.perf_counter() - start
        verifier.best_matches(mine, gallery)
        scoring = {"num_scored": args.num_scored, "num_gallery": args.num_gallery,
                   "read_and_embed_seconds": round(embedded, 1),
                   "search_seconds": round(time.perf_counter() - start - embedded, 2),
                   "total_seconds": round(time.perf_counter() - start, 1)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    met = {"auroc": figures["auroc"] >= GOALS["auroc"], "planted_flagged": checks["planted"]["flagged"],
           "independent_not_flagged": not checks["independent"]["flagged"]}
    result = {"settings": vars(args), "verifier": figures, "checks": checks, "scoring": scoring, "goals": GOALS,
              "met": met}
    finish(result, args.output, json.dumps({k: result[k] for k in ("verifier", "checks", "scoring", "met")},
                                           indent=2))


if __name__ == "__main__":
    main()
