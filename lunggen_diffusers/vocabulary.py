"""The one label vocabulary: finding names, each collection's aliases, and the names of the places labels live.

Four things are called "labels" in this project; each has its own name here:
- `FINDINGS_COLUMN` ("finding_labels"): a dataset's metadata column, a list of finding names per image (NIH's
  "A|B" text is split on read); "No Finding" alone when there is none.
- `CONDITION_COLUMNS`: the dataset columns a `--condition_on` choice reads (findings, view position, sex, age).
- the condition vector: what the UNet takes, laid out by `LabelSpace` (lunggen_pipeline.py): a multi-hot block of
  the model's findings, a one-hot block per extra condition, then the null ("unconditioned") entry.
- `MANIFEST_LABELS` ("labels"): the column of a generated folder's manifest.csv holding what each image was asked
  for, "|"-joined (`label_cell`), `NO_FINDING` for none, `UNCONDITIONED` for the null condition.

"No Finding" has one spelling (`NO_FINDING`); names match whatever their case, spaces, "_" or "-" (`normalize`).
"""

from __future__ import annotations

from collections.abc import Iterable

# Defined in the pipeline file, which must stay self-contained (it ships as remote code): one definition each.
from .lunggen_pipeline import NO_FINDING, normalize

FINDINGS_COLUMN = "finding_labels"
# --condition_on choices; findings always among them. `source` needs several --train_data_dir folders.
CONDITIONS = ("findings", "view_position", "patient_sex", "patient_age", "source")
CONDITION_COLUMNS = dict(zip(CONDITIONS, (FINDINGS_COLUMN, "view_position", "patient_sex", "patient_age", "source"),
                             strict=True))
# Age enters conditioning and subgroup figures as these bins (lower bounds, years), not as a number: a bin is a
# one-hot block with its own null entry like sex and view, the bins are the groups subgroup reports read, and
# NIH's few implausible ages cannot drag an embedding.
AGE_BINS = (0, 18, 40, 60, 80)
AGE_BIN_NAMES = tuple(f"{lo}-{hi - 1}" for lo, hi in zip(AGE_BINS, AGE_BINS[1:], strict=False)) + (f"{AGE_BINS[-1]}+",)
# Subgroups a report can split by: the name `--subgroups` takes -> its values (a dataset may hold others, which
# are reported as found).
SUBGROUPS = {"patient_sex": ("M", "F"), "age_bin": AGE_BIN_NAMES, "view_position": ("PA", "AP")}
SUBGROUP_COLUMNS = ("patient_sex", "patient_age", "age_bin", "view_position")  # the metadata those are read from
MANIFEST_LABELS = "labels"
UNCONDITIONED = "unconditioned"

# Canonical finding names: NIH ChestX-ray14's fourteen, as NIH spells them, then what other collections add
# (CheXpert; VinDr-CXR; RSNA Pneumonia's two labels for images without opacity, which are not "No Finding").
FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
    "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "Pleural Other", "Support Devices",
    "Aortic Enlargement", "Calcification", "ILD", "Nodule/Mass", "Other Lesion",
    "No Lung Opacity / Not Normal", "No Lung Opacity",
)
# Findings that sit at one site. Adding one, the auto mask keeps the one region the model favours most
# (`generation.editing.auto_mask`): DiffEdit marks every site the finding could take, and an edit over all of them
# draws it faintly at each. Effusion (often both sides) and diffuse findings are not among them.
FOCAL_FINDINGS = ("Consolidation", "Lung Lesion", "Mass", "Nodule", "Nodule/Mass")
# Each source's own spellings -> the canonical name (a name equal to a canonical one after `normalize` needs no
# entry). The collection readers extend this table; the README shows it.
ALIASES = {
    "phantom": {"pleural_effusion": "Effusion"},
    "chexpert": {"Pleural Effusion": "Effusion"},
    "iu_xray": {"normal": NO_FINDING, "Pleural Effusion": "Effusion", "Pulmonary Atelectasis": "Atelectasis"},
    "class_folders": {"Normal": NO_FINDING},
    "padchest": {"normal": NO_FINDING, "pleural effusion": "Effusion", "infiltrates": "Infiltration",
                 "hiatal hernia": "Hernia", "pleural thickening": "Pleural_Thickening",
                 "apical pleural thickening": "Pleural_Thickening", "pulmonary fibrosis": "Fibrosis",
                 "pulmonary mass": "Mass", "lung mass": "Mass"},
    "vindr": {"Pleural effusion": "Effusion", "Pleural thickening": "Pleural_Thickening",
              "Pulmonary fibrosis": "Fibrosis"},
}
_CANONICAL = {normalize(name): name for name in FINDINGS}


def is_no_finding(name: str) -> bool:
    return normalize(name) == normalize(NO_FINDING)


def canonical_finding(name: str, source: str | None = None) -> str:
    """`name` as the vocabulary spells it: an alias of `source` (or of any source, when None) mapped, a known name
    in its canonical spelling, "No Finding" in its one spelling; an unknown name is kept as it is."""
    if is_no_finding(name):
        return NO_FINDING
    tables = [ALIASES.get(source, {})] if source else list(ALIASES.values())
    for table in tables:
        for alias, canonical in table.items():
            if normalize(alias) == normalize(name):
                return canonical
    return _CANONICAL.get(normalize(name), name)


def as_model_names(requested: Iterable[str], known: Iterable[str]) -> list[str]:
    """Finding names as a model that knows `known` spells them: a name it knows (any case) as it is, else the model's
    name for the same finding under any name of the vocabulary, canonical or a collection's alias ("Effusion" or
    "Pleural Effusion" for a model trained on the phantom's "pleural_effusion"); anything else as it is, for the
    model to refuse by name."""
    known = list(known)
    own = {normalize(name) for name in known}
    by_finding = {canonical_finding(name): name for name in known}
    return [name if normalize(name) in own else by_finding.get(canonical_finding(name), name) for name in requested]


def finding_lists(cells: Iterable) -> list[list[str]]:
    """`finding_labels` cells (a list, or NIH's "A|B" text) -> lists of finding names, "No Finding" dropped."""
    lists = [cell.split("|") if isinstance(cell, str) else list(cell) for cell in cells]
    return [[name for name in names if name and not is_no_finding(name)] for names in lists]


def label_cell(labels: list[str] | None) -> str:
    """An image's request as its manifest cell: "A|B", `NO_FINDING` for none, `UNCONDITIONED` for the null
    condition."""
    return UNCONDITIONED if labels is None else "|".join(labels) or NO_FINDING


def parse_label_cell(cell: str) -> list[str] | None:
    """The inverse of `label_cell`: None for an unconditioned image, else its finding names ("No Finding": [])."""
    return None if cell == UNCONDITIONED else finding_lists([cell])[0]


def age_bin(age: float | None) -> str:
    """The `AGE_BIN_NAMES` entry an age in years falls in; "" when the age is unknown."""
    if age is None or age != age:
        return ""
    return AGE_BIN_NAMES[sum(age >= lo for lo in AGE_BINS[1:])]


def condition_value(condition: str, cell) -> str:
    """A dataset cell as the value a `--condition_on` group stores: an age in years becomes its bin."""
    return age_bin(cell) if condition == "patient_age" else str(cell)


def subgroup_columns(table: dict[str, list]) -> dict[str, list[str]]:
    """{group: value per row} for each `SUBGROUPS` group that metadata columns give: `patient_sex` and
    `view_position` as they are, `age_bin` as given or from `patient_age`; "" where a row lacks it. Groups no row
    has are left out."""
    n = len(next(iter(table.values()))) if table else 0
    columns = {g: [("" if v is None else str(v)) for v in table[g]] for g in ("patient_sex", "view_position")
               if g in table}
    if "age_bin" in table:
        columns["age_bin"] = [("" if v is None else str(v)) for v in table["age_bin"]]
    elif "patient_age" in table:
        columns["age_bin"] = [age_bin(a) for a in table["patient_age"]]
    return {g: columns[g] for g in SUBGROUPS if g in columns and len(columns[g]) == n and any(columns[g])}
