"""Publishing: the reproducibility manifest, the model card, and the push to the Hugging Face Hub.

    python -m lunggen_diffusers.hub card FOLDER [--eval_dir DIR] [--fidelity_dir DIR] [--utility_dir DIR]
    python -m lunggen_diffusers.hub push FOLDER --repo_id my-org/lunggen-256 [--private false] [the same dirs]
    python -m lunggen_diffusers.hub push-dataset SYNTH_DIR --repo_id my-org/lunggen-synthetic [--eval_dir DIR]

The same dirs are keyword arguments of `write_model_card` and `push_to_hub`:
- `eval_dir`: `python -m lunggen_diffusers.evaluate`'s output; the card's Evaluation section is built from the
  `model_card` part of its `metrics.json` (kept as eval_results.json).
- `fidelity_dir` (benchmarks/fidelity_benchmark.py) and `utility_dir` (python -m lunggen_diffusers.utility): each
  must hold a `card_section.md` that starts with a `## ` heading; it is included verbatim after the Evaluation
  section (fidelity, then utility), once it passes the check every published text passes (no local path, no
  patient identifier: refused with one line naming the file and what leaked). A DIR without `card_section.md`
  is refused. Included sections are kept in FOLDER/card_sections/ (never uploaded), so a later `card` or `push`
  without the flag keeps them; a given DIR replaces the kept copy.

One module per concern:
    privacy.py      what is scrubbed, which files may be uploaded, the leak check every published text passes
    card.py         the facts a card shows; its wording is the Jinja template model_card.md
    push.py         the private-by-default, allow-listed, single-commit upload
    export.py       the export folder: pipeline, samples, manifest.json (provenance), card; training and cli use it
    dataset.py      a generated folder as a Hub dataset: refusals, Parquet shards, the dataset card (dataset_card.md)
    cli.py          the three commands above (`main`; the console script lunggen-hub)
"""

from .dataset import push_dataset
from .export import export_pipeline, write_manifest, write_model_card
from .privacy import files_to_upload, scrub_config
from .push import push_to_hub

__all__ = ["export_pipeline", "write_manifest", "write_model_card", "push_to_hub", "push_dataset", "files_to_upload",
           "scrub_config"]
