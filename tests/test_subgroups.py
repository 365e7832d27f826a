"""Subgroup figures: the bootstrap finds a planted difference and flags nothing where there is none, and the evaluate
command reads subgroups from a dataset's columns and a generated folder's manifest."""

import csv
import json

import datasets
import numpy as np
import pytest

from lunggen_diffusers.data.phantom import phantom_dataset
from lunggen_diffusers.evaluation.cli import main
from lunggen_diffusers.evaluation.subgroups import parse_subgroups, subgroup_report
from lunggen_diffusers.vocabulary import age_bin


def _population(n, seed, shift_women=0.0, women_rate=0.3):
    """n patients with two images each: 16-d features, a sex, one finding at rate 0.3 (women_rate for women)."""
    rng = np.random.default_rng(seed)
    sex = np.repeat(np.where(rng.random(n) < 0.45, "F", "M"), 2)
    features = rng.standard_normal((2 * n, 16)) + (sex == "F")[:, None] * shift_women
    sick = rng.random(2 * n) < np.where(sex == "F", women_rate, 0.3)
    return features, {"patient_sex": list(sex)}, sick[:, None].astype(float), [f"p{i // 2}" for i in range(2 * n)]


def _report(fake, real=None, resamples=150):
    real = real or _population(300, 0)
    return subgroup_report(real[0], fake[0], real[1], fake[1], real[3], real[2], fake[2], ["finding"], k=3,
                           num_resamples=resamples, seed=0)


def test_no_difference_flags_nothing():
    report = _report(_population(300, 1))
    assert report["flagged"] == []
    women = report["groups"]["patient_sex"]["F"]
    assert women["num_real"] == 2 * women["num_real_patients"] and women["fd_gap_interval"][0] < 0 < \
        women["fd_gap_interval"][1]
    assert abs(report["level"] - (1 - 0.05 / 4)) < 1e-12  # Bonferroni: FD and one finding in two subgroups
    assert abs(women["kid"]) < 0.05 and {"precision", "recall", "density", "coverage"} <= set(women)


def test_a_shifted_subgroup_is_flagged_on_distance_and_a_lowered_rate_on_its_finding():
    shifted = _report(_population(300, 1, shift_women=0.6))
    women, men = shifted["groups"]["patient_sex"]["F"], shifted["groups"]["patient_sex"]["M"]
    # Women are further from the real women than everyone is from everyone; men, by the same token, closer.
    assert "patient_sex=F: FD" in shifted["flagged"] and women["fd_gap_interval"][0] > 0 > men["fd_gap"]
    assert women["kid"] > 10 * max(men["kid"], 1e-3)
    lowered = _report(_population(300, 1, women_rate=0.05))
    women, men = lowered["groups"]["patient_sex"]["F"]["findings"]["finding"], \
        lowered["groups"]["patient_sex"]["M"]["findings"]["finding"]
    assert women["flagged"] and women["gap_interval"][1] < 0 < men["gap"]
    assert abs(women["fake"] - 0.05) < 0.04 and abs(women["real"] - 0.3) < 0.06


def test_age_bins_and_subgroup_names():
    assert [age_bin(a) for a in (0, 17.9, 18, 39, 40, 60, 79.5, 80, 95, None)] == [
        "0-17", "0-17", "18-39", "18-39", "40-59", "60-79", "60-79", "80+", "80+", ""]
    assert parse_subgroups("patient_sex, age_bin") == ["patient_sex", "age_bin"]
    with pytest.raises(ValueError, match="--subgroups 'sex': choose a comma-separated list of patient_sex, age_bin"):
        parse_subgroups("sex")


@pytest.fixture(scope="module")
def phantom_sets(tmp_path_factory):
    """Held-out phantoms as a saved dataset, and 'generated' phantoms in a folder whose manifest asks for each
    image's own patient (so the classifier should agree with the request)."""
    root = tmp_path_factory.mktemp("subgroups")
    phantom_dataset(160, 64, seed=1, finding_prob=0.2).save_to_disk(root / "real")
    fake = phantom_dataset(160, 64, seed=2, finding_prob=0.2)
    (root / "fake").mkdir()
    with open(root / "fake" / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["file", "index", "labels"])
        writer.writeheader()
        for i, row in enumerate(fake):
            row["image"].save(root / "fake" / f"image_{i:05d}.png")
            findings = [n for n in row["finding_labels"] if n != "No Finding"]
            writer.writerow({"file": f"image_{i:05d}.png", "index": i, "labels": "|".join(
                findings + [f"patient_sex={row['patient_sex']}", f"patient_age={age_bin(row['patient_age'])}",
                            f"view_position={row['view_position']}"])})
    return root


def test_the_evaluate_command_reports_subgroups_and_the_patient_shown(phantom_sets, tmp_path):
    out = tmp_path / "eval"
    main(["--real", str(phantom_sets / "real"), "--fake", str(phantom_sets / "fake"), "--features", "phantom",
          "--image_size", "64", "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
          "--diversity_pairs", "20", "--kid_subsets", "5", "--subgroups", "patient_sex,view_position",
          "--subgroup_bootstrap", "40"])
    written = json.loads((out / "metrics.json").read_text())
    subgroups = written["metrics"]["subgroups"]
    assert set(subgroups["groups"]) == {"patient_sex", "view_position"}
    assert set(subgroups["groups"]["patient_sex"]) == {"F", "M"}
    # Phantoms asked for their own patient: the shipped classifier reads it back.
    agreement = subgroups["demographic_agreement"]
    assert agreement["patient_sex_agreement"] >= 0.9 and agreement["view_position_agreement"] >= 0.9
    assert agreement["age_correlation"] >= 0.5
    assert subgroups["flagged"] == []  # two draws of one phantom population
    rows = written["model_card"]["subgroups"]
    assert [r["subgroup"] for r in rows] == ["patient_sex=F", "patient_sex=M", "view_position=AP", "view_position=PA"]
    assert "phantom-" not in json.dumps(written["model_card"])
    assert "## Subgroups" in (out / "report.md").read_text()


def test_subgroups_need_the_columns_on_the_real_side(phantom_sets, tmp_path, capsys):
    data = datasets.load_from_disk(str(phantom_sets / "real")).remove_columns(["patient_sex"])
    data.save_to_disk(tmp_path / "bare")
    with pytest.raises(SystemExit):
        main(["--real", str(tmp_path / "bare"), "--fake", str(phantom_sets / "fake"), "--features", "pixels",
              "--image_size", "64", "--output_dir", str(tmp_path / "eval"), "--subgroups", "patient_sex"])
    assert "--subgroups patient_sex: --real" in capsys.readouterr().err
