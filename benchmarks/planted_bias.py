"""Does the subgroup report find a bias we planted, and only then? (issue #29, item 4)

Two conditional demos (findings, sex, age and view) are trained through the project's own commands: one on phantoms
where one subgroup carries every finding at `--factor` times the others' probability (default: women, half), one on
the balanced phantoms. Each generates `--num_images` images with labels drawn from its training split
(`--labels_from train`: a synthetic data set as a user would make one), and `evaluate --subgroups` compares them
with balanced held-out phantoms on the phantom classifier. The biased model must be flagged in that subgroup and the
balanced one nowhere, on the rate of images with any finding (what was planted); every other flag is reported
beside. Every generated image is also read for the patient it was asked for.

    python benchmarks/planted_bias.py --output_dir runs/planted-bias            # about 40 min on 2 CPU cores

Stages are skipped when their output exists, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from lunggen_diffusers.config import parse_args as parse_config  # noqa: E402
from lunggen_diffusers.data.phantom import phantom_dataset  # noqa: E402
from lunggen_diffusers.evaluation.subgroups import ANY_FINDING  # noqa: E402

HELD_OUT_SEED = 12345  # as sampler_benchmark.py: the demo trains on seed 0
CONDITIONS = ["findings", "patient_sex", "patient_age", "view_position"]


def _run(argv: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run([sys.executable, *argv], check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="runs/planted-bias")
    parser.add_argument("--subgroup", default="patient_sex=F")
    parser.add_argument("--factor", type=float, default=0.5)
    parser.add_argument("--num_images", type=int, default=1024)
    parser.add_argument("--num_real", type=int, default=2048)
    parser.add_argument("--max_train_steps", type=int, default=None, help="default: the conditional demo's")
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--subgroups", default="patient_sex,age_bin,view_position")
    args = parser.parse_args()
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    config = parse_config(["--condition_on", *CONDITIONS])
    real = root / "held-out"
    if not real.exists():  # balanced: the population the synthetic data stands in for
        phantom_dataset(args.num_real, config.data.resolution, HELD_OUT_SEED,
                        config.data.phantom_finding_prob).save_to_disk(str(real))
    seconds, results = {}, {}
    for name, planted in (("biased", [f"{args.subgroup}:{args.factor}"]), ("balanced", [])):
        model, synth, report = root / name, root / f"{name}-synthetic", root / f"{name}-eval"
        if not (model / "model_index.json").exists():
            steps = ["--max_train_steps", str(args.max_train_steps)] if args.max_train_steps else []
            scale = ["--phantom_finding_scale", *planted] if planted else []
            seconds[f"{name} training"] = _run(["-m", "lunggen_diffusers.train", "--condition_on", *CONDITIONS,
                                                *scale, *steps, "--output_dir", str(model)], root / f"{name}-train.log")
        if not (synth / "manifest.csv").exists():
            seconds[f"{name} generation"] = _run(
                ["pipeline.py", "--model", str(model), "--output_dir", str(synth), "--num_images",
                 str(args.num_images), "--labels_from", "train", "--batch_size", "64", "--num_inference_steps",
                 str(args.num_inference_steps)], root / f"{name}-generate.log")
        if not (report / "metrics.json").exists():
            seconds[f"{name} evaluation"] = _run(
                ["-m", "lunggen_diffusers.evaluate", "--real", str(real), "--fake", str(synth), "--features",
                 "phantom", "--image_size", str(config.data.resolution), "--subgroups", args.subgroups,
                 "--output_dir", str(report)], root / f"{name}-evaluate.log")
        results[name] = json.loads((report / "metrics.json").read_text())["metrics"]["subgroups"]
    # The check is on prevalence, what was planted: the subgroup's "any finding" gap flagged in the biased model, no
    # subgroup's in the balanced one. Other flags (a subgroup drawn worse, FD) are reported: they are real findings
    # about the generator, not what this check plants.
    planted = f"{args.subgroup}: {ANY_FINDING}"
    prevalence_flags = {n: [f for f in r["flagged"] if f.endswith(f": {ANY_FINDING}")] for n, r in results.items()}
    verdict = {"planted": f"{args.subgroup} x{args.factor}", "prevalence_flags": prevalence_flags,
               "found": planted in prevalence_flags["biased"], "clean": not prevalence_flags["balanced"],
               "all_flags": {n: r["flagged"] for n, r in results.items()},
               "demographic_agreement": {n: r["demographic_agreement"] for n, r in results.items()},
               "seconds": seconds}
    print(json.dumps(verdict, indent=2))
    for name, r in results.items():
        print(f"\n{name}:")
        for group, values in r["groups"].items():
            for value, e in values.items():
                rates = ", ".join(f"{f} {x['real']:.3f}/{x['fake']:.3f} gap {x['gap']:+.3f} "
                                  f"[{x['gap_interval'][0]:+.3f}, {x['gap_interval'][1]:+.3f}]"
                                  for f, x in e.get("findings", {}).items() if f == "any finding")
                print(f"  {group}={value}: n {e['num_real']}/{e['num_fake']}, FD {e['fd']:.1f} gap {e['fd_gap']:+.1f} "
                      f"[{e['fd_gap_interval'][0]:+.1f}, {e['fd_gap_interval'][1]:+.1f}]; {rates}")
    (root / "planted_bias.json").write_text(json.dumps({"verdict": verdict, "reports": results}, indent=2))


if __name__ == "__main__":
    main()
