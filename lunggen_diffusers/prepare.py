"""`python -m lunggen_diffusers.prepare`: prepare a source once; the command is data/prepare.py (`lunggen-prepare`)."""

from .data.prepare import main

if __name__ == "__main__":
    main()
