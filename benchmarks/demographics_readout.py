"""Can a fresh small CNN read the phantom's patient from its pixels? (issue #29, item 1)

The phantom classifier's network and recipe, trained from scratch on `--num_train` phantoms (and their mirrors, its
laterality label) and read on `--num_test` phantoms after them; the goals are sex accuracy >= 0.85, AP/PA >= 0.90
and a correlation of the read age with the true age >= 0.5.

    python benchmarks/demographics_readout.py                 # 3,000 / 1,000 phantoms at 64 px, about a minute
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from lunggen_diffusers.evaluation.phantom_classifier import ClassifierSettings, train_classifier  # noqa: E402

from common import finish  # noqa: E402  (beside this file)

GOALS = {"sex_accuracy": 0.85, "view_accuracy": 0.90, "age_correlation": 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_train", type=int, default=3000)
    parser.add_argument("--num_test", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--output", default="benchmarks/results/demographics_readout.json")
    args = parser.parse_args()
    settings = ClassifierSettings(resolution=args.resolution, num_train=args.num_train, num_test=args.num_test,
                                  steps=args.steps, seed=20_291)  # a seed of its own: not the shipped instrument's
    start = time.perf_counter()
    _, report = train_classifier(settings)
    seconds = time.perf_counter() - start
    figures = {name: report[name] for name in (*GOALS, "age_mean_absolute_error", "laterality_accuracy")}
    figures.update({f"{f}_accuracy": report[f]["accuracy"] for f in ("cardiomegaly", "pleural_effusion", "nodule",
                                                                      "consolidation")})
    met = {name: report[name] >= goal for name, goal in GOALS.items()}
    result = {"settings": vars(args), "figures": figures, "goals": GOALS, "met": met, "seconds": round(seconds, 1)}
    finish(result, args.output, json.dumps({k: result[k] for k in ("figures", "met", "seconds")}, indent=2))


if __name__ == "__main__":
    main()
