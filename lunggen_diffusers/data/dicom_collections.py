"""Label files of the public DICOM collections, read into the project's vocabulary and joined onto their images by
file name: VinDr-CXR (the Kaggle challenge's `train.csv`, one row per radiologist and finding, or PhysioNet's
`annotations/image_labels_train.csv`, one row per radiologist with a 0/1 column per finding and diagnosis) and the
RSNA Pneumonia Detection Challenge (`stage_2_train_labels.csv`, one row per box). The images themselves go through
`dicom.py` like any DICOM folder.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..cli import UsageError
from ..utils import find_table, read_table, table_columns
from ..vocabulary import NO_FINDING, canonical_finding

LABEL_RULES = ("majority", "any")
VINDR_LABELS = "train.csv"
VINDR_IMAGE_LABELS = ("image_labels_train.csv", "annotations/image_labels_train.csv")  # preferred when present
VINDR_NO_FINDING = "No finding"
RSNA_LABELS = "stage_2_train_labels.csv"
RSNA_CLASSES = "stage_2_detailed_class_info.csv"
# RSNA's three classes: "Normal" is no finding; "No Lung Opacity / Not Normal" is abnormal without opacity, a label
# of its own (never "No Finding"); a box is "Lung Opacity" (the challenge's evidence of pneumonia).
RSNA_NOT_NORMAL = "No Lung Opacity / Not Normal"
RSNA_NO_OPACITY = "No Lung Opacity"  # Target 0 when the class file is absent: normal or not normal, unknown


def _vindr_image_labels(root: Path) -> Path | None:
    return next((path for name in VINDR_IMAGE_LABELS if (path := find_table(root, name))), None)


def is_vindr_folder(root: str | Path) -> bool:
    if _vindr_image_labels(Path(root)):
        return True
    path = find_table(root, VINDR_LABELS)
    return path is not None and {"image_id", "class_name", "rad_id"} <= set(table_columns(path))


def is_rsna_folder(root: str | Path) -> bool:
    return find_table(Path(root), RSNA_LABELS) is not None


def vindr_labels(root: str | Path, rule: str = "majority") -> dict[str, list[str]]:
    """image_id -> its findings (canonical names) under `rule`: "majority", a finding more than half of the image's
    radiologists marked, or "any", a finding at least one marked; [NO_FINDING] when none is."""
    if rule not in LABEL_RULES:
        raise UsageError(f"--vindr_label_rule {rule!r} is not one of: {', '.join(LABEL_RULES)}")
    readers, marked = defaultdict(set), defaultdict(lambda: defaultdict(set))
    image_labels = _vindr_image_labels(Path(root))
    if image_labels:  # image_id, rad_ID, then one 0/1 column per finding or diagnosis (and "No finding")
        for row in read_table(image_labels):
            image, rad = row["image_id"], row.get("rad_ID") or row.get("rad_id")
            readers[image].add(rad)
            for name, value in row.items():
                if name not in ("image_id", "rad_ID", "rad_id", VINDR_NO_FINDING) and value.strip() in ("1", "1.0"):
                    marked[image][canonical_finding(name, "vindr")].add(rad)
    else:
        for row in read_table(find_table(Path(root), VINDR_LABELS)):
            readers[row["image_id"]].add(row["rad_id"])
            if row["class_name"] != VINDR_NO_FINDING:
                marked[row["image_id"]][canonical_finding(row["class_name"], "vindr")].add(row["rad_id"])
    labels = {}
    for image, rads in readers.items():
        need = len(rads) // 2 + 1 if rule == "majority" else 1
        labels[image] = sorted(f for f, who in marked[image].items() if len(who) >= need) or [NO_FINDING]
    return labels


def rsna_labels(root: str | Path) -> dict[str, list[str]]:
    """patientId (one image each) -> its labels: "Lung Opacity" with any box; without a box "No Finding" for the
    class "Normal", RSNA_NOT_NORMAL for "No Lung Opacity / Not Normal", or RSNA_NO_OPACITY when the class file
    (stage_2_detailed_class_info.csv) is absent and the two cannot be told apart."""
    root = Path(root)
    classes = {}
    if find_table(root, RSNA_CLASSES):
        classes = {row["patientId"]: row["class"] for row in read_table(find_table(root, RSNA_CLASSES))}
    boxed = defaultdict(bool)
    for row in read_table(find_table(root, RSNA_LABELS)):
        boxed[row["patientId"]] |= row["Target"] == "1"
    labels = {}
    for image, opacity in boxed.items():
        if opacity:
            labels[image] = ["Lung Opacity"]
        elif image in classes:
            labels[image] = [NO_FINDING] if classes[image] == "Normal" else [RSNA_NOT_NORMAL]
        else:
            labels[image] = [RSNA_NO_OPACITY]
    return labels
