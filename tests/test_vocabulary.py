"""The one label vocabulary: canonical names, aliases, one "No Finding", and the manifest's label cells."""

import pytest

from lunggen_diffusers import vocabulary
from lunggen_diffusers.data.phantom import FINDINGS as PHANTOM_FINDINGS
from lunggen_diffusers.data.phantom import phantom_dataset
from lunggen_diffusers.vocabulary import (
    NO_FINDING,
    UNCONDITIONED,
    canonical_finding,
    finding_lists,
    is_no_finding,
    label_cell,
    parse_label_cell,
)


@pytest.mark.parametrize("spelling", ["No Finding", "no finding", "No_Finding", "NO-FINDING", " no  finding "])
def test_no_finding_has_one_spelling_whatever_it_is_written_as(spelling):
    assert is_no_finding(spelling) and canonical_finding(spelling) == NO_FINDING == "No Finding"


@pytest.mark.parametrize("name, source, expected", [
    ("pleural_effusion", "phantom", "Effusion"),       # the phantom's own spelling
    ("Pleural Effusion", "chexpert", "Effusion"),      # CheXpert's
    ("pleural effusion", None, "Effusion"),            # any source's alias when none is named
    ("pleural_thickening", "nih", "Pleural_Thickening"),  # a canonical name in its canonical spelling
    ("CARDIOMEGALY", None, "Cardiomegaly"),
    ("COVID-19", None, "COVID-19"),                    # unknown: kept as it is
])
def test_canonical_finding(name, source, expected):
    assert canonical_finding(name, source) == expected


def test_an_alias_of_one_source_is_not_applied_to_another():
    assert canonical_finding("pleural_effusion", "nih") == "pleural_effusion"


def test_every_phantom_finding_has_a_canonical_name():
    assert {f: canonical_finding(f, "phantom") for f in PHANTOM_FINDINGS} == {
        "cardiomegaly": "Cardiomegaly", "pleural_effusion": "Effusion", "nodule": "Nodule",
        "consolidation": "Consolidation"}
    assert set(vocabulary.FINDINGS) >= {canonical_finding(f, "phantom") for f in PHANTOM_FINDINGS}


def test_the_phantom_writes_the_one_spelling():
    labels = phantom_dataset(8, 32, seed=0, finding_prob=0.0)[vocabulary.FINDINGS_COLUMN]
    assert labels == [[NO_FINDING]] * 8


def test_finding_lists_read_lists_and_nih_text_and_drop_no_finding():
    assert finding_lists([["Cardiomegaly", "No Finding"], "Effusion|Mass", "No Finding", []]) == [
        ["Cardiomegaly"], ["Effusion", "Mass"], [], []]


@pytest.mark.parametrize("labels, cell", [(None, UNCONDITIONED), ([], NO_FINDING), (["Cardiomegaly"], "Cardiomegaly"),
                                          (["Effusion", "view_position=PA"], "Effusion|view_position=PA")])
def test_a_manifest_label_cell_reads_back_as_written(labels, cell):
    assert label_cell(labels) == cell
    assert parse_label_cell(cell) == labels


def test_condition_columns_cover_every_condition_choice():
    from lunggen_diffusers.vocabulary import CONDITIONS

    assert list(vocabulary.CONDITION_COLUMNS) == list(CONDITIONS)
    assert vocabulary.CONDITION_COLUMNS["findings"] == vocabulary.FINDINGS_COLUMN == "finding_labels"
