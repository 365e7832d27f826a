"""Train a chest X-ray DDPM: `accelerate launch train.py [--preset demo|lunggen-256] [--config FILE] [--flags]`."""

from lunggen_diffusers.cli import run
from lunggen_diffusers.config import parse_args
from lunggen_diffusers.training import train

if __name__ == "__main__":
    run(lambda: train(parse_args()))
