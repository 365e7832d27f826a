"""Train a chest X-ray DDPM: `accelerate launch train.py [--preset demo|lunggen-256] [--config FILE] [--flags]`."""

from lunggen_diffusers.training.cli import main

if __name__ == "__main__":
    main()
