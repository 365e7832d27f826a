"""Typed records that cross module borders: what a run trained on and how the run went.

Data produces `DataSummary`, training adds `RunSummary`, and the Hub code writes both into `manifest.json`; none of
them carries a patient ID or a local path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .cli import UsageError


@dataclass(frozen=True)
class DataSummary:
    source: str  # a short description ("the built-in procedural chest phantom"), never a path
    split: str
    num_images: int
    fingerprint: str  # changes whenever the prepared training images do
    image_list_sha256: str | None  # digest of the sorted image (or patient) IDs: comparable, not reversible to IDs
    # Images per subgroup value ({"patient_sex": {"F": 870, "M": 1130}}; "unknown" where a row lacks it): counts only.
    demographics: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self):
        if os.path.isabs(self.source) or Path(self.source).exists():
            raise UsageError(f"DataSummary source {self.source!r} is a path; give a short description instead")


@dataclass(frozen=True)
class RunSummary:
    global_step: int
    final_loss: float
    wall_time_s: float
    hardware: str
