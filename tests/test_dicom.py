"""DICOM folders: the grey pipeline step by step (each expected image computed here from the standard's formulas),
what is skipped and why, the header columns kept, and no header value anywhere in what a run writes."""

import csv
import json
import logging

import numpy as np
import pytest
from pydicom.datadict import DicomDictionary
from pydicom.uid import JPEG2000Lossless, RLELossless

from lunggen_diffusers.cli import UsageError
from lunggen_diffusers.config import from_dict
from lunggen_diffusers.data import dicom, folders
from lunggen_diffusers.data.decode import decode_images, open_image
from lunggen_diffusers.training.diffusion import train
from lunggen_diffusers.utils import list_images

from dicom_files import chest, dataset, gradient, structured_report, voi_lut, write
from fixtures import TINY

KEY = bytes(range(32))  # a fixed pseudonym key for tests that read headers

S = gradient().astype(np.float64)  # the stored values every case below starts from
# Elementwise float64 arithmetic only (no matrix products, no reductions in another order): the same on every CPU.
EXACT = {"rtol": 0, "atol": 1e-12}


def grey(**kwargs):
    return dicom.grey_levels(dataset(gradient(), **kwargs))


def linear(x, c, w):  # PS3.3 C.11.2.1.2.1
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)


def test_rescale_comes_before_the_window():
    got = grey(RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=1000, WindowWidth=2000)
    expected = linear(2 * S - 1024, 1000, 2000)
    np.testing.assert_allclose(got, expected, **EXACT)
    assert np.abs(expected - linear(S, 1000, 2000)).mean() > 0.05  # skipping the rescale: another image


@pytest.mark.parametrize("function, formula", [
    ("LINEAR", lambda x, c, w: linear(x, c, w)),
    ("LINEAR_EXACT", lambda x, c, w: np.clip((x - c) / w + 0.5, 0, 1)),  # C.11.2.1.3.2
    ("SIGMOID", lambda x, c, w: 1 / (1 + np.exp(-4 * (x - c) / w))),     # C.11.2.1.3.1
])
def test_each_voi_lut_function(function, formula):
    got = grey(WindowCenter=1500, WindowWidth=1200, VOILUTFunction=function)
    np.testing.assert_allclose(got, formula(S, 1500, 1200), **EXACT)
    assert np.abs(got - S / S.max()).mean() > 0.05  # skipping the VOI (the image's own range) looks different


def test_the_first_of_several_windows_is_used():
    got = grey(WindowCenter=[800, 3000], WindowWidth=[600, 2000])
    np.testing.assert_allclose(got, linear(S, 800, 600), **EXACT)


def test_a_voi_lut_sequence_wins_over_the_window():
    table = 4095 - np.arange(4096)  # an inverting LUT: unmistakable
    got = grey(VOILUTSequence=voi_lut(0, 12, table), WindowCenter=1000, WindowWidth=2000)
    np.testing.assert_allclose(got, table[S.astype(int)] / 4095, **EXACT)


def test_a_modality_lut_sequence_is_applied():
    item = dataset()
    item.LUTDescriptor, item.ModalityLUTType = [4096, 0, 16], "US"
    item.LUTData = [int(v) for v in (4095 - np.arange(4096)) * 8]
    from pydicom.sequence import Sequence

    got = grey(ModalityLUTSequence=Sequence([item]))
    mapped = (4095 - S) * 8
    np.testing.assert_allclose(got, (mapped - mapped.min()) / (mapped.max() - mapped.min()), **EXACT)


def test_no_voi_takes_the_images_range_or_the_percentiles_asked_for():
    np.testing.assert_allclose(grey(), (S - S.min()) / (S.max() - S.min()), **EXACT)
    lo, hi = np.percentile(S, [5, 95])
    got = dicom.grey_levels(dataset(gradient()), percentiles=(5, 95))
    np.testing.assert_allclose(got, np.clip((S - lo) / (hi - lo), 0, 1), **EXACT)


def test_monochrome1_is_inverted_so_bone_is_white():
    got = dicom.grey_levels(dataset(gradient(), photometric="MONOCHROME1"))
    np.testing.assert_allclose(got, 1 - (S - S.min()) / (S.max() - S.min()), **EXACT)
    windowed = dicom.grey_levels(dataset(gradient(), photometric="MONOCHROME1", WindowCenter=1000, WindowWidth=800))
    np.testing.assert_allclose(windowed, 1 - linear(S, 1000, 800), **EXACT)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_files_decode_to_the_same_grey_levels(syntax, tmp_path):
    plain = write(dataset(gradient(), WindowCenter=1000, WindowWidth=2000), tmp_path / "plain.dcm")
    packed = write(dataset(gradient(), WindowCenter=1000, WindowWidth=2000), tmp_path / "packed.dcm", syntax)
    assert packed.stat().st_size < plain.stat().st_size  # really compressed
    assert np.array_equal(np.asarray(dicom.read_image(packed)), np.asarray(dicom.read_image(plain)))


def test_read_image_is_the_grey_pipeline_in_8_bits(tmp_path):
    path = write(dataset(gradient(), WindowCenter=1000, WindowWidth=2000), tmp_path / "x.dcm")
    image = dicom.read_image(path)
    assert image.mode == "L" and image.size == (48, 40)
    assert np.abs(np.asarray(image, int) - np.round(linear(S, 1000, 2000) * 255)).max() <= 1


def test_dicom_files_are_found_with_or_without_a_suffix(tmp_path):
    chest(tmp_path / "a" / "one.dcm")
    chest(tmp_path / "b" / "1.2.840.99")        # a PACS export: a UID-like name, no image suffix
    chest(tmp_path / "b" / "IM0001")             # no suffix at all
    (tmp_path / "b" / "notes").write_text("not dicom")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["a/one.dcm", "b/IM0001"]
    # "1.2.840.99" has a suffix (".99") that is no image suffix: only suffix-less names are opened to look
    assert open_image(tmp_path / "b" / "IM0001").mode == "L"


def test_header_columns_in_the_projects_vocabulary(tmp_path):
    rows = {
        "a.dcm": dict(patient="P-1", sex="F", age="045Y", view="PA"),
        "b.dcm": dict(patient="P-1", sex="M", age="006M", view="AP"),
        "c.dcm": dict(patient="P-2", sex="", age="", view="", PatientBirthDate="19500101", StudyDate="20000101",
                      SeriesDescription="CHEST LAT"),
        "d.dcm": dict(patient="P-3", sex="O", age="010W", view="", SeriesDescription="CHEST PA AND LAT"),
    }
    for name, header in rows.items():
        chest(tmp_path / name, **header)
    paths, columns, skipped = dicom.dicom_folder(tmp_path, KEY)
    assert skipped == [] and [p.rsplit("/", 1)[1] for p in paths] == list(rows)
    assert columns["patient_sex"] == ["F", "M", "", "O"]
    assert columns["patient_age"] == [45.0, 0.5, 50.0, round(10 / 52.1775, 2)]
    assert columns["view_position"] == ["PA", "AP", "LL", ""]  # "PA AND LAT" names two views: left unknown
    ids = columns["patient_id"]
    assert ids[0] == ids[1] != ids[2] and all(i.startswith("dicom-") and "P-" not in i for i in ids)


def test_what_is_no_single_grey_radiograph_is_skipped_and_listed_with_its_reason(tmp_path, caplog):
    chest(tmp_path / "good.dcm")
    structured_report(tmp_path / "report.dcm")
    write(dataset(np.zeros((2, 8, 8), np.uint16), NumberOfFrames=2), tmp_path / "frames.dcm")
    write(dataset(np.zeros((8, 8, 3), np.uint8), photometric="RGB", bits_stored=8), tmp_path / "colour.dcm")
    (tmp_path / "garbage.dcm").write_bytes(b"a text file named like DICOM")
    paths, _, skipped = dicom.dicom_folder(tmp_path, KEY)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["good.dcm"]
    reasons = dict(skipped)
    assert reasons["report.dcm"].startswith("no pixel data (Basic Text SR")
    assert reasons["frames.dcm"] == "multi-frame (2 frames)"
    assert reasons["colour.dcm"].startswith("colour or not grayscale (PhotometricInterpretation RGB")
    assert reasons["garbage.dcm"].startswith("unreadable")

    with caplog.at_level(logging.WARNING):
        ds = folders.dicom_dataset(tmp_path, tmp_path / "report")
    assert len(ds) == 1 and "skipped 4 of 5 DICOM files" in caplog.text
    with open(tmp_path / "report" / "skipped_files.csv", newline="") as f:
        assert sorted(row["file"] for row in csv.DictReader(f)) == sorted(set(reasons))


def test_a_folder_with_nothing_usable_is_one_line(tmp_path):
    structured_report(tmp_path / "sr" / "report.dcm")
    with pytest.raises(ValueError, match="no usable image among 1 DICOM files \\(first: report.dcm: no pixel"):
        folders.dicom_dataset(tmp_path / "sr", tmp_path / "report")
    chest(tmp_path / "mixed" / "a.dcm")
    (tmp_path / "mixed" / "b.png").write_bytes(b"")
    with pytest.raises(ValueError, match="mixes DICOM files with 1 other image"):
        folders.dicom_dataset(tmp_path / "mixed", tmp_path / "report")


# Distinctive values in the identifying attributes of PS3.15's Basic Application Level Confidentiality Profile that
# a CR/DX header carries; none may appear in anything a run writes, in any case.
PHI = {
    "PatientName": "Zqx^Phiname", "PatientID": "PHIID-7f3a", "PatientBirthDate": "19230405",
    "OtherPatientIDs": "PHIOTHER-7f3a", "PatientAddress": "7 Phi Street Zqxville", "PatientTelephoneNumbers": "5550179",
    "InstitutionName": "Zqx Phi Hospital", "InstitutionAddress": "9 Phi Road", "InstitutionalDepartmentName": "PhiDept",
    "ReferringPhysicianName": "Refzqx^Phi", "PerformingPhysicianName": "Perfzqx^Phi", "OperatorsName": "Opzqx^Phi",
    "PhysiciansOfRecord": "Reczqx^Phi", "RequestingPhysician": "Reqzqx^Phi", "AccessionNumber": "ACCPHI7f3a",
    "StudyID": "STPHI7f3a", "StationName": "PHISTATION", "DeviceSerialNumber": "SNPHI7f3a",
    "StudyInstanceUID": "1.2.826.0.1.3680043.9.7777.1", "SeriesInstanceUID": "1.2.826.0.1.3680043.9.7777.2",
    "FrameOfReferenceUID": "1.2.826.0.1.3680043.9.7777.3", "StudyDate": "20070809", "StudyTime": "101112",
    "AcquisitionDateTime": "20070809101113", "EthnicGroup": "PhiEthnic", "Occupation": "PhiOccupation",
    "AdditionalPatientHistory": "phi history zqx", "PatientComments": "phi comment zqx", "MilitaryRank": "PhiRank",
    "MedicalRecordLocator": "MRLPHI7f3a", "RequestedProcedureID": "RPPHI7f3a", "PerformedProcedureStepID": "PPSPHI7f3a",
    "ImageComments": "phi image comment zqx",
}
# And every person's name the DICOM dictionary knows (pydicom's, VR PN, not retired): each gets a name of its own.
PERSON_NAMES = [keyword for vr, _, _, retired, keyword in DicomDictionary.values() if vr == "PN" and keyword and not retired]
PHI.update({keyword: f"Pn{i:02d}zqx^{keyword}" for i, keyword in enumerate(PERSON_NAMES) if keyword not in PHI})


def test_training_on_a_dicom_folder_writes_no_header_value_anywhere(tmp_path):
    for i in range(12):
        header = {**PHI, "PatientID": f"{PHI['PatientID']}-{i % 6}", "PatientName": f"{PHI['PatientName']}{i % 6}"}
        chest(tmp_path / "pacs" / f"study{i % 6}" / f"IM{i:04d}", patient=header.pop("PatientID"), seed=i,
              sex="MF"[i % 2], **header)
    structured_report(tmp_path / "pacs" / "sr" / "report.dcm")
    cache, out = tmp_path / "cache", tmp_path / "out"
    config = from_dict({**TINY, "train_data_dir": str(tmp_path / "pacs"), "cache_dir": str(cache),
                        "output_dir": str(out), "max_train_steps": 2, "train_batch_size": 2, "validation_fraction": 0.2,
                        "test_fraction": 0.2})
    result = train(config)
    assert result.global_step == 2
    assert json.loads((out / "manifest.json").read_text())["data"]["source"] == "a local DICOM folder"
    written = [p for root in (out, cache) for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "skipped_files.csv" for p in written) and any(p.suffix == ".arrow" for p in written)
    values = sorted({v for v in PHI.values()} | {f"{PHI['PatientID']}-{i}" for i in range(6)})
    for path in written:
        content = path.read_bytes().upper()
        leaked = [v for v in values if v.upper().encode() in content or v.replace("^", " ").upper().encode() in content]
        assert not leaked, f"{path.relative_to(tmp_path)} holds {leaked}"
    # The card check knows the values it must refuse, from their digests (any case), and says where, not what.
    from lunggen_diffusers.hub import export

    for value in ("Zqx Phi Hospital", "zqx phi hospital", "Phiname3", "Zqx Phiname3", PHI["AccessionNumber"], "19230405",
                  PHI["ConsultingPhysicianName"].replace("^", " ")):  # a name outside PHI_KEYWORDS too
        section = tmp_path / "utility"
        section.mkdir(exist_ok=True)
        (section / "card_section.md").write_text(f"## Downstream utility\n\nTrained at {value}.\n")
        with pytest.raises(ValueError, match="would publish an identifying DICOM header value") as refused:
            export.write_model_card(out, utility_dir=section)
        assert value.lower() not in str(refused.value).lower()
    (section / "card_section.md").write_text("## Downstream utility\n\nNothing identifying.\n")
    export.write_model_card(out, utility_dir=section)


def test_a_truncated_file_is_reported_by_the_decode_pass_not_a_traceback(tmp_path):
    chest(tmp_path / "d" / "good.dcm")
    cut = chest(tmp_path / "d" / "cut.dcm", seed=1)
    cut.write_bytes(cut.read_bytes()[:-1000])  # the pixel data ends early
    prepared, failures = decode_images(folders.dicom_dataset(tmp_path / "d", tmp_path / "r"), 32,
                                       max_failed_fraction=0.9)
    assert len(prepared) == 1 and [name for name, _ in failures] == ["cut.dcm"]
    assert "pixel data not decodable" in failures[0][1]


def test_evaluation_reads_a_dicom_folder_through_the_same_grey_pipeline(tmp_path):
    from lunggen_diffusers.evaluation.images import load_source, to_eval_image

    chest(tmp_path / "real" / "a.dcm", WindowCenter=1000, WindowWidth=2000)
    write(dataset(gradient(seed=1), photometric="MONOCHROME1"), tmp_path / "real" / "IM0002")
    source = load_source(str(tmp_path / "real"))
    images = source.read(range(len(source)), 32)
    assert images.shape == (2, 32, 32)
    for image, name in zip(images, ["IM0002", "a.dcm"], strict=True):
        assert np.array_equal(image, to_eval_image(dicom.read_image(tmp_path / "real" / name), 32))


def test_prepare_a_dicom_folder_into_patient_wise_splits_with_its_skipped_list(tmp_path, capsys):
    from lunggen_diffusers.data import prepare

    for i in range(20):
        chest(tmp_path / "pacs" / f"IM{i:04d}", patient=f"P-{i // 2}", seed=i, view="AP" if i % 5 == 0 else "PA")
    structured_report(tmp_path / "pacs" / "report.dcm")
    argv = ["--train_data_dir", str(tmp_path / "pacs"), "--output_dir", str(tmp_path / "prepared"), "--resolution",
            "32", "--cache_dir", str(tmp_path / "cache"), "--validation_fraction", "0.2"]
    prepare.main(argv)
    out = tmp_path / "prepared"
    import datasets

    splits = datasets.load_from_disk(str(out))
    assert sum(len(s) for s in splits.values()) == 20 and set(splits) == {"train", "validation", "test"}
    patients = {name: set(s["patient_id"]) for name, s in splits.items()}
    assert not (patients["train"] & patients["validation"] or patients["train"] & patients["test"]
                or patients["validation"] & patients["test"])
    assert splits["train"][0]["image"].size == (32, 32)
    assert (out / "skipped_files.csv").read_text().splitlines()[1] == "report.dcm,no pixel data (Basic Text SR Storage)"
    card = (out / "README.md").read_text()
    assert "1 file(s)\n  were no usable radiograph" in card and "P-" not in card
    assert "Prepared" in capsys.readouterr().out
    prepare.main(argv)
    assert "Reused" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        prepare.main([*argv, "--view_position", "PA"])  # other settings: refused without --overwrite_output_dir
    prepare.main([*argv, "--view_position", "PA", "--overwrite_output_dir"])
    assert set(datasets.concatenate_datasets(list(datasets.load_from_disk(str(out)).values()))["view_position"]) \
        == {"PA"}


def test_pseudonyms_are_keyed_so_a_guessed_id_cannot_be_tested_without_the_key(tmp_path):
    import hashlib

    chest(tmp_path / "a.dcm", patient="12345")
    (ours,) = dicom.dicom_folder(tmp_path, KEY)[1]["patient_id"]
    (theirs,) = dicom.dicom_folder(tmp_path, bytes(range(1, 33)))[1]["patient_id"]
    assert ours == dicom.patient_key("12345", KEY) != theirs and ours.startswith("dicom-") and len(ours) == 22
    # The unkeyed hash of the ID (what the pseudonym was before) no longer finds it.
    unkeyed = "dicom-" + hashlib.sha256(b"lunggen-diffusers dicom patient|12345").hexdigest()[:16]
    assert ours != unkeyed


def test_the_installations_own_key_is_made_once_private_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    first = dicom.pseudonym_key()
    path = tmp_path / "config" / "lunggen_diffusers" / "pseudonym.key"
    assert len(first) == 32 and path.read_bytes() == first and (path.stat().st_mode & 0o777) == 0o600
    assert dicom.pseudonym_key() == first and not list(path.parent.glob(".*"))  # reused; no temporary left
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "other-machine"))
    assert dicom.pseudonym_key() != first
    with pytest.raises(UsageError, match="--pseudonym_key .*no such file"):
        dicom.pseudonym_key(tmp_path / "absent.key")
    (tmp_path / "short.key").write_bytes(b"x" * 8)
    with pytest.raises(ValueError, match="8 bytes; a key needs at least 16"):
        dicom.pseudonym_key(tmp_path / "short.key")


def test_a_shared_key_gives_every_machine_the_same_split_and_the_record_names_the_key_not_its_bytes(
        tmp_path, monkeypatch):
    import datasets

    from lunggen_diffusers.data import prepare

    for i in range(24):
        chest(tmp_path / "pacs" / f"IM{i:04d}", patient=f"{i // 2}", seed=i)
    (tmp_path / "team.key").write_bytes(KEY)

    def prepare_on(machine, *extra):
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / machine))
        out = tmp_path / f"prepared-{machine}-{len(extra)}"
        prepare.main(["--train_data_dir", str(tmp_path / "pacs"), "--output_dir", str(out), "--resolution", "32",
                      "--cache_dir", str(tmp_path / f"cache-{machine}"), *extra])
        splits = datasets.load_from_disk(str(out))
        report = json.loads((out / "prepare_report.json").read_text())
        return {name: sorted(s["patient_id"]) for name, s in splits.items()}, report, out

    shared = [prepare_on(machine, "--pseudonym_key", str(tmp_path / "team.key")) for machine in ("a", "b")]
    own = [prepare_on(machine) for machine in ("a", "b")]
    assert shared[0][0] == shared[1][0]  # the same pseudonyms in the same splits on both machines
    assert shared[0][1]["pseudonym_key_id"] == shared[1][1]["pseudonym_key_id"] == dicom.key_id(KEY)
    assert own[0][0] != own[1][0] and own[0][1]["pseudonym_key_id"] != own[1][1]["pseudonym_key_id"]
    for _, _, out in shared:
        card = (out / "README.md").read_text()
        assert f"key id {dicom.key_id(KEY)}" in card
        for path in out.rglob("*"):
            assert not path.is_file() or KEY not in path.read_bytes()  # the key itself is nowhere in the output
