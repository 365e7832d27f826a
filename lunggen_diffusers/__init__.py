"""LungGen-Diffusers: train, sample, evaluate and publish chest X-ray DDPMs with Hugging Face Diffusers."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import lunggen_diffusers` (and every CLI's start-up) does not pay for importing diffusers.
    if name == "LungGenPipeline":
        from .lunggen_pipeline import LungGenPipeline

        return LungGenPipeline
    raise AttributeError(f"module 'lunggen_diffusers' has no attribute {name!r}")
