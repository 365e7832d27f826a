"""python -m lunggen_diffusers.utility --real phantom --synthetic synth-labeled/ --output_dir utility/"""

from __future__ import annotations

from collections.abc import Sequence

from ..cli import parse_args, run
from ..runtime import end_processes
from .run import UtilityArguments, run_utility


def main(argv: Sequence[str] | None = None) -> None:
    (args,) = parse_args(UtilityArguments, argv)
    run(lambda: _report(args))
    end_processes()


def _report(args: UtilityArguments) -> dict:
    result = run_utility(args)
    if result:
        ratio = result.get("tstr_trtr_ratio")
        macro = {name: r["macro"]["auroc"] for name, r in result["regimes"].items()}
        print("macro AUROC on the real test split: " + ", ".join(f"{k} {v:.3f}" for k, v in macro.items())
              + (f"; TSTR/TRTR {ratio['value']:.3f}" if ratio else ""))
        print(f"report written to {args.output_dir}/report.md")
    return result


if __name__ == "__main__":
    main()
