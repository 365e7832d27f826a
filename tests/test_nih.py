"""NIH ChestX-ray14: metadata, patient-wise splits, filters, the cached and resumable prepare pass, and training on it.

Real metadata comes from ../shared/data/nih (skipped when absent) and from tests/fixtures/nih (166 real rows of 62
patients, with matching subsets of the official lists). Images are generated stand-ins named after those rows.
"""

import csv
import gzip
import json
import shutil
import types
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from lunggen_diffusers.cli import UsageError
from lunggen_diffusers.config import DataConfig, parse_args
from lunggen_diffusers.data import build, decode, nih, splits
from lunggen_diffusers.data import prepare as prepare_cli

FIXTURE = Path(__file__).parent / "fixtures" / "nih"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih"
# Rows of the fixture written in other PNG modes, or broken.
SPECIAL = {0: "RGBA", 1: "LA", 2: "P", 3: "I;16", 4: "truncated", 5: "not an image"}


def _write_image(path: Path, kind: str, rng: np.random.Generator) -> None:
    gray = (rng.random((48, 40)) * 200 + 20).astype(np.uint8)  # non-square: exercises the centre crop
    if kind == "RGBA":
        Image.fromarray(np.dstack([gray, gray, gray, np.full_like(gray, 255)]), "RGBA").save(path)
    elif kind == "LA":
        Image.fromarray(np.dstack([gray, np.full_like(gray, 255)]), "LA").save(path)
    elif kind == "P":
        Image.fromarray(gray).convert("P").save(path)
    elif kind == "I;16":  # 12-bit values: a plain convert("L") would clip them all to white
        ramp = np.linspace(1000, 4000, gray.size).reshape(gray.shape).astype(np.uint16)
        Image.fromarray(ramp).save(path)
        assert Image.open(path).mode.startswith("I")
    elif kind == "truncated":
        Image.fromarray(gray).save(path)
        path.write_bytes(path.read_bytes()[:60])
    elif kind == "not an image":
        path.write_text("Image Index,Finding Labels\n")
    else:
        Image.fromarray(gray).save(path)


def make_nih(root: Path, layout: str = "numbered", lists: bool = True) -> Path:
    """A stand-in NIH folder: the fixture's metadata and lists, and one small PNG per row in the given layout."""
    root.mkdir(parents=True)
    shutil.copy(FIXTURE / "Data_Entry_2017_v2020.csv", root)
    if lists:
        shutil.copy(FIXTURE / "test_list.txt", root)
        shutil.copy(FIXTURE / "train_val_list.txt", root)
    rng = np.random.default_rng(0)
    names = nih.read_metadata(root / "Data_Entry_2017_v2020.csv")["image_index"]
    rank = {name: k for k, name in enumerate(sorted(names))}
    for i, name in enumerate(names):
        folder = {
            "numbered": root / f"images_{1 + i % 3:03d}" / "images",
            # as NIH's archives: consecutive runs of the sorted names
            "archives": root / f"images_{1 + rank[name] * 3 // len(names):03d}" / "images",
            "images": root / "images",
            "flat": root,
        }
        folder[layout].mkdir(parents=True, exist_ok=True)
        _write_image(folder[layout] / name, SPECIAL.get(i, "L"), rng)
    return root


@pytest.fixture(scope="module")
def nih_dir(tmp_path_factory):
    return make_nih(tmp_path_factory.mktemp("nih") / "NIH")


@pytest.fixture(scope="module")
def fixture_table():
    return nih.read_metadata(FIXTURE / "Data_Entry_2017_v2020.csv")


@pytest.fixture(scope="module")
def prepared(nih_dir, tmp_path_factory):
    """The CLI's output for the stand-in folder at 32 px, and what it printed."""
    out = tmp_path_factory.mktemp("prepared") / "nih-32"
    prepare_cli.main(_prepare_args(nih_dir, out))
    return out


def _prepare_args(nih_dir, out, *extra):
    return ["--nih_dir", str(nih_dir), "--output_dir", str(out), "--resolution", "32",
            "--preprocessing_num_workers", "1", *extra]


# ---------------------------------------------------------------- the real metadata (../shared)


@pytest.fixture(scope="module")
def real():
    if not (SHARED / "Data_Entry_2017_v2020.csv.gz").is_file():
        pytest.skip(f"real NIH metadata not found at {SHARED}")
    return nih.read_metadata(SHARED / "Data_Entry_2017_v2020.csv.gz"), *nih.read_split_lists(SHARED)


def test_real_metadata_official_splits_are_patient_disjoint(real):
    table, test_names, train_val_names = real
    assert len(table["image_index"]) == 112_120
    per_patient = Counter(table["patient_id"])
    assert len(per_patient) == 30_805 and max(per_patient.values()) == 184
    assigned, method = splits.assign_splits(table, test_names, train_val_names, validation_fraction=0.1, seed=0)
    counts = Counter(assigned)
    assert counts["test"] == 25_596 and counts["train"] + counts["validation"] == 86_524
    patients = {s: {p for p, t in zip(table["patient_id"], assigned, strict=True) if t == s} for s in splits.SPLITS}
    assert splits.check_patient_disjoint(patients) == {s: len(p) for s, p in patients.items()}
    assert len(patients["validation"]) == round(0.1 * (len(patients["train"]) + len(patients["validation"])))
    assert "official lists" in method
    again, _ = splits.assign_splits(table, test_names, train_val_names, validation_fraction=0.1, seed=0)
    other, _ = splits.assign_splits(table, test_names, train_val_names, validation_fraction=0.1, seed=1)
    assert again == assigned and other != assigned
    assert [s == "test" for s in other] == [s == "test" for s in assigned]  # the seed never moves the test set


def test_real_metadata_filters_and_per_patient_cap(real):
    table = real[0]
    assert len(splits.select_rows(table, view_position="PA")) == 67_310
    assert len(splits.select_rows(table, include_findings=["No Finding"])) == 60_361
    assert len(splits.select_rows(table, exclude_findings=["No Finding"])) == 112_120 - 60_361
    capped = splits.select_rows(table, max_images_per_patient=5)
    kept = Counter(table["patient_id"][i] for i in capped)
    assert len(kept) == 30_805 and max(kept.values()) == 5
    assert capped == splits.select_rows(table, max_images_per_patient=5)


# ---------------------------------------------------------------- metadata, layouts, splits, filters


def test_2017_csv_with_trailing_column_and_impossible_ages_gzipped(tmp_path, fixture_table):
    lines = (FIXTURE / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    rows = [line + "," for line in lines]  # the 2017 release ends every line with an empty column
    rows[1] = rows[1].replace(",57,M,", ",414,M,")
    with gzip.open(tmp_path / "Data_Entry_2017.csv.gz", "wt") as f:
        f.write("\n".join(rows) + "\n")
    assert nih.find_metadata(tmp_path).name == "Data_Entry_2017.csv.gz"
    table = nih.read_metadata(tmp_path / "Data_Entry_2017.csv.gz")
    assert table["patient_age"][0] is None and table["patient_age"][1:] == fixture_table["patient_age"][1:]
    assert {k: v for k, v in table.items() if k != "patient_age"} == {
        k: v for k, v in fixture_table.items() if k != "patient_age"
    }
    assert fixture_table["finding_labels"][1] == ["Cardiomegaly", "Emphysema"]


@pytest.mark.parametrize("layout", ["numbered", "images", "flat"])
def test_every_layout_is_found(tmp_path, layout, fixture_table):
    found, folders = nih.find_images(make_nih(tmp_path / "NIH", layout))
    assert sorted(found) == sorted(fixture_table["image_index"])
    expected = {"numbered": ["images_001/images", "images_002/images", "images_003/images"], "images": ["images"]}
    assert folders == expected.get(layout, ["."])


def test_split_without_lists_hashes_patients(fixture_table):
    assigned, method = splits.assign_splits(fixture_table, validation_fraction=0.2, test_fraction=0.3, seed=0)
    assert "hash" in method and None not in assigned
    by_split = {s: {p for p, t in zip(fixture_table["patient_id"], assigned, strict=True) if t == s} for s in splits.SPLITS}
    splits.check_patient_disjoint(by_split)
    assert all(by_split.values())
    assert assigned == splits.assign_splits(fixture_table, validation_fraction=0.2, test_fraction=0.3, seed=0)[0]


def test_patient_overlap_is_an_error_naming_patients():
    with pytest.raises(ValueError, match=r"1 patient\(s\) are in both 'train' and 'test' \(e\.g\. 7\)"):
        splits.check_patient_disjoint({"train": [1, 7], "validation": [2], "test": [7, 9]})


def test_filters_compose_and_an_empty_result_names_the_filter(fixture_table):
    t = fixture_table
    rows = splits.select_rows(t, view_position="AP", exclude_findings=["No Finding"], min_age=20, max_age=70)
    assert rows and all(
        t["view_position"][i] == "AP" and "No Finding" not in t["finding_labels"][i] and 20 <= t["patient_age"][i] <= 70
        for i in rows
    )
    capped = splits.select_rows(t, max_images_per_patient=2)
    assert max(Counter(t["patient_id"][i] for i in capped).values()) == 2
    assert set(splits.select_rows(t, max_images_per_patient=1)) < set(capped)  # the cap keeps a nested, stable choice
    with pytest.raises(ValueError, match="--min_age 100 leaves no images"):
        splits.select_rows(t, view_position="PA", min_age=100)
    with pytest.raises(ValueError, match=r"unknown finding\(s\) \['No finding'\]"):
        splits.select_rows(t, include_findings=["No finding"])
    with pytest.raises(ValueError, match="--view_position 'LL' is not one of"):
        splits.select_rows(t, view_position="LL")


# ---------------------------------------------------------------- the prepare pass


def test_prepare_writes_splits_report_failures_and_card(prepared, fixture_table):
    dsdict = datasets.load_from_disk(str(prepared))
    assert list(dsdict) == ["train", "validation", "test"]
    assert all(set(split["split"]) == {name} for name, split in dsdict.items())
    train = dsdict["train"]
    assert set(train.column_names) == {
        "image", "image_index", "patient_id", "finding_labels", "view_position", "patient_age",
        "patient_sex", "follow_up", "split",
    }
    assert train.features["image"] == datasets.Image()  # what diffusers' --image_column image and the viewer read
    assert train[0]["image"].mode == "L" and train[0]["image"].size == (32, 32)
    splits.check_patient_disjoint(dsdict)
    names = fixture_table["image_index"]
    broken = {names[4]: "truncated", names[5]: "UnidentifiedImageError"}
    test_list = set((FIXTURE / "test_list.txt").read_text().split())
    assert set(dsdict["test"]["image_index"]) == test_list - set(broken)
    assert sum(len(split) for split in dsdict.values()) == len(names) - len(broken)
    with open(prepared / "failed_images.csv") as f:
        failed = {row["image"]: row["reason"] for row in csv.DictReader(f)}
    assert failed.keys() == broken.keys()
    assert all(reason in failed[name] for name, reason in broken.items())
    report = json.loads((prepared / "prepare_report.json").read_text())
    assert report["failed_images"] == 2 and report["missing_images"] == 0
    assert report["splits"]["test"]["images"] == len(dsdict["test"])
    assert report["splits"]["train"]["views"] == dict(Counter(dsdict["train"]["view_position"]))

    # Every PNG mode came through; the 16-bit ramp is scaled by its range, not clipped to white.
    assert set(names[:4]) <= {name for split in dsdict.values() for name in split["image_index"]}
    ramp = next(s for s in dsdict.values() if names[3] in s["image_index"])
    pixels = np.asarray(ramp[list(ramp["image_index"]).index(names[3])]["image"])
    assert pixels.min() < 30 and pixels.max() > 225

    card = (prepared / "README.md").read_text()
    assert "ChestX-ray8: Hospital-scale Chest X-ray Database" in card and prepare_cli.SOURCE_URL in card
    assert "acknowledge the NIH Clinical Center as the data provider" in card
    assert f"| test | {len(dsdict['test'])} |" in card
    assert not any(name.split("_")[0] in card for name in names)  # no patient IDs, no image names


def test_second_run_reuses_and_an_interrupted_run_resumes(nih_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "nih-32"
    calls = []
    real_preprocess = decode.preprocess_image

    def counting(image, *args):
        calls.append(1)
        if len(calls) == 120 and interrupt:
            raise KeyboardInterrupt
        return real_preprocess(image, *args)

    monkeypatch.setattr(decode, "preprocess_image", counting)
    monkeypatch.setattr(decode, "CHUNK_PER_PROCESS", 50)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        prepare_cli.main(_prepare_args(nih_dir, out))
    assert not out.exists()  # nothing that could load as complete
    assert len(list((tmp_path / "nih-32.partial").glob("*.arrow"))) == 2

    interrupt, calls[:] = False, []
    prepare_cli.main(_prepare_args(nih_dir, out))
    assert len(calls) == 166 - 2 * 50  # the two finished chunks are reused
    assert not (tmp_path / "nih-32.partial").exists()
    assert "Prepared" in capsys.readouterr().out

    calls[:] = []
    prepare_cli.main(_prepare_args(nih_dir, out))
    assert calls == [] and "Reused" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        prepare_cli.main(_prepare_args(nih_dir, out, "--view_position", "PA"))
    assert "--overwrite_output_dir" in capsys.readouterr().err
    prepare_cli.main(_prepare_args(nih_dir, out, "--view_position", "PA", "--overwrite_output_dir"))
    assert set(datasets.load_from_disk(str(out))["train"]["view_position"]) == {"PA"}


def test_missing_images_are_reported_and_too_many_is_an_error(tmp_path, fixture_table, caplog):
    root = make_nih(tmp_path / "NIH", "images")
    gone = fixture_table["image_index"][10:13]
    for name in gone:
        (root / "images" / name).unlink()
    plan = nih.plan_nih(root, DataConfig(resolution=32))
    assert plan.missing == gone and len(plan.dataset) == 166 - 3
    assert f"3 of 166 images named in Data_Entry_2017_v2020.csv are not under {root}" in caplog.text
    assert gone[0] in caplog.text
    with pytest.raises(UsageError, match="3 of 166 images .* more than --max_failed_fraction 0.01"):
        nih.plan_nih(root, DataConfig(resolution=32, max_failed_fraction=0.01))


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for argv, message in [
        (_prepare_args(tmp_path / "empty", tmp_path / "o"), "no NIH metadata file"),
        (_prepare_args(tmp_path / "none", tmp_path / "o"), "--nih_dir"),
        (_prepare_args(FIXTURE, tmp_path / "o", "--push_to_hub"), "--push_to_hub needs --hub_dataset_id"),
        (_prepare_args(FIXTURE, tmp_path / "o"), "no PNG files"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            prepare_cli.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_push_to_hub_is_private_and_keeps_the_card(prepared, monkeypatch):
    from huggingface_hub import DatasetCard

    pushed = {}
    hub_card = "---\nconfigs:\n- config_name: default\n---\n"  # what datasets' push_to_hub writes
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", lambda self, repo, **kw: pushed.update(kw, data=repo))
    monkeypatch.setattr(DatasetCard, "load", classmethod(lambda cls, *a, **kw: cls(hub_card)))
    monkeypatch.setattr(DatasetCard, "push_to_hub", lambda self, repo_id, **kw: pushed.update(card=str(self)))
    prepare_cli.push_prepared(prepared, "me/nih-32")
    assert pushed["data"] == "me/nih-32" and pushed["private"] is True
    assert "config_name: default" in pushed["card"] and "NIH Clinical Center" in pushed["card"]


# ---------------------------------------------------------------- through build_dataset and train.py


def test_raw_folder_is_prepared_once_then_cached(nih_dir, tiny_config, tmp_path, monkeypatch, fixture_table):
    config = tiny_config(train_data_dir=str(nih_dir), cache_dir=str(tmp_path / "cache"), view_position="PA")
    ds, summary = build.build_dataset(config)
    assert summary.source == "the NIH ChestX-ray14 dataset"
    assert ds[0]["image"].mode == "L" and ds[0]["image"].size == (32, 32)
    planned = nih.plan_nih(nih_dir, config.data).dataset
    broken = set(fixture_table["image_index"][4:6])
    expected = [n for n, s in zip(planned["image_index"], planned["split"], strict=True) if s == "train" and n not in broken]
    assert len(ds) == len(expected) and set(planned["view_position"]) == {"PA"}
    monkeypatch.setattr(decode, "preprocess_image", lambda *a: pytest.fail("decoded again instead of reusing"))
    again, _ = build.build_dataset(config)
    assert len(again) == len(ds)
    report = json.loads(next((tmp_path / "cache").glob("nih-*/prepare_report.json")).read_text())
    assert report["splits"]["train"]["views"] == {"PA": len(ds)} and report["filters"] == {"view_position": "PA"}


def test_filters_apply_to_a_prepared_dataset(prepared, tiny_config, monkeypatch):
    monkeypatch.setattr(decode, "preprocess_image", lambda *a: pytest.fail("a prepared dataset was decoded again"))
    train = datasets.load_from_disk(str(prepared))["train"]
    ap = sum(v == "AP" for v in train["view_position"])
    ds, _ = build.build_dataset(tiny_config(dataset_name=str(prepared), view_position="AP"))
    assert len(ds) == ap > 0
    capped, _ = build.build_dataset(tiny_config(dataset_name=str(prepared), max_images_per_patient=1))
    assert len(capped) == len(set(train["patient_id"]))
    with pytest.raises(ValueError, match="holds 32x32 prepared images but --resolution is 64"):
        build.build_dataset(tiny_config(dataset_name=str(prepared), resolution=64))


def test_a_prepared_dataset_trains_through_train_py(prepared, tmp_path):
    from lunggen_diffusers.training.diffusion import train

    argv = [
        "--dataset_name", str(prepared), "--resolution", "32", "--block_out_channels", "16", "32",
        "--norm_num_groups", "8", "--train_batch_size", "4", "--max_train_steps", "2", "--logger", "none",
        "--output_dir", str(tmp_path / "run"), "--save_images_steps", "100", "--checkpointing_steps", "100",
    ]
    result = train(parse_args(argv))
    assert result.global_step == 2 and np.isfinite(result.final_loss)
    assert (tmp_path / "run" / "model_index.json").is_file()


def test_an_image_folder_with_metadata_csv_is_split_by_patient(tiny_config, tmp_path):
    root, rng = tmp_path / "chexpert-like", np.random.default_rng(0)
    lines = ["file_name,patient_id,finding_labels,view_position,patient_age"]
    for patient in range(30):
        for study in (1, 2):
            name = f"patient{patient:05d}/study{study}/view1_frontal.jpg"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((40, 36)) * 255).astype(np.uint8)).save(root / name)
            findings = "No Finding" if patient % 3 else "Edema|Effusion"
            lines.append(f"{name},patient{patient:05d},{findings},{'AP' if study == 2 else 'PA'},{30 + patient}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    config = dict(train_data_dir=str(root), cache_dir=str(tmp_path / "cache"), validation_fraction=0.2)
    parts = {s: build.load_source(tiny_config(split=s, **config))[0] for s in splits.SPLITS}
    assert sum(len(part) for part in parts.values()) == 60 and all(parts.values())
    splits.check_patient_disjoint(parts)
    assert parts["train"].features["finding_labels"] == datasets.List(datasets.Value("string"))
    pa, _ = build.build_dataset(tiny_config(view_position="PA", include_findings=["Edema"], **config))
    train = parts["train"]
    expected = [v == "PA" and "Edema" in f for v, f in zip(train["view_position"], train["finding_labels"], strict=True)]
    assert len(pa) == sum(expected) > 0 and pa[0]["image"].size == (32, 32)
    (root / lines[1].split(",")[0]).unlink()
    with pytest.raises(UsageError, match="1 of 60 images listed in metadata.csv are not under"):
        build.load_source(tiny_config(**config))


def test_prepare_parses_the_data_config_and_old_flag_spellings():
    args, settings = prepare_cli.parse_command_line(["--nih_dir", "in", "--output_dir", "out", "--num_proc", "3", "--seed=7"])
    assert (args.nih_dir, args.output_dir) == ("in", "out")
    assert isinstance(settings, DataConfig) and settings.resolution == 256  # this command's default, not train.py's
    assert (settings.preprocessing_num_workers, settings.split_seed) == (3, 7)
    _, settings = prepare_cli.parse_command_line(["--nih_dir", "in", "--output_dir", "out", "--split_seed", "2",
                                     "--resolution", "64"])
    assert (settings.split_seed, settings.resolution) == (2, 64)


def test_a_dataset_prepared_by_an_earlier_version_is_refused_in_one_line(tmp_path, tiny_config):
    old = datasets.Dataset.from_dict(
        {"pixel_values": [np.zeros((32, 32), np.uint8)], "patient_id": [1]},
        features=datasets.Features({"pixel_values": datasets.Array2D((32, 32), "uint8"),
                                    "patient_id": datasets.Value("int64")}),
    )
    datasets.DatasetDict({"train": old}).save_to_disk(str(tmp_path / "old"))
    with pytest.raises(ValueError, match=r"prepared by an earlier version .* prepare it again") as error:
        build.build_dataset(tiny_config(dataset_name=str(tmp_path / "old")))
    assert "\n" not in str(error.value)


def test_the_loader_decodes_the_stored_pngs_to_the_pixels_of_the_preprocessing(nih_dir, tiny_config, tmp_path):
    """The training batch is bit for bit preprocess_image of the source file, as the uint8 column stored before."""
    from lunggen_diffusers.training.loop import _WholeBatches, build_dataloader

    config = tiny_config(train_data_dir=str(nih_dir), cache_dir=str(tmp_path / "cache"), train_batch_size=5)
    ds, _ = build.build_dataset(config)
    found, _ = nih.find_images(nih_dir)
    rows = [7, 0, 3, len(ds) - 1]
    expected = np.stack(
        [decode.preprocess_image(Image.open(found[ds[i]["image_index"]]), 32, True) for i in rows]
    )
    batch = _WholeBatches(ds).__getitems__(rows)["pixel_values"]
    assert batch.dtype == torch.uint8 and np.array_equal(batch.numpy(), expected)  # lossless PNG: exact
    assert not np.array_equal(batch.numpy(), expected[..., ::-1])  # and not mirrored

    # The same through DataLoader workers (--dataloader_num_workers 2): every stored image, once per epoch.
    config.training.dataloader_num_workers = 2
    accelerator = types.SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    seen = [b for batch in build_dataloader(ds, None, config, accelerator) for b in batch["pixel_values"].numpy()]
    stored = {np.asarray(image).tobytes() for image in ds["image"]}
    distinct = {b.tobytes() for b in seen}
    assert len(seen) == len(ds) // 5 * 5 == len(distinct) and distinct <= stored  # each once (the stand-ins differ)



# ---------------------------------------------------------------- a partial download (some of the 12 archives)


def test_absent_archives_prepare_what_is_there_and_say_so(tmp_path, fixture_table, caplog):
    root = make_nih(tmp_path / "NIH", "archives")
    names = fixture_table["image_index"]
    shutil.rmtree(root / "images_002")
    kept_001 = sorted(p.name for p in (root / "images_001" / "images").iterdir())
    lost = kept_001[len(kept_001) // 2]  # inside an archive that is present: a failure, as before
    (root / "images_001" / "images" / lost).unlink()
    present = {p.name for p in root.glob("images_*/images/*.png")}
    out = tmp_path / "nih-32"
    prepare_cli.main(_prepare_args(root, out))
    absent = len(names) - len(present) - 1
    warnings = [r.getMessage() for r in caplog.records if "archive folder(s)" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"found {len(present)} of {len(names)} images" in warnings[0]
    assert "images_002, images_004, " in warnings[0] and "images_001" not in warnings[0]
    dsdict = datasets.load_from_disk(str(out))
    broken = set(names[4:6])
    prepared = {n for split in dsdict.values() for n in split["image_index"]}
    assert prepared == present - broken
    test_list = set((FIXTURE / "test_list.txt").read_text().split())
    assert set(dsdict["test"]["image_index"]) == test_list & present - broken
    splits.check_patient_disjoint(dsdict)
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["missing_images"] == 1 and report["images_in_absent_archives"] == absent
    assert report["absent_archives"][:2] == ["images_002", "images_004"]
    with open(out / "failed_images.csv") as f:
        assert {row["image"] for row in csv.DictReader(f)} == {lost} | broken
    card = (out / "README.md").read_text()
    assert f"Partial download: {len(present)} of {len(names)} images found" in card and "images_002" in card
    # Missing files inside a present archive still count against --max_failed_fraction (1 of the present ones).
    with pytest.raises(UsageError, match=f"1 of {len(present) + 1} images .* --max_failed_fraction"):
        nih.plan_nih(root, DataConfig(resolution=32, max_failed_fraction=0.005))


def test_a_flattened_folder_counts_every_missing_file_as_a_failure(tmp_path, fixture_table):
    root = make_nih(tmp_path / "NIH", "flat")
    gone = sorted(fixture_table["image_index"])[55:111]  # what images_002 holds in the archive layout
    for name in gone:
        (root / name).unlink()
    with pytest.raises(UsageError, match="56 of 166 images .* more than --max_failed_fraction 0.2"):
        nih.plan_nih(root, DataConfig(resolution=32, max_failed_fraction=0.2))


def test_the_published_archive_ranges_on_the_real_metadata(real, tmp_path, caplog):
    table = real[0]
    ranges = nih.archive_ranges(table["image_index"])
    assert list(ranges) == list(nih.ARCHIVES) and sum(nih.ARCHIVE_SIZES) == len(table["image_index"])
    assert ranges["images_001"] == ("00000001_000.png", "00001335_006.png")
    assert ranges["images_012"][1] == "00030805_000.png"
    ordered = sorted(table["image_index"])
    for (_, last), (first, _) in zip(list(ranges.values()), list(ranges.values())[1:], strict=False):
        assert ordered.index(first) == ordered.index(last) + 1  # consecutive, no gap, no overlap

    # images_001 alone, without its last file: that one is a failure, not part of an absent archive; a span of
    # the files found could not tell.
    root = tmp_path / "NIH"
    folder = root / "images_001" / "images"
    folder.mkdir(parents=True)
    shutil.copy(SHARED / "Data_Entry_2017_v2020.csv.gz", root)
    png = (FIXTURE.parent / "nih" / "test_list.txt").read_bytes()  # any bytes: planning opens no image
    first, last = ranges["images_001"]
    for name in ordered[: ordered.index(last)]:
        (folder / name).write_bytes(png)
    plan = nih.plan_nih(root, DataConfig(resolution=32))
    assert plan.missing == [last]
    assert plan.report["images_in_absent_archives"] == len(ordered) - 4_999
    assert plan.report["absent_archives"] == list(nih.ARCHIVES[1:])
    assert f"found 4,998 of {len(ordered):,} images" in caplog.text
def test_a_cache_or_dataset_of_another_format_version_is_never_read_as_this_one(nih_dir, tmp_path, monkeypatch,
                                                                                   tiny_config, capsys):
    calls = []
    real_preprocess = decode.preprocess_image
    monkeypatch.setattr(decode, "preprocess_image", lambda *a: calls.append(1) or real_preprocess(*a))
    config = tiny_config(train_data_dir=str(nih_dir), cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "nih-32"
    for version in (1, decode.FORMAT_VERSION):
        monkeypatch.setattr(decode, "FORMAT_VERSION", version)
        monkeypatch.setattr(nih, "FORMAT_VERSION", version)
        calls[:] = []
        build.build_dataset(config)
        assert len(calls) == 166 - 2  # all decoded again (two stand-ins never open): no other version's cache
        calls[:] = []
        if version == 1:
            prepare_cli.main(_prepare_args(nih_dir, out))
        else:
            with pytest.raises(SystemExit):
                prepare_cli.main(_prepare_args(nih_dir, out))
            printed = capsys.readouterr()
            assert calls == [] and "Reused" not in printed.out and "--overwrite_output_dir" in printed.err
