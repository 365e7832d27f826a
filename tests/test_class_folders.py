"""Class folders (the second seed's COVID-19 / Viral Pneumonia / Normal layout) as finding labels, end to end."""

import csv
import logging

import numpy as np
import pytest
from PIL import Image

from lunggen_diffusers.config import from_dict
from lunggen_diffusers.data import registry
from lunggen_diffusers.data.class_folders import is_class_folder_tree
from lunggen_diffusers.vocabulary import NO_FINDING

from fixtures import TINY

CLASSES = ("COVID-19", "Viral Pneumonia", "Normal")


@pytest.fixture
def kaggle(tmp_path):
    root = tmp_path / "COVID-19_Radiography_Dataset"
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((40, 40), 30 + 60 * k + i, np.uint8)).save(root / name / f"{name}-{i}.png")
    return root


def _source(root, tmp_path):
    return registry.folder_source(from_dict({"train_data_dir": str(root), "cache_dir": str(tmp_path / "c")}).data)


def test_each_class_is_a_finding_and_normal_is_no_finding(kaggle, tmp_path, caplog):
    assert is_class_folder_tree(kaggle) and not is_class_folder_tree(kaggle / "Normal")
    with caplog.at_level(logging.WARNING):
        ds, source = _source(kaggle, tmp_path)
    assert source == "a local folder of image classes" and len(ds) == 18
    by_class = {cell["path"].split("/")[-2]: labels for cell, labels in zip(ds["image"], ds["finding_labels"], strict=True)}
    assert by_class == {"COVID-19": ["COVID-19"], "Viral Pneumonia": ["Viral Pneumonia"], "Normal": [NO_FINDING]}
    assert len(set(ds["patient_id"])) == 18  # image-wise: and the warning names the leak
    assert "each image is its own patient" in caplog.text and "flatters every test figure" in caplog.text


def test_patients_csv_makes_the_split_patient_wise(kaggle, tmp_path):
    files = sorted(p.relative_to(kaggle).as_posix() for p in kaggle.rglob("*.png"))
    with open(kaggle / "patients.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "patient_id"])
        writer.writerows((name, f"pt{i // 3}") for i, name in enumerate(files))
    ds, _ = _source(kaggle, tmp_path)
    assert len(set(ds["patient_id"])) == 6
    (kaggle / "patients.csv").write_text("file_name,patient_id\n" + f"{files[0]},pt0\n")
    with pytest.raises(ValueError, match="names no patient for 17 image"):
        _source(kaggle, tmp_path)


def test_a_class_folder_gives_a_conditional_model_its_classes(kaggle, tmp_path):
    from lunggen_diffusers.data.build import build_dataset
    from lunggen_diffusers.data.conditioning import label_config

    dataset, _ = build_dataset(from_dict({**TINY, "train_data_dir": str(kaggle), "cache_dir": str(tmp_path / "c"),
                                          "condition_on": ["findings"], "test_fraction": 0.1,
                                          "validation_fraction": 0.1}))
    labels = label_config(dataset, ["findings"])
    # Each class folder a finding, "Normal" the one spelling of no finding (not a finding of its own).
    assert "COVID-19" in labels["findings"] and "Normal" not in labels["findings"]


def test_prepare_a_class_folder_tree(kaggle, tmp_path):
    import datasets

    from lunggen_diffusers.data import prepare

    prepare.main(["--train_data_dir", str(kaggle), "--output_dir", str(tmp_path / "prepared"), "--resolution", "32",
                  "--cache_dir", str(tmp_path / "c")])
    splits = datasets.load_from_disk(str(tmp_path / "prepared"))
    assert sum(len(s) for s in splits.values()) == 18
    assert {n for s in splits.values() for names in s["finding_labels"] for n in names} == \
        {"COVID-19", "Viral Pneumonia", NO_FINDING}
