"""`python -m lunggen_diffusers.train`: train a model; the command is training/cli.py (`lunggen-train`)."""

from .training.cli import main

if __name__ == "__main__":
    main()
