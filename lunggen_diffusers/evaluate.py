"""`python -m lunggen_diffusers.evaluate`: evaluate generated images. The command is evaluation/cli.py
(`lunggen-evaluate`)."""

from .evaluation.cli import main

if __name__ == "__main__":
    main()
