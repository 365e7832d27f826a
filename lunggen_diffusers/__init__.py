"""LungGen-Diffusers: train, sample, evaluate and publish chest X-ray DDPMs with Hugging Face Diffusers."""

__version__ = "0.1.0"
