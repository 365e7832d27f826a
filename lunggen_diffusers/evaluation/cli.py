"""Evaluate generated chest X-rays against real ones and audit them for memorized training images.

    python -m lunggen_diffusers.evaluate --real data/nih-256:validation --fake synth/ --train data/nih-256:train \
        --features raddino --output_dir eval/
    accelerate launch --multi_gpu --num_processes 8 -m lunggen_diffusers.evaluate ...   # the same, sharded

Writes eval/metrics.json (read by the model card), eval/report.md, eval/nearest_pairs.png and
eval/memorized_patients.csv (the last two are local only: they show training images and patient IDs). With
--reid VERIFIER, the re-identification risk and eval/reidentified_patients.csv (local only too).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..cli import parse_args, run
from ..runtime import end_processes
from .run import EvaluationArguments, run_evaluation


def main(argv: Sequence[str] | None = None) -> None:
    (args,) = parse_args(EvaluationArguments, argv)
    run(lambda: _report(args))
    end_processes()


def _report(args: EvaluationArguments) -> dict | None:
    report = run_evaluation(args)
    if report is None:  # not the main process: it wrote nothing and has nothing to say
        return None
    fake_vs_real, floor = report["metrics"]["fake_vs_real"], report["metrics"]["real_vs_real"]
    print(f"FD {fake_vs_real['fd']:.4g} (real-vs-real floor {floor['fd']:.4g}); "
          f"precision {fake_vs_real['precision']:.3f}, recall {fake_vs_real['recall']:.3f}")
    if report["memorization"]:
        mem = report["memorization"]
        print(f"memorization: {mem['num_flagged']} flagged ({mem['flagged_fraction']:.2%}; held-out null "
              f"{mem['null_flagged_fraction']:.2%})")
    if "reidentification" in report["metrics"]:
        r = report["metrics"]["reidentification"]
        print(f"re-identification: {r['share_generated']:.2%} of generated images above the verifier's threshold "
              f"(held-out null {r['share_null']:.2%}){'; FLAGGED' if r['flagged'] else ''}")
    print(f"report written to {args.output_dir}/report.md")
    return report


if __name__ == "__main__":
    main()
