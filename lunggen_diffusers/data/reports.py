"""Reports as data: the phantom's own radiology report, written from the truth it was drawn with, and a prompt
built from labels for collections that ship none (NIH ChestX-ray14, class folders).

A phantom report states each finding with the patient's side, its zone and its size, negates absent findings (most
of the time: a finding left unsaid is left to the model), and names the view and the patient; its sentences come in
a seeded, varied order and wording. Two sets of wordings exist: `TRAIN` writes every training report and `HELD_OUT`
is never trained on, so adherence to a wording the model has not seen is measured apart from the trained ones. The
held-out wordings reorder and rephrase the trained vocabulary ("Pleural effusion on the left, small."), since a
tokenizer trained on the corpus cannot know a word no report used.

Laterality is the patient's throughout: "left pleural effusion" is fluid on the image's right.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ..cli import UsageError

TRAIN, HELD_OUT = "train", "held_out"
PHRASINGS = (TRAIN, HELD_OUT)
REPORT_COLUMN = "report"
NEGATION_PROB = 0.7  # each absent finding is negated in this share of reports, left unsaid in the rest

# Sentences per fact, for each phrasing set; fields: side, zone, size, severity (as `phantom.finding_facts`).
FINDING_SENTENCES = {
    "pleural_effusion": {
        TRAIN: ("{Size} {side} pleural effusion.", "There is a {size} {side} pleural effusion.",
                "{Side} pleural effusion, {size}."),
        HELD_OUT: ("Pleural effusion on the {side}, {size}.", "A {side} pleural effusion is seen, {size}."),
    },
    "consolidation": {
        TRAIN: ("Consolidation in the {side} {zone} zone.", "There is {side} {zone} zone consolidation.",
                "{Side} {zone} zone consolidation."),
        HELD_OUT: ("Consolidation is seen in the {zone} zone on the {side}.",),
    },
    "nodule": {
        TRAIN: ("A {size} nodule in the {side} {zone} zone.", "{Side} {zone} zone nodule, {size}.",
                "There is a {size} pulmonary nodule in the {side} {zone} zone."),
        HELD_OUT: ("Pulmonary nodule, {size}, {zone} zone on the {side}.",),
    },
    "cardiomegaly": {
        TRAIN: ("{Severity} cardiomegaly.", "There is {severity} cardiomegaly.", "Cardiomegaly, {severity}."),
        HELD_OUT: ("The heart shows {severity} cardiomegaly.",),
    },
}
NEGATIONS = {
    "pleural_effusion": {TRAIN: ("No pleural effusion.", "No effusion."), HELD_OUT: ("There is no pleural effusion.",)},
    "consolidation": {TRAIN: ("No consolidation.", "No focal consolidation."),
                      HELD_OUT: ("There is no consolidation.",)},
    "nodule": {TRAIN: ("No nodule.", "No pulmonary nodule."), HELD_OUT: ("There is no nodule.",)},
    "cardiomegaly": {TRAIN: ("Heart size is normal.", "No cardiomegaly."), HELD_OUT: ("There is no cardiomegaly.",)},
}
VIEW_SENTENCES = {TRAIN: ("{view} view.", "Frontal {view} radiograph."), HELD_OUT: ("Radiograph, {view} view.",)}
PATIENT_SENTENCES = {TRAIN: ("{age}-year-old {man}.", "{Sex} patient, {age} years old."),
                     HELD_OUT: ("Patient is a {age}-year-old {man}.",)}


def fill(template: str, values: dict[str, str]) -> str:
    """str.format with "{Side}" the capitalised "{side}"."""
    both = {**values, **{k.capitalize(): v.capitalize() for k, v in values.items()}}
    return template.format(**both)


def _check_phrasing(phrasing: str) -> None:
    if phrasing not in PHRASINGS:
        raise UsageError(f"phrasing {phrasing!r} is not one of: {', '.join(PHRASINGS)}")


def patient_sentence(sex: str, age: float, rng: np.random.Generator, phrasing: str = TRAIN) -> str:
    words = {"man": "man" if sex == "M" else "woman", "sex": "male" if sex == "M" else "female",
             "age": str(int(age))}
    return fill(str(rng.choice(PATIENT_SENTENCES[phrasing])), words)


def view_sentence(view: str, rng: np.random.Generator, phrasing: str = TRAIN) -> str:
    return str(rng.choice(VIEW_SENTENCES[phrasing])).format(view=view)


def phantom_report(facts: dict[str, dict], sex: str, age: float, view: str, rng: np.random.Generator,
                   phrasing: str = TRAIN, negation_prob: float = NEGATION_PROB) -> str:
    """A report of one phantom: `facts` (`phantom.finding_facts`: each present finding's side, zone, size), then
    negations of the absent ones, the view and the patient, shuffled; every choice from `rng`."""
    _check_phrasing(phrasing)
    sentences = []
    for finding, templates in FINDING_SENTENCES.items():
        if finding in facts:
            values = {k: str(v) for k, v in facts[finding].items() if isinstance(v, str)}
            sentences.append(fill(str(rng.choice(templates[phrasing])), values))
        elif rng.random() < negation_prob:
            sentences.append(str(rng.choice(NEGATIONS[finding][phrasing])))
    sentences += [view_sentence(view, rng, phrasing), patient_sentence(sex, age, rng, phrasing)]
    return " ".join(sentences[i] for i in rng.permutation(len(sentences)))


def label_prompt(findings: Sequence[str], sex: str | None = None, age: float | None = None,
                 view: str | None = None) -> str:
    """The prompt of an image from a collection without reports: its finding labels, then what is known of the
    patient ("Findings: Cardiomegaly, Effusion. PA view. 54-year-old woman.")."""
    named = [f for f in findings if f.lower() != "no finding"]
    sentences = [f"Findings: {', '.join(named)}." if named else "No finding."]
    if view in ("PA", "AP"):
        sentences.append(f"{view} view.")
    if sex in ("M", "F") and age is not None and age == age:  # age == age: not NaN
        sentences.append(f"{int(age)}-year-old {'man' if sex == 'M' else 'woman'}.")
    elif sex in ("M", "F"):
        sentences.append(f"{'Male' if sex == 'M' else 'Female'} patient.")
    return " ".join(sentences)


# What a text model's prompts were learnt from (its prompt_config's "text_source"): only "real reports" are patient
# data, under the collection's data-use agreement.
PHANTOM_TEXT, LABEL_TEXT, REAL_TEXT = "phantom reports", "prompts built from labels", "real reports"
# The prompts a phantom text model's previews, video and card show (templated: no patient's words).
PHANTOM_EXAMPLES = ("No pleural effusion. No consolidation. Heart size is normal. PA view.",
                    "Large left pleural effusion. PA view.", "Small right pleural effusion. PA view.",
                    "Consolidation in the left lower zone. PA view.", "Marked cardiomegaly. PA view.",
                    "A large nodule in the right upper zone. PA view.")


def report_texts(dataset, column: str, phantom: bool) -> tuple[list[str], str]:
    """(the text of every training image, what it is): the `column` of reports, or for a collection without one
    (NIH, class folders) a `label_prompt` per image from its labels and demographics."""
    if column in dataset.column_names:
        texts = [t or "" for t in dataset.with_format(None)[column]]
        return texts, PHANTOM_TEXT if phantom else REAL_TEXT
    if column != REPORT_COLUMN or "finding_labels" not in dataset.column_names:
        raise UsageError(f"--caption_column {column!r}: the training data has no such column (it has: "
                         f"{', '.join(dataset.column_names)})")
    table = dataset.with_format(None).select_columns(
        [c for c in ("finding_labels", "patient_sex", "patient_age", "view_position") if c in dataset.column_names])
    rows = table.to_dict()
    texts = [label_prompt(findings, rows.get("patient_sex", [None] * len(table))[i],
                          rows.get("patient_age", [None] * len(table))[i],
                          rows.get("view_position", [None] * len(table))[i])
             for i, findings in enumerate(rows["finding_labels"])]
    return texts, LABEL_TEXT


def example_prompts(text_source: str, findings: Sequence[str]) -> list[str]:
    """The prompts a model's previews and card show: the phantom's templated ones, else a label prompt for no
    finding and for each of up to five findings. Never a training report."""
    if text_source == PHANTOM_TEXT:
        return list(PHANTOM_EXAMPLES)
    return [label_prompt([])] + [label_prompt([f]) for f in list(findings)[:5]]


# A free-text report's headings ("FINDINGS:", "IMPRESSION:", "COMPARISON:" ...) at the start of a line, as MIMIC-CXR's
# reports write them; the sections a model learns from are the radiologist's reading, not the history or technique.
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z /&()-]{2,}):", re.MULTILINE)
READ_SECTIONS = ("FINDINGS", "IMPRESSION")


def report_sections(text: str, sections: Sequence[str] = READ_SECTIONS) -> str:
    """The FINDINGS and IMPRESSION sections of a report, in that order, whitespace collapsed; "" if it has neither."""
    marks = list(_HEADING.finditer(text))
    parts = {}
    for mark, following in zip(marks, [*marks[1:], None], strict=False):  # one end per heading; none without
        body = text[mark.end():following.start() if following else len(text)]
        parts.setdefault(mark.group(1).strip(), " ".join(body.split()))
    return " ".join(parts[name] for name in sections if parts.get(name))
