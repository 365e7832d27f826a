"""Training, both stages on one Accelerate loop: the autoencoder (`autoencoder_stage`, latent route only) and the
diffusion model (`diffusion`); the loop (`loop`), checkpoints (`checkpoints`), the latent cache (`latents`), and the
builders of the UNet and scheduler (`model`) and of the autoencoder (`autoencoder`). Commands: `cli` (lunggen-train)
and `autoencoder_report`.

Import-free on purpose: `--help` answers without loading diffusers; import the submodule you need."""
