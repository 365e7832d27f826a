"""Downstream utility of synthetic chest X-rays: train on synthetic, test on real (TSTR) against train on real (TRTR).

    python -m lunggen_diffusers.utility --real data/nih-256 --synthetic synth-labeled/ --output_dir utility/

data.py (real splits, labeled synthetic set), classifier.py (transformers ResNet or linear probe, training with
validation selection), stats.py (AUROC, patient bootstrap), report.py (JSON, Markdown, plot, card section),
run.py (regimes x seeds, resumable, Accelerate).
"""
