"""`python -m lunggen_diffusers.edit`: counterfactual editing; the command is generation/edit.py (`lunggen-edit`)."""

from .generation.edit import main

if __name__ == "__main__":
    main()
