"""The downstream classifiers and their training: one fixed budget of optimizer steps, selection on validation.

`resnet`: transformers' `ResNetForImageClassification` built from a `ResNetConfig` (one input channel, small widths
for 64 px on a CPU) or loaded from a checkpoint (`--model_name_or_path`, a Hub id or folder), with
`problem_type="multi_label_classification"` so its loss is the per-finding binary cross-entropy.
`linear`: a linear probe (logistic regression per finding) on cached features of `evaluation.features`.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..evaluation.stats import auroc
from ..networks import fit

CLASSIFIERS = ("resnet", "linear")
_EVAL_BATCH = 256


def build_resnet(num_labels: int, hidden_sizes: list[int], model_name_or_path: str | None = None):
    from transformers import (
        AutoModelForImageClassification,
        ResNetConfig,
        ResNetForImageClassification,
    )

    if model_name_or_path:
        # A new head for our findings; the checkpoint's own head (ImageNet classes, say) is dropped.
        return AutoModelForImageClassification.from_pretrained(
            model_name_or_path, num_labels=num_labels, problem_type="multi_label_classification",
            ignore_mismatched_sizes=True)
    config = ResNetConfig(num_channels=1, embedding_size=hidden_sizes[0], hidden_sizes=list(hidden_sizes),
                          depths=[1] * len(hidden_sizes), layer_type="basic", num_labels=num_labels,
                          problem_type="multi_label_classification")
    return ResNetForImageClassification(config)


class ImageClassifier(torch.nn.Module):
    """uint8 images in, logits out: scales to [-1, 1] on the device and repeats the gray channel for RGB models."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.channels = model.config.num_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div(127.5).sub(1.0)[:, None]
        return self.model(pixel_values=x.expand(-1, self.channels, -1, -1)).logits


class LinearProbe(torch.nn.Module):
    """Standardised features (by the training set's mean and spread) -> one logit per finding."""

    def __init__(self, train_features: np.ndarray, num_labels: int):
        super().__init__()
        features = torch.as_tensor(train_features, dtype=torch.float32)
        self.register_buffer("mean", features.mean(0))
        self.register_buffer("scale", features.std(0).clamp_min(1e-6))
        self.linear = torch.nn.Linear(features.shape[1], num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features.float() - self.mean) / self.scale)


@torch.inference_mode()
def predict(model: torch.nn.Module, inputs: np.ndarray, device) -> np.ndarray:
    """Sigmoid scores (N, findings) for `inputs` (images or features), in eval mode."""
    was_training = model.training
    model.eval()
    out = [torch.sigmoid(model(torch.as_tensor(inputs[start:start + _EVAL_BATCH]).to(device))).float().cpu()
           for start in range(0, len(inputs), _EVAL_BATCH)]
    model.train(was_training)
    return torch.cat(out).numpy()


def macro_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean AUROC over the findings that have both classes (validation splits may lack a rare one)."""
    values = [auroc(labels[:, k], scores[:, k]) for k in range(labels.shape[1])]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def train(model: torch.nn.Module, inputs: np.ndarray, labels: np.ndarray, val_inputs: np.ndarray,
          val_labels: np.ndarray, max_steps: int, batch_size: int, learning_rate: float, eval_steps: int, seed: int,
          device, desc: str) -> tuple[torch.nn.Module, dict]:
    """AdamW for `max_steps` steps of `batch_size` examples drawn in seeded epochs (whatever the training set's
    size, so every regime gets the same budget); the weights with the best validation macro AUROC (checked every
    `eval_steps` and at the end) come back, with the validation curve."""
    model.to(device)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(seed)
    x_all, y_all = torch.as_tensor(inputs), torch.as_tensor(labels)
    best, curve = (-1.0, 0, None), []

    def batches():
        order = torch.empty(0, dtype=torch.int64)
        while True:
            if len(order) < batch_size:
                order = torch.cat([order, torch.randperm(len(inputs), generator=generator)])
            rows, order = order[:batch_size], order[batch_size:]
            yield rows

    def validate(step: int, loss: torch.Tensor) -> None:
        nonlocal best
        if step % eval_steps == 0 or step == max_steps:
            value = macro_auroc(val_labels, predict(model, val_inputs, device))
            curve.append({"step": step, "validation_macro_auroc": value, "train_loss": float(loss.detach())})
            if value > best[0]:
                best = (value, step, copy.deepcopy(model.state_dict()))

    fit(model, batches(), lambda rows: loss_fn(model(x_all[rows].to(device)), y_all[rows].to(device)), learning_rate,
        max_steps, on_step=validate, desc=desc, leave=False)
    model.load_state_dict(best[2])
    return model, {"best_step": best[1], "best_validation_macro_auroc": best[0], "curve": curve}
