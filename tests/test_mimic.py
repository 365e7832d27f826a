"""MIMIC-CXR-JPG in PhysioNet's documented layout, built here: the official split kept as it is, study labels on
every image of the study, frontal views, uncertainty policies, missing label files; then a conditional model."""

import json

import pytest

from lunggen_diffusers.cli import UsageError
from lunggen_diffusers.config import from_dict
from lunggen_diffusers.data import build
from lunggen_diffusers.data.conditioning import label_config
from lunggen_diffusers.data.mimic import mimic_dataset
from lunggen_diffusers.data.splits import patient_splits
from lunggen_diffusers.vocabulary import NO_FINDING

from fixtures import TINY


def test_official_split_frontal_views_and_study_labels(mimic):
    ds, left_out = mimic_dataset(mimic, "ones")
    assert len(ds) == 7 and [reason for _, reason in left_out] == ["view LATERAL"]
    by_image = {cell["path"].rsplit("/", 1)[1][:-4]: (labels, split) for cell, labels, split in
                zip(ds["image"], ds["finding_labels"], patient_splits(ds, None), strict=True)}
    assert by_image == {
        "d0b71acc": ([NO_FINDING], "train"), "e8a9e0f5": (["Cardiomegaly", "Edema"], "train"),
        "096052b7": (["Effusion"], "validation"), "f8d2a4e1": (["Pneumonia"], "test"),
        "c4a5b6d7": (["Pneumonia"], "test"), "77aa88bb": (["Atelectasis"], "train"), "11cc22dd": (["Effusion"], "train")}
    zeros = dict(zip((c["path"] for c in ds["image"]), mimic_dataset(mimic, "zeros")[0]["finding_labels"], strict=True))
    assert sorted(map(tuple, zeros.values())).count((NO_FINDING,)) == 3  # the uncertain Pneumonia study, twice
    assert len(mimic_dataset(mimic, "ignore")[0]) == 4


def test_a_missing_labels_file_is_one_line_naming_it(mimic):
    (mimic / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
    with pytest.raises(UsageError, match="no mimic-cxr-2.0.0-chexpert.csv\\(.gz\\) or mimic-cxr-2.0.0-negbio"):
        mimic_dataset(mimic)


def test_a_mimic_folder_gives_its_train_split_and_study_labels_to_a_conditional_model(mimic, tmp_path):
    config = from_dict({**TINY, "train_data_dir": str(mimic), "cache_dir": str(tmp_path / "c"),
                        "condition_on": ["findings"]})
    assert build.load_source(config)[1] == "the MIMIC-CXR-JPG dataset"
    dataset, _ = build.build_dataset(config)  # what training conditions on, without the training
    assert len(dataset) == 4  # the official train split's frontal images
    assert label_config(dataset, ["findings"])["findings"] == ["Atelectasis", "Cardiomegaly", "Edema", "Effusion"]


def test_prepare_keeps_the_official_split(mimic, tmp_path):
    import datasets

    from lunggen_diffusers.data import prepare

    prepare.main(["--train_data_dir", str(mimic), "--output_dir", str(tmp_path / "prepared"), "--resolution", "32",
                  "--cache_dir", str(tmp_path / "c")])
    splits = datasets.load_from_disk(str(tmp_path / "prepared"))
    assert {name: len(s) for name, s in splits.items()} == {"train": 4, "validation": 1, "test": 2}
    report = json.loads((tmp_path / "prepared" / "prepare_report.json").read_text())
    assert report["split_method"] == "the collection's official split" and report["source"] == "the MIMIC-CXR-JPG dataset"
    assert "view LATERAL" in (tmp_path / "prepared" / "skipped_files.csv").read_text()
