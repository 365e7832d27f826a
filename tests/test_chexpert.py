"""CheXpert: the uncertainty policies, frontal views, valid.csv as the test split and missing files, on real rows of
train.csv (skipped when ../shared is absent) with stand-in JPEGs written here."""

import csv
import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lunggen_diffusers.config import from_dict
from lunggen_diffusers.data import registry
from lunggen_diffusers.data.build import build_dataset
from lunggen_diffusers.data.chexpert import OBSERVATIONS, chexpert_dataset, findings
from lunggen_diffusers.data.conditioning import label_config
from lunggen_diffusers.data.splits import patient_splits
from lunggen_diffusers.vocabulary import FINDINGS_COLUMN as FINDINGS
from lunggen_diffusers.vocabulary import NO_FINDING

from fixtures import TINY

CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "chexpert" / "train.csv.gz"
needs_real = pytest.mark.skipif(not CSV.is_file(), reason=f"real CheXpert metadata not found at {CSV}")
HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding," + ",".join(OBSERVATIONS))


def _real_rows():
    with gzip.open(CSV, "rt", newline="") as f:
        return list(csv.DictReader(f))


@needs_real
@pytest.mark.parametrize("policy", ["ones", "zeros", "ignore"])
def test_each_uncertainty_policy_counts_what_the_csv_says(policy):
    frontal = [r for r in _real_rows() if r["Frontal/Lateral"] == "Frontal"]
    assert len(frontal) == 191027
    kept = [r for r in frontal if policy != "ignore" or "-1.0" not in (r[o] for o in OBSERVATIONS)]
    wanted = ("1.0", "-1.0") if policy == "ones" else ("1.0",)
    expected = Counter(o for r in kept for o in OBSERVATIONS if r[o] in wanted)
    labels = [findings(r, policy) for r in frontal]
    got = Counter(name for names in labels if names for name in names if name != NO_FINDING)
    assert sum(names is not None for names in labels) == len(kept)
    renamed = {"Pleural Effusion": "Effusion"}
    assert got == Counter({renamed.get(k, k): v for k, v in expected.items()})
    assert sum(names == [NO_FINDING] for names in labels if names) == sum(
        not any(r[o] in wanted for o in OBSERVATIONS) for r in kept)


def _stand_ins(root: Path, rows: list[dict]) -> None:
    for i, row in enumerate(rows):
        path = root.joinpath(*Path(row["Path"]).parts[1:])
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 36), (40 + 5 * i) % 256, np.uint8)).save(path)


def _write(path: Path, rows: list[dict]):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HEADER.split(","))
        writer.writeheader()
        writer.writerows({k: r[k] for k in HEADER.split(",")} for r in rows)


@needs_real
def test_a_chexpert_folder_keeps_frontal_images_and_valid_csv_as_the_test_split(tmp_path):
    rows = _real_rows()
    train_rows, valid_rows = rows[:60], rows[-6:]  # different patients: the last rows are other patients'
    root = tmp_path / "CheXpert-v1.0-small"  # Path starts with this folder's name
    root.mkdir()
    _write(root / "train.csv", train_rows)
    _write(root / "valid.csv", valid_rows)
    _stand_ins(root, train_rows + valid_rows)
    ds, left_out = chexpert_dataset(root, "zeros")
    frontal = [r for r in train_rows + valid_rows if r["Frontal/Lateral"] == "Frontal"]
    assert len(ds) == len(frontal) and left_out == []
    assert ds["view_position"] == [r["AP/PA"] for r in frontal]
    assert ds["patient_id"][0] == "patient00001" and set(ds["patient_sex"]) <= {"M", "F"}
    splits = patient_splits(ds, from_dict({"validation_fraction": 0.2}).data)
    test_patients = {p for p, s in zip(ds["patient_id"], splits, strict=True) if s == "test"}
    assert test_patients == {p for p, t in zip(ds["patient_id"], ds["official_test"], strict=True) if t}
    assert not test_patients & {p for p, s in zip(ds["patient_id"], splits, strict=True) if s != "test"}


def test_missing_files_are_listed_and_too_many_is_one_line(tmp_path, caplog):
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    row = dict.fromkeys(HEADER.split(","), "")
    rows = [{**row, "Path": f"CheXpert-v1.0-small/train/patient{i:05d}/study1/view1_frontal.jpg", "Sex": "Female",
             "Age": "50", "Frontal/Lateral": "Frontal", "AP/PA": "PA", "Cardiomegaly": "1.0" if i % 2 else "-1.0"}
            for i in range(1, 11)]
    _write(root / "train.csv", rows)
    _stand_ins(root, rows[:8])  # two files missing
    settings = from_dict({"train_data_dir": str(root), "cache_dir": str(tmp_path / "cache")}).data
    ds, _ = registry.folder_source(settings)
    assert len(ds) == 8 and "skipped 2 of 10 images (2 file not found)" in caplog.text
    assert ds[FINDINGS][0] == ["Cardiomegaly"] and ds[FINDINGS][1] == ["Cardiomegaly"]  # U-Ones by default
    assert chexpert_dataset(root, "zeros")[0][FINDINGS][1] == [NO_FINDING]
    assert len(chexpert_dataset(root, "ignore")[0]) == 4
    for path in list(root.rglob("*.jpg"))[:5]:
        path.unlink()
    with pytest.raises(ValueError, match="7 of 10 images skipped \\(7 file not found\\) > --max_failed_fraction 0.5"):
        registry.folder_source(settings)


@needs_real
def test_a_chexpert_folder_gives_a_conditional_model_the_projects_vocabulary(tmp_path):
    rows = [r for r in _real_rows()[:80] if r["Frontal/Lateral"] == "Frontal"]
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    _write(root / "train.csv", rows)
    _stand_ins(root, rows)
    config = from_dict({**TINY, "train_data_dir": str(root), "cache_dir": str(tmp_path / "cache"),
                        "condition_on": ["findings"]})
    dataset, _ = build_dataset(config)  # what training conditions on, without the training
    assert "Effusion" in label_config(dataset, ["findings"])["findings"]  # CheXpert's "Pleural Effusion"


def test_source_is_recognised_or_forced_and_what_was_looked_for_is_named(tmp_path):
    from lunggen_diffusers.config import choices
    from lunggen_diffusers.data.registry import SOURCES, detect_source

    assert choices()["source"] == ("auto", *SOURCES)  # the flag offers every reader there is
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    settings = from_dict({"train_data_dir": str(tmp_path / "empty")}).data
    with pytest.raises(ValueError, match="no source recognised \\(looked for nih: Data_Entry_2017_v2020.csv.*"
                                         "chexpert: train.csv with Path.*image_folder: image files"):
        detect_source(settings)
    root = tmp_path / "flat"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "a.png")
    assert detect_source(from_dict({"train_data_dir": str(root)}).data) == "image_folder"
    with pytest.raises(ValueError, match=f"--source chexpert: {root} holds no train.csv with Path"):
        detect_source(from_dict({"train_data_dir": str(root), "source": "chexpert"}).data)
    with pytest.raises(ValueError, match="--source 'csv' is not one of: auto, nih, mimic"):
        from_dict({"train_data_dir": str(root), "source": "csv"})


@needs_real
def test_prepare_a_chexpert_folder_keeps_valid_csv_as_test(tmp_path):
    import datasets

    from lunggen_diffusers.data import prepare

    rows = _real_rows()
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    _write(root / "train.csv", rows[:60])
    _write(root / "valid.csv", rows[-6:])
    _stand_ins(root, rows[:60] + rows[-6:])
    prepare.main(["--train_data_dir", str(root), "--output_dir", str(tmp_path / "prepared"), "--resolution", "32",
                  "--cache_dir", str(tmp_path / "c"), "--validation_fraction", "0.2"])
    splits = datasets.load_from_disk(str(tmp_path / "prepared"))
    valid_patients = {r["Path"].split("/")[2] for r in rows[-6:] if r["Frontal/Lateral"] == "Frontal"}
    assert set(splits["test"]["patient_id"]) == valid_patients
    patients = [set(s["patient_id"]) for s in splits.values()]
    assert all(not (a & b) for i, a in enumerate(patients) for b in patients[i + 1:])


def test_the_folder_a_collection_was_unzipped_into_names_the_folder_to_pass(tmp_path):
    """`/data/chexpert` holding `CheXpert-v1.0-small/` has the shape of a folder of image classes; read so, it would
    train without patients or labels. Every way in (auto, forced, prepare) names the folder below instead."""
    from lunggen_diffusers.data.prepare import PrepareArguments, _prepare

    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    rows = [{k: "" for k in HEADER.split(",")} | {"Path": f"CheXpert-v1.0-small/train/patient0000{i}/study1/"
                                                          "view1_frontal.jpg", "Frontal/Lateral": "Frontal"}
            for i in (1, 2)]
    _write(root / "train.csv", rows)
    _stand_ins(root, rows)
    expected = f"--train_data_dir {tmp_path} holds the CheXpert dataset one folder down: pass --train_data_dir {root}"
    for source in ("auto", "chexpert", "image_folder"):
        with pytest.raises(ValueError, match=expected.replace("(", "\\(")):
            registry.detect_source(from_dict({"train_data_dir": str(tmp_path), "source": source}).data)
    assert registry.detect_source(from_dict({"train_data_dir": str(root)}).data) == "chexpert"
    settings = from_dict({"train_data_dir": str(tmp_path), "resolution": 32, "cache_dir": str(tmp_path / "c")}).data
    with pytest.raises(ValueError, match="one folder down: pass"):
        _prepare(PrepareArguments(output_dir=str(tmp_path / "prepared")), settings)
