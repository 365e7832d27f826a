"""VinDr-CXR and RSNA Pneumonia label files into the vocabulary, joined onto DICOM stand-ins named after real rows;
counts checked against ones computed here independently from the CSVs (skipped when ../shared is absent)."""

import csv
import gzip
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from lunggen_diffusers.config import from_dict
from lunggen_diffusers.data import folders
from lunggen_diffusers.data.dicom_collections import (
    RSNA_NO_OPACITY,
    RSNA_NOT_NORMAL,
    rsna_labels,
    vindr_labels,
)
from lunggen_diffusers.vocabulary import NO_FINDING

from dicom_files import dataset, gradient, write
from fixtures import TINY

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VINDR, RSNA = SHARED / "vindr" / "train.csv.gz", SHARED / "rsna_pneumonia" / "stage_2_train_labels.csv.gz"
needs = {name: pytest.mark.skipif(not path.is_file(), reason=f"real {name} metadata not found at {path}")
         for name, path in (("VinDr-CXR", VINDR), ("RSNA", RSNA))}


def _csv(path):
    with gzip.open(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def test_vindr_majority_and_any_on_a_small_file(tmp_path):
    rows = [("a", "Cardiomegaly", "R1"), ("a", "Cardiomegaly", "R2"), ("a", "No finding", "R3"),
            ("b", "Pleural effusion", "R1"), ("b", "No finding", "R2"), ("b", "No finding", "R3"),
            ("c", "No finding", "R1"), ("c", "No finding", "R2"), ("c", "No finding", "R3")]
    with open(tmp_path / "train.csv", "w") as f:
        f.write("image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n")
        f.writelines(f"{i},{c},0,{r},,,,\n" for i, c, r in rows)
    assert vindr_labels(tmp_path, "majority") == {"a": ["Cardiomegaly"], "b": [NO_FINDING], "c": [NO_FINDING]}
    assert vindr_labels(tmp_path, "any") == {"a": ["Cardiomegaly"], "b": ["Effusion"], "c": [NO_FINDING]}
    with pytest.raises(ValueError, match="--vindr_label_rule 'most' is not one of: majority, any"):
        vindr_labels(tmp_path, "most")


def test_vindr_image_labels_file_wins_and_brings_the_diagnoses(tmp_path):
    (tmp_path / "train.csv").write_text("image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"
                                        "a,Cardiomegaly,3,R1,,,,\n")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "image_labels_train.csv").write_text(
        "image_id,rad_ID,Cardiomegaly,Pleural effusion,Tuberculosis,No finding\n"
        "a,R1,0,1,1,0\na,R2,0,1,0,0\na,R3,0,0,0,1\n"
        "b,R1,0,0,0,1\nb,R2,0,0,0,1\nb,R3,1,0,0,0\n")
    assert vindr_labels(tmp_path, "majority") == {"a": ["Effusion"], "b": [NO_FINDING]}
    assert vindr_labels(tmp_path, "any") == {"a": ["Effusion", "Tuberculosis"], "b": ["Cardiomegaly"]}


@needs["VinDr-CXR"]
@pytest.mark.parametrize("rule", ["majority", "any"])
def test_vindr_counts_match_the_csv(rule, tmp_path):
    shutil.copy(VINDR, tmp_path / "train.csv.gz")
    readers, marks = defaultdict(set), defaultdict(set)
    for row in _csv(VINDR):
        readers[row["image_id"]].add(row["rad_id"])
        if row["class_name"] != "No finding":
            marks[(row["image_id"], row["class_name"])].add(row["rad_id"])
    need = {image: (len(r) // 2 + 1 if rule == "majority" else 1) for image, r in readers.items()}
    positives = Counter(name for (image, name), rads in marks.items() if len(rads) >= need[image])
    labels = vindr_labels(tmp_path, rule)
    assert len(labels) == len(readers) == 15000
    got = Counter(name for names in labels.values() for name in names if name != NO_FINDING)
    renamed = {"Pleural effusion": "Effusion", "Pleural thickening": "Pleural_Thickening",
               "Pulmonary fibrosis": "Fibrosis", "Aortic enlargement": "Aortic Enlargement",
               "Other lesion": "Other Lesion"}
    assert got == Counter({renamed.get(k, k): v for k, v in positives.items()})
    found = {image for (image, _), rads in marks.items() if len(rads) >= need[image]}
    assert sum(names == [NO_FINDING] for names in labels.values()) == len(readers) - len(found)


@needs["VinDr-CXR"]
def test_a_vindr_folder_gives_a_conditional_model_its_findings(tmp_path):
    root = tmp_path / "vindr"
    root.mkdir()
    shutil.copy(VINDR, root / "train.csv.gz")
    labels = vindr_labels(root)
    chosen = sorted(labels)[:16]
    for i, image_id in enumerate(chosen):  # VinDr's files are anonymised: no Patient ID in their headers
        write(dataset(gradient(seed=i), WindowCenter=2000, WindowWidth=4000), root / "train" / f"{image_id}.dicom")
    ds = folders.dicom_dataset(root, tmp_path / "report", labels)
    assert dict(zip((Path(c["path"]).stem for c in ds["image"]), ds["finding_labels"], strict=True)) == {i: labels[i] for i in chosen}
    config = from_dict({**TINY, "train_data_dir": str(root), "cache_dir": str(tmp_path / "cache"),
                        "condition_on": ["findings"], "test_fraction": 0.1, "validation_fraction": 0.1})
    from lunggen_diffusers.data.build import build_dataset
    from lunggen_diffusers.data.conditioning import label_config

    train_split, _ = build_dataset(config)  # the split training conditions on, without the training
    seen = {f for image_id in chosen for f in labels[image_id] if f != "No Finding"}
    assert set(label_config(train_split, ["findings"])["findings"]) <= seen and len(train_split) < len(chosen)


def test_rsna_labels_keep_not_normal_apart_from_no_finding(tmp_path):
    (tmp_path / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\nboxed,1,2,3,4,1\nboxed,5,6,7,8,1\nnormal,,,,,0\nodd,,,,,0\nbare,,,,,0\n")
    (tmp_path / "stage_2_detailed_class_info.csv").write_text(
        "patientId,class\nboxed,Lung Opacity\nboxed,Lung Opacity\nnormal,Normal\nodd,No Lung Opacity / Not Normal\n")
    assert rsna_labels(tmp_path) == {"boxed": ["Lung Opacity"], "normal": [NO_FINDING], "odd": [RSNA_NOT_NORMAL],
                                     "bare": [RSNA_NO_OPACITY]}


@needs["RSNA"]
def test_rsna_counts_match_the_csv(tmp_path):
    shutil.copy(RSNA, tmp_path / "stage_2_train_labels.csv.gz")
    rows = _csv(RSNA)
    boxed = {r["patientId"] for r in rows if r["Target"] == "1"}
    everyone = {r["patientId"] for r in rows}
    labels = rsna_labels(tmp_path)
    assert len(labels) == len(everyone) == 26684
    assert Counter(names[0] for names in labels.values()) == {"Lung Opacity": len(boxed),
                                                            RSNA_NO_OPACITY: len(everyone - boxed)}
