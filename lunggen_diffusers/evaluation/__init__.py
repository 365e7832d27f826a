"""Evaluation of generated chest X-rays: features (`features`), metrics (`metrics`), the memorization audit
(`memorization`), the report (`report`) and one full run (`run`, the CLI is `python -m lunggen_diffusers.evaluate`).

Import-free on purpose: import the submodule you need."""
