"""Generate synthetic chest X-rays from a trained LungGen model (local folder or Hub id).

    python pipeline.py --model lunggen-output --num_images 1000 --output_dir synth/ \
        --scheduler dpmsolver++ --num_inference_steps 25 --batch_size 64 --seed 0
"""

from transformers import HfArgumentParser

from lunggen_diffusers.cli import run
from lunggen_diffusers.sampling import SamplingArguments, sample_from_args


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(SamplingArguments).parse_args_into_dataclasses(args=argv)
    rows = run(lambda: sample_from_args(args))
    print(f"{len(rows)} images in {args.output_dir} (manifest.csv, grid.png)")


if __name__ == "__main__":
    main()
