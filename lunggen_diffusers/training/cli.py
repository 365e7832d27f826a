"""Train a chest X-ray DDPM: `lunggen-train`, `python -m lunggen_diffusers.train` or `accelerate launch train.py`,
each taking `[--preset demo|lunggen-256] [--config FILE] [--flags]` (under `accelerate launch` for many processes:
`accelerate launch -m lunggen_diffusers.train ...`)."""

from __future__ import annotations

from collections.abc import Sequence

from ..cli import run
from ..config import parse_args


def main(argv: Sequence[str] | None = None) -> None:
    config = run(lambda: parse_args(argv))
    from .diffusion import train

    run(lambda: train(config))


if __name__ == "__main__":
    main()
