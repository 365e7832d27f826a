"""Several sources at once: each folder's split prepared by its own reader, joined with patient IDs namespaced by
source and a `source` column that a model can be conditioned on."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from lunggen_diffusers.config import from_dict, parse_args
from lunggen_diffusers.data import build

from fixtures import TINY


@pytest.fixture
def classes(tmp_path):
    root = tmp_path / "kaggle"
    for k, name in enumerate(("COVID-19", "Normal")):
        (root / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((40, 40), 40 * k + i, np.uint8)).save(root / name / f"{i}.png")
    return root


def test_the_flag_repeats_and_a_config_file_may_give_one_folder_as_a_string(tmp_path):
    assert parse_args(["--train_data_dir", "a", "--train_data_dir", "b"]).data.train_data_dir == ["a", "b"]
    assert from_dict({"train_data_dir": "a"}).data.train_data_dir == ["a"]


def test_two_sources_join_with_namespaced_patients_and_a_source_column(mimic, classes, tmp_path, caplog):
    config = from_dict({**TINY, "train_data_dir": [str(mimic), str(classes)], "cache_dir": str(tmp_path / "c"),
                        "test_fraction": 0.1, "validation_fraction": 0.1})
    with caplog.at_level(logging.INFO):
        ds, summary = build.build_dataset(config)
    one = {name: len(build.build_dataset(from_dict({**config.to_dict(), "train_data_dir": [str(root)]}))[0])
           for name, root in (("mimic", mimic), ("class_folders", classes))}
    assert dict(zip(*np.unique(ds["source"], return_counts=True), strict=True)) == one  # each source's own train split, whole
    assert all(p.startswith(f"{s}:") for p, s in zip(ds["patient_id"], ds["source"], strict=True))
    assert summary.source == f"2 sources (mimic {one['mimic']}, class_folders {one['class_folders']} images)"
    assert "left out of the joined data: official_split, view_position" in caplog.text
    assert set(ds.column_names) == {"image", "patient_id", "finding_labels", "source"}


def test_a_model_conditioned_on_the_source_draws_from_either_on_request(mimic, classes, tmp_path):
    from lunggen_diffusers import LungGenPipeline
    from lunggen_diffusers.training.diffusion import train

    out = tmp_path / "out"
    train(from_dict({**TINY, "train_data_dir": [str(mimic), str(classes)], "cache_dir": str(tmp_path / "c"),
                     "output_dir": str(out), "condition_on": ["findings", "source"], "max_train_steps": 2,
                     "test_fraction": 0.1, "validation_fraction": 0.1}))
    labels = json.loads((out / "model_index.json").read_text())["label_config"]
    assert labels["groups"] == {"source": ["class_folders", "mimic"]}
    assert {"COVID-19", "Effusion"} <= set(labels["findings"])
    pipe = LungGenPipeline.from_pretrained(out)
    images = pipe(findings=[["COVID-19", "source=class_folders"], ["Effusion", "source=mimic"]],
                  num_inference_steps=1, output_type="np").images
    assert images.shape == (2, 32, 32, 1)
    assert json.loads((out / "training_config.json").read_text())["train_data_dir"] == [str(mimic), str(classes)]
