"""`python -m lunggen_diffusers.autoencoder_report`: judge an autoencoder. The command is
training/autoencoder_report.py (`lunggen-autoencoder-report`)."""

from .training.autoencoder_report import main

if __name__ == "__main__":
    main()
