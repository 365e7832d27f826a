"""Generate synthetic chest X-rays from a trained LungGen model (local folder or Hub id).

    python pipeline.py --model lunggen-output --num_images 1000 --output_dir synth/ --batch_size 64 --seed 0
    accelerate launch --multi_gpu --num_processes 8 pipeline.py --model my-org/lunggen-256 --num_images 100000 \
        --output_dir synth/ --scheduler ddpm --num_inference_steps 1000 --dtype bf16
    lunggen-generate --model my-org/lunggen-256 --findings "Cardiomegaly,Effusion" --output_dir synth-cm/
"""

from __future__ import annotations

from transformers import HfArgumentParser

from .cli import run
from .runtime import end_processes, process_state
from .sampling import SamplingArguments, sample_from_args


def main(argv: list[str] | None = None) -> list[dict]:
    (args,) = HfArgumentParser(SamplingArguments).parse_args_into_dataclasses(args=argv)
    rows = run(lambda: sample_from_args(args))
    if process_state().is_main_process:
        print(f"{len(rows)} images in {args.output_dir} (manifest.csv, grid.png)")
    end_processes()
    return rows


if __name__ == "__main__":
    main()
