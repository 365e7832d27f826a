"""Publishing: the reproducibility manifest, the model card, and the push to the Hugging Face Hub.

    python -m lunggen_diffusers.hub card lunggen-output [--eval_dir eval/]     # (re)write README.md
    python -m lunggen_diffusers.hub push lunggen-output --repo_id my-org/lunggen-256 [--private false]

One module per concern:
    privacy.py      what is scrubbed, which files may be uploaded, the leak check every published text passes
    manifest.py     manifest.json (config, seed, data summary, versions, commit)
    card.py         the facts a card shows; its wording is the Jinja template model_card.md
    push.py         the private-by-default, allow-listed, single-commit upload
    cli.py          the two commands above
"""

from .card import write_model_card
from .cli import main
from .manifest import write_manifest
from .privacy import files_to_upload, scrub_config
from .push import push_to_hub

__all__ = ["write_manifest", "write_model_card", "push_to_hub", "files_to_upload", "scrub_config", "main"]
