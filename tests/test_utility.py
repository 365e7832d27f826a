"""Downstream utility (train on synthetic, test on real): AUROC and bootstrap, regimes, leakage, resume, bad input.

Real data are saved DatasetDicts of phantoms built here (32 px); "synthetic" folders are phantoms written as a
pipeline.py folder (PNGs + manifest.csv with a labels column). No generator is trained.
"""

import csv
import json

import datasets
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from lunggen_diffusers.config import preset_values
from lunggen_diffusers.data.phantom import FINDINGS, phantom_dataset
from lunggen_diffusers.evaluation.stats import (
    auroc,
    bootstrap_aurocs,
    interval,
    patient_weights,
    weighted_auroc,
)
from lunggen_diffusers.utility import data as utility_data
from lunggen_diffusers.utility import run as utility_run
from lunggen_diffusers.utility.cli import main
from lunggen_diffusers.utility.data import (
    ImageSet,
    patient_rows,
    real_splits,
    synthetic_set,
)
from lunggen_diffusers.utility.report import STYLES
from lunggen_diffusers.utility.run import UtilityArguments, regime_parts, run_utility
from lunggen_diffusers.utility.subgroups import (
    subgroup_markdown,
    subgroup_summary,
    youden_thresholds,
)

SIZE = 32


def _split(n, start, noise_seed=None, pixel_values=False):
    ds = phantom_dataset(n, SIZE, seed=0, finding_prob=0.3, start_index=start)
    if noise_seed is not None:  # labels independent of the images
        rng = np.random.default_rng(noise_seed)
        noise = [[f for f in FINDINGS if rng.random() < 0.3] or ["No Finding"] for _ in range(n)]
        ds = ds.remove_columns("finding_labels").add_column("finding_labels", noise,
                                                            feature=datasets.List(datasets.Value("string")))
    if pixel_values:  # a prepared split (uint8 arrays) instead of an image column
        features = datasets.Features({**ds.features, "pixel_values": datasets.Array2D((SIZE, SIZE), "uint8")})
        del features["image"]
        ds = ds.map(lambda row: {"pixel_values": np.asarray(row["image"])}, remove_columns="image",
                    features=features)
    return ds


def _real(path, n_train=240, noise=False, test_start=None):
    splits = datasets.DatasetDict({
        "train": _split(n_train, 0, noise_seed=1 if noise else None),
        "validation": _split(80, 10_000, noise_seed=2 if noise else None, pixel_values=True),
        "test": _split(200, 20_000 if test_start is None else test_start),
    })
    splits.save_to_disk(str(path))
    return str(path)


def _synthetic(path, n=120, labels=True, rename=lambda name: name.replace("_", " ").title()):
    """A pipeline.py-style folder; labels written as a generator's vocabulary would be ("Pleural Effusion")."""
    path.mkdir()
    ds = phantom_dataset(n, SIZE, seed=5, finding_prob=0.3)
    fields = ["file", "index"] + (["labels"] if labels else [])
    with open(path / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for i, row in enumerate(ds):
            row["image"].save(path / f"image_{i:06d}.png")
            names = [rename(name) for name in row["finding_labels"] if name != "No Finding"]
            writer.writerow({"file": f"image_{i:06d}.png", "index": i,
                             **({"labels": "|".join(names) or "No Finding"} if labels else {})})
    return str(path)


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory):
    return _real(tmp_path_factory.mktemp("real") / "real")


def _args(real, synthetic, out, **overrides):
    values = dict(real=real, synthetic=synthetic, output_dir=str(out), classifier="linear", features="pixels",
                  resolution=SIZE, max_steps=60, batch_size=32, learning_rate=1e-2, eval_steps=20, seeds=1,
                  regimes=["real"], bootstrap=50, cpu_threads=1)
    return UtilityArguments(**{**values, **overrides})


# --- AUROC and bootstrap against hand-computed cases ---

def test_auroc_rank_formula_with_ties():
    # Pairs (pos, neg): 0.35 beats 0.1, loses to 0.4; 0.8 beats both -> 3 of 4.
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # A positive tied with both negatives counts half for each: (0.5 + 0.5 + 1 + 1) / 4.
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.9]) == pytest.approx(0.75)
    assert auroc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)  # one tied pair: half, whatever the sort order
    assert auroc([1, 1, 0], [0.2, 0.3, 0.9]) == pytest.approx(0.0)
    assert np.isnan(auroc([1, 1], [0.2, 0.3]))


def test_weighted_auroc_equals_the_materialised_resample():
    labels = np.array([0, 1, 0, 1, 1, 0], bool)
    scores = np.array([0.2, 0.2, 0.5, 0.9, 0.1, 0.9])
    weights = np.array([[1, 2, 0, 1, 3, 1], [0, 1, 1, 0, 1, 2], [1, 1, 1, 1, 1, 1]])
    got = weighted_auroc(labels, scores, weights)
    for row, value in zip(weights, got, strict=True):
        copies = np.repeat(np.arange(len(labels)), row)
        assert value == pytest.approx(auroc(labels[copies], scores[copies]))
    # By hand, row 2 (1 = every image once): positives 0.2, 0.9, 0.1 vs negatives 0.2, 0.5, 0.9
    # -> 0.2: 0.5 + 0 + 0; 0.9: 1 + 1 + 0.5; 0.1: 0 -> 3 / 9.
    assert got[2] == pytest.approx(3 / 9)


def test_bootstrap_resamples_patients_with_their_images():
    patients = ["a", "a", "b", "c", "c", "c"]
    weights = np.concatenate(list(patient_weights(patients, 250, seed=3)))
    assert weights.shape == (250, 6)
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 3] == weights[:, 5]).all()
    assert (weights[:, [0, 2, 3]].sum(axis=1) == 3).all()  # 3 patients drawn per resample
    labels = np.array([[1], [0], [1], [0], [1], [0]], bool)
    scores = np.random.default_rng(0).random((2, 6, 1))
    boot = bootstrap_aurocs(labels, scores, patients, 250, seed=3)
    for b in (0, 17, 249):  # each replicate is the AUROC of that resample, materialised
        copies = np.repeat(np.arange(6), weights[b].astype(int))
        for run in range(2):
            expected = auroc(labels[copies, 0], scores[run, copies, 0])
            assert boot[b, run, 0] == pytest.approx(expected, nan_ok=True)
    np.testing.assert_array_equal(boot, bootstrap_aurocs(labels, scores, patients, 250, seed=3))  # fixed seed
    assert interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))


# --- data and regimes ---

def test_regimes_are_patient_disjoint_from_validation_and_test(real_folder, tmp_path):
    real, findings, _ = real_splits(real_folder, SIZE)
    synthetic = synthetic_set(_synthetic(tmp_path / "synth"), findings, SIZE)
    held_out = set(real["validation"].patients) | set(real["test"].patients)
    for name in utility_run.REGIMES:
        parts = dict(regime_parts(name, real["train"], synthetic, 0.1, seed=0))
        patients = {real["train"].patients[i] for i in parts.get("train", [])}
        assert not patients & held_out
        assert ("synthetic" in parts) == name.endswith("synthetic")
        if name.startswith("low-real"):
            assert len(patients) == 24  # 10% of 240 patients
    # Several images per patient: the low-data subset takes whole patients.
    data = ImageSet(np.zeros((9, 2, 2), np.uint8), np.zeros((9, 1), np.float32), list("aaabbbccc"))
    rows = patient_rows(data.patients, 0.34, seed=0)
    assert len(rows) == 6 and len({data.patients[i] for i in rows}) == 2


def test_a_patient_in_train_and_test_is_refused(tmp_path):
    with pytest.raises(ValueError, match="patient"):
        real_splits(_real(tmp_path / "real", test_start=200), SIZE)  # test phantoms 200.. overlap train 0..239


def test_phantom_splits_are_the_demo_training_set_and_held_out_phantoms(monkeypatch):
    small = utility_data.from_dict({"preset": "demo", "condition_on": ["findings"], "num_phantom_images": 12,
                                    "resolution": SIZE})
    monkeypatch.setattr(utility_data, "from_dict", lambda values: small)
    monkeypatch.setattr(utility_data, "PHANTOM_HELD_OUT", {"validation": 4, "test": 6})
    splits = utility_data._phantom_splits()
    assert splits["train"]["patient_id"] == [f"phantom-0-{i}" for i in range(12)]
    assert splits["validation"]["patient_id"] == [f"phantom-0-{i}" for i in range(12, 16)]
    assert splits["test"]["patient_id"] == [f"phantom-0-{i}" for i in range(16, 22)]
    assert small.data.phantom_finding_prob == preset_values("demo", conditional=True)["phantom_finding_prob"]  # its prevalence


# --- leakage, resume, report ---

@pytest.mark.parametrize("noise", [True, False])
def test_noise_labels_score_about_half(tmp_path, noise):
    """Trained on labels that are pure noise, the classifier cannot beat chance on the real test split unless test
    labels leak in. The same run on true labels must score well above, or this test could not fail."""
    args = _args(_real(tmp_path / "real", noise=noise), _synthetic(tmp_path / "synth"), tmp_path / "out")
    macro = run_utility(args)["regimes"]["real"]["macro"]["auroc"]
    # 200 test images, ~60 positives per finding: one finding's AUROC under chance has SD
    # sqrt((n1 + n0 + 1) / (12 n1 n0)) ~ 0.045, the mean of four ~0.025; 0.1 is four such SDs.
    if noise:
        assert abs(macro - 0.5) < 0.1
    else:
        assert macro > 0.7


def test_finished_runs_are_not_retrained(real_folder, tmp_path, monkeypatch):
    real, synth = real_folder, _synthetic(tmp_path / "synth")
    first = run_utility(_args(real, synth, tmp_path / "out", regimes=["real", "synthetic"]))

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(utility_run, "train", refuse)
    again = run_utility(_args(real, synth, tmp_path / "out", regimes=["real", "synthetic"]))
    assert again["regimes"] == first["regimes"]
    with pytest.raises(ValueError, match="max_steps"):
        run_utility(_args(real, synth, tmp_path / "out", max_steps=61))


def test_resnet_report_card_section_and_plot(real_folder, tmp_path):
    real, synth = real_folder, _synthetic(tmp_path / "synth")
    out = tmp_path / "out"
    result = run_utility(_args(real, synth, out, classifier="resnet", hidden_sizes=[4, 8], max_steps=4,
                               eval_steps=2, batch_size=8, regimes=list(utility_run.REGIMES)))
    assert set(result) >= {"regimes", "tstr_trtr_ratio", "low_data_gain"}
    assert result["tstr_trtr_ratio"]["value"] == pytest.approx(
        result["regimes"]["synthetic"]["macro"]["auroc"] / result["regimes"]["real"]["macro"]["auroc"])
    saved = json.loads((out / "utility.json").read_text())
    assert saved["data"]["findings"] == sorted(FINDINGS)
    card = (out / "card_section.md").read_text()
    assert card.startswith("## Downstream utility\n")
    assert str(tmp_path) not in card and "phantom-0-" not in card  # no local paths, no patient IDs
    assert "synthetic only (TSTR)" in card and "pleural_effusion" in card
    plot = np.asarray(Image.open(out / "utility.png").convert("RGB"))
    for colour, _ in STYLES.values():  # one marker colour per regime
        assert (plot == colour).all(axis=-1).any(), f"no marker of colour {colour}"


def test_pretrained_checkpoint_by_path(real_folder, tmp_path):
    """A checkpoint (here a tiny 3-channel ResNet saved by the test, standing in for a Hub id) gets a new head for
    the real findings and sees the gray image in all three channels."""
    torch.manual_seed(0)
    config = transformers.ResNetConfig(num_channels=3, embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1],
                                       num_labels=10)
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path / "ckpt")
    result = run_utility(_args(real_folder, _synthetic(tmp_path / "synth"), tmp_path / "out",
                               classifier="resnet", model_name_or_path=str(tmp_path / "ckpt"), max_steps=2,
                               eval_steps=1, batch_size=8))
    assert len(result["regimes"]["real"]["per_finding"]) == 4
    assert result["settings"]["pretrained"] is True


# --- bad input: one clear line each ---

def _error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # not progress bars
    assert len(errors) == 1 and errors[0].startswith("error: ")
    return errors[0]


def _argv(real, synthetic, out):
    return ["--real", real, "--synthetic", synthetic, "--output_dir", str(out), "--classifier", "linear",
            "--resolution", str(SIZE), "--max_steps", "2", "--seeds", "1", "--regimes", "real"]


def test_synthetic_folder_without_labels(real_folder, tmp_path, capsys):
    message = _error(capsys, _argv(real_folder, _synthetic(tmp_path / "s", labels=False), tmp_path))
    assert "no labels column" in message and "--labels_from train" in message


def test_unconditioned_synthetic_images(real_folder, tmp_path, capsys):
    synth = _synthetic(tmp_path / "s", n=3, rename=lambda name: name)
    rows = list(csv.DictReader(open(f"{synth}/manifest.csv")))
    rows[1]["labels"] = "unconditioned"
    with open(f"{synth}/manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    message = _error(capsys, _argv(real_folder, synth, tmp_path))
    assert "image_000001.png" in message and "unconditioned" in message


def test_synthetic_label_the_real_data_lacks(real_folder, tmp_path, capsys):
    synth = _synthetic(tmp_path / "s", n=20, rename=lambda name: "Hernia" if name == "nodule" else name)
    message = _error(capsys, _argv(real_folder, synth, tmp_path))
    assert "'Hernia'" in message and "cardiomegaly" in message


def test_too_few_test_positives_names_the_finding_and_count(real_folder, tmp_path, capsys):
    splits = datasets.load_from_disk(real_folder)
    test = splits["test"]
    keep = [i for i, labels in enumerate(test["finding_labels"]) if "nodule" not in labels]
    keep += [i for i, labels in enumerate(test["finding_labels"]) if "nodule" in labels][:3]
    splits["test"] = test.select(sorted(keep))
    splits.save_to_disk(str(tmp_path / "few"))
    message = _error(capsys, _argv(str(tmp_path / "few"), _synthetic(tmp_path / "s", n=3), tmp_path))
    assert "'nodule'" in message and "3 positive" in message


def test_missing_split_and_unknown_regime(tmp_path, capsys):
    datasets.DatasetDict({"train": _split(4, 0)}).save_to_disk(str(tmp_path / "one"))
    message = _error(capsys, _argv(str(tmp_path / "one"), str(tmp_path), tmp_path))
    assert "validation" in message and "test" in message
    message = _error(capsys, _argv("phantom", str(tmp_path), tmp_path)[:-1] + ["real-only"])
    assert "'real-only'" not in message and "real-only" in message and "low-real+synthetic" in message


# --- subgroups ---

def test_youden_threshold_is_the_best_split():
    labels = np.array([[0], [0], [1], [0], [1], [1]], float)
    scores = np.array([[0.1], [0.2], [0.3], [0.35], [0.6], [0.9]])
    # Calling >= 0.3 positive catches all 3 positives with 1 false positive (J = 2/3), the best of any cut.
    assert youden_thresholds(labels, scores)[0] == pytest.approx(0.3)


def test_the_operating_point_is_chosen_on_validation_not_on_the_test_split():
    labels, patients, groups, _ = _scored_population(400, 0)
    perfect = labels.copy()  # on test, any cut in (0, 1] separates the classes: Youden on test would call every one
    validation_labels = np.array([[0.0], [1.0]])
    summary = subgroup_summary(labels, patients, groups, {"real": [perfect]}, 50, 0, validation_labels,
                               {"real": [np.array([[0.5], [2.0]])]})  # validation puts the cut at 2.0
    assert summary["groups"]["everyone"]["real"]["underdiagnosis"] == 1.0  # no test score reaches it
    assert "validation" in summary["operating_point"]
    # A finding with no positive in validation has no operating point: never called.
    assert youden_thresholds(np.zeros((3, 1)), np.array([[0.1], [0.5], [0.9]]))[0] == np.inf


def _scored_population(n, seed, women_noise=0.0):
    """n patients, one image each, one finding at 0.4; scores = label + noise, noisier for women by women_noise."""
    rng = np.random.default_rng(seed)
    sex = np.where(rng.random(n) < 0.5, "F", "M")
    labels = (rng.random((n, 1)) < 0.4).astype(float)
    noise = rng.standard_normal((3, n, 1)) * (0.5 + women_noise * (sex == "F"))[None, :, None]
    return labels, [f"p{i}" for i in range(n)], {"patient_sex": list(sex)}, [labels[None] + noise[s] for s in range(3)]


def _validation(n=600, women_noise=0.0):
    """The same classifier's scores on other patients: where the operating point is chosen."""
    labels, _, _, runs = _scored_population(n, 99, women_noise)
    return labels, {"real": [r[0] for r in runs]}


def test_subgroup_underdiagnosis_finds_a_group_the_classifier_reads_worse():
    labels, patients, groups, runs = _scored_population(1200, 0)
    clean = subgroup_summary(labels, patients, groups, {"real": [r[0] for r in runs]}, 200, 0, *_validation())
    assert clean["flagged"] == [] and abs(clean["level"] - (1 - 0.05 / 4)) < 1e-12
    labels, patients, groups, runs = _scored_population(1200, 0, women_noise=0.6)
    worse = subgroup_summary(labels, patients, groups, {"real": [r[0] for r in runs]}, 200, 0,
                             *_validation(women_noise=0.6))
    women = worse["groups"]["patient_sex"]["F"]["real"]
    assert women["underdiagnosis_gap_interval"][0] > 0 and women["macro_auroc_gap_interval"][1] < 0
    assert "patient_sex=F real: underdiagnosis" in worse["flagged"]
    lines = "\n".join(subgroup_markdown(worse, utility_run.REGIMES))
    assert "patient_sex=F" in lines and "(flagged)" in lines


def test_the_utility_command_reports_subgroups(real_folder, tmp_path):
    args = _args(real_folder, _synthetic(tmp_path / "synth"), tmp_path / "out", regimes=["real", "synthetic"],
                 subgroups="patient_sex,view_position")
    result = utility_run.run_utility(args)
    groups = result["subgroups"]["groups"]
    assert set(groups["patient_sex"]) == {"F", "M"} and set(groups["view_position"]) == {"AP", "PA"}
    assert set(groups["patient_sex"]["F"]) == {"num_images", "num_diseased", "real", "synthetic"}
    assert sum(groups["patient_sex"][v]["num_images"] for v in ("F", "M")) == 200
    assert "### Per subgroup" in (tmp_path / "out" / "card_section.md").read_text()
    validation = np.load(tmp_path / "out" / "runs" / "real" / "seed-0.validation.npy")
    assert validation.shape == (result["data"]["num_images"]["validation"], len(result["data"]["findings"]))
    with pytest.raises(ValueError, match="--subgroups 'race'"):
        utility_run.run_utility(_args(real_folder, str(tmp_path / "synth"), tmp_path / "out2", subgroups="race"))


def test_a_subgroup_with_no_underdiagnosed_image_is_not_flagged_better():
    labels, patients, groups, runs = _scored_population(1200, 0)
    few = np.flatnonzero(np.asarray(groups["patient_sex"]) == "F")[:25]
    scores = runs[0][0].copy()
    scores[few] = labels[few] * 10  # 25 patients the classifier calls right
    groups = {"patient_sex": ["few" if i in set(few) else "rest" for i in range(1200)]}
    validation_labels, validation_scores = _validation()
    summary = subgroup_summary(labels, patients, groups, {"real": [scores]}, 200, 0, validation_labels,
                               {"real": validation_scores["real"][:1]})  # the one run's own validation scores
    entry = summary["groups"]["patient_sex"]["few"]["real"]
    assert entry["underdiagnosis"] == 0 and np.isnan(entry["underdiagnosis_gap_interval"][0])
    assert "patient_sex=few real: underdiagnosis" not in summary["flagged"]
