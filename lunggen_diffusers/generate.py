"""`python -m lunggen_diffusers.generate`: generate images; the command is generation/cli.py (`lunggen-generate`)."""

from .generation.cli import main

if __name__ == "__main__":
    main()
