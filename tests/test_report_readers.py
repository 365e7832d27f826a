"""Report readers on small folders in each collection's real layout: MIMIC-CXR's report files, CheXpert Plus's report
table, PadChest's Report column (the real metadata's, when ../shared has it) and IU X-ray's two tables; a source
without reports prompts from its labels; a report's text is patient data and is never published."""

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lunggen_diffusers.config import from_dict
from lunggen_diffusers.data import registry
from lunggen_diffusers.data.chexpert import OBSERVATIONS, chexpert_dataset
from lunggen_diffusers.data.iu_xray import iu_xray_dataset
from lunggen_diffusers.data.mimic import mimic_dataset
from lunggen_diffusers.data.padchest import padchest_dataset
from lunggen_diffusers.data.reports import LABEL_TEXT, REAL_TEXT, report_sections, report_texts

from fixtures import IMAGES

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 FINDINGS:
 
 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.

 IMPRESSION:
 
 No acute cardiopulmonary process.
"""
PADCHEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "padchest" / \
    "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"


def test_report_sections_keep_findings_then_impression():
    assert report_sections(MIMIC_REPORT) == ("There is no focal consolidation, pleural effusion or pneumothorax. "
                                             "Bilateral nodular opacities that most likely represent nipple shadows. "
                                             "No acute cardiopulmonary process.")
    assert report_sections("IMPRESSION: Small left effusion.\nFINDINGS: Left effusion.") == \
        "Left effusion. Small left effusion."
    assert report_sections("No headings at all.") == ""


def test_mimic_reports_join_each_image_to_its_studys_text(mimic):
    subject, study = IMAGES[0][:2]
    (mimic / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt").write_text(MIMIC_REPORT)
    ds, _ = mimic_dataset(mimic)
    rows = ds.to_list()
    with_text = [r for r in rows if r["report"]]
    assert with_text and all(r["patient_id"] == subject for r in with_text)
    assert with_text[0]["report"].startswith("There is no focal consolidation") and "INDICATION" not in \
        with_text[0]["report"]
    assert all(r["report"] == "" for r in rows if r["patient_id"] != subject)


def test_mimic_without_reports_has_no_report_column_and_prompts_from_labels(tmp_path):
    from fixtures import write_mimic

    ds, _ = mimic_dataset(write_mimic(tmp_path / "m"))
    assert "report" not in ds.column_names
    texts, source = report_texts(ds, "report", phantom=False)
    assert source == LABEL_TEXT and texts[0].startswith(("Findings:", "No finding."))


def test_chexpert_plus_reports_join_on_the_image_path(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", *OBSERVATIONS]
    rows = [["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Female", "68", "Frontal", "AP", "1.0"],
            ["CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg", "Male", "40", "Frontal", "PA", ""]]
    with _open(root / "train.csv") as f:
        csv.writer(f).writerows([header, *[r + [""] * (len(header) - len(r)) for r in rows]])
    for row in rows:
        path = root.joinpath(*Path(row[0]).parts[1:])
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32), 90, np.uint8)).save(path)
    with _open(root / "df_chexpert_plus_240401.csv") as f:
        csv.writer(f).writerows([["path_to_image", "section_findings", "section_impression"],
                                 ["train/patient00001/study1/view1_frontal.jpg", "Lungs are clear.", "No acute  process."],
                                 ["train/patient00001/study1/view2_lateral.jpg", "Lateral.", ""]])
    ds, _ = chexpert_dataset(root)
    assert dict(zip(ds["patient_id"], ds["report"], strict=True)) == {
        "patient00001": "Lungs are clear. No acute process.", "patient00002": ""}
    assert report_texts(ds, "report", phantom=False)[1] == REAL_TEXT


def _open(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w", newline="")


@pytest.mark.skipif(not PADCHEST.is_file(), reason="real PadChest metadata not found in ../shared")
def test_padchest_keeps_its_report_column_as_given(tmp_path):
    with gzip.open(PADCHEST, "rt", newline="") as f:
        rows = [r for _, r in zip(range(30), csv.DictReader(f), strict=False)]
    root = tmp_path / "padchest"
    root.mkdir()
    with gzip.open(root / PADCHEST.name, "wt", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        path = root / row["ImageDir"] / row["ImageID"]
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((32, 32), 1000, np.uint16)).save(path)
    ds, _ = padchest_dataset(root)
    by_id = {r["ImageID"]: " ".join(r["Report"].split()) for r in rows}
    assert len(ds) and all(by_id[Path(p["path"]).name] == text for p, text in zip(ds["image"], ds["report"], strict=True))


def test_iu_xray_reads_frontal_images_with_their_report_and_problems(tmp_path):
    root = tmp_path / "iu"
    images = root / "images" / "images_normalized"
    images.mkdir(parents=True)
    with _open(root / "indiana_reports.csv") as f:
        csv.writer(f).writerows([
            ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"],
            ["1", "normal", "normal", "Xray Chest PA and Lateral", "Positive TB test", "None.",
             "The cardiac silhouette and mediastinum size are within normal limits.", "Normal chest x-XXXX."],
            ["2", "Cardiomegaly/mild", "Cardiomegaly;Pleural Effusion", "", "", "", "Heart is enlarged.", ""]])
    with _open(root / "indiana_projections.csv") as f:
        csv.writer(f).writerows([["uid", "filename", "projection"], ["1", "1_IM-0001-4001.dcm.png", "Frontal"],
                                 ["1", "1_IM-0001-3001.dcm.png", "Lateral"], ["2", "2_IM-0652-1001.dcm.png", "Frontal"],
                                 ["3", "3_IM-1384-1001.dcm.png", "Frontal"]])
    for name in ("1_IM-0001-4001.dcm.png", "1_IM-0001-3001.dcm.png", "2_IM-0652-1001.dcm.png"):
        Image.fromarray(np.full((32, 32), 50, np.uint8)).save(images / name)
    ds, left_out = iu_xray_dataset(root)
    assert ds["patient_id"] == ["iu-1", "iu-2"]
    assert ds["finding_labels"] == [["No Finding"], ["Cardiomegaly", "Effusion"]]
    assert ds["report"][0] == ("The cardiac silhouette and mediastinum size are within normal limits. "
                               "Normal chest x-XXXX.")
    assert sorted(reason for _, reason in left_out) == ["projection Lateral", "uid not in the reports table"]
    settings = from_dict({"train_data_dir": str(root), "cache_dir": str(tmp_path / "c")}).data
    assert registry.folder_source(settings)[1] == "the IU X-ray (OpenI) collection"
