"""Generation: loading a model and choosing its scheduler, the reproducible sampling loop (`sampling`), the folder of
generated images with its manifest and grid (`output_folder`), and the command (`cli`: lunggen-generate, pipeline.py).

Import-free on purpose: import the submodule you need."""
