"""The procedural chest phantom: determinism, shapes, labels, radiological laterality, argument checks."""

import numpy as np
import pytest
from PIL import Image

from lunggen_diffusers.data.phantom import (
    FINDINGS,
    Demographics,
    draw_phantom,
    draw_study,
    main,
    patients_of,
    phantom_dataset,
    phantom_grid,
    render_phantom,
)


def _centres(resolution):
    """Normalised pixel-centre coordinates in [-1, 1]; x grows to the image's right, y downwards."""
    return (np.arange(resolution) + 0.5) * 2 / resolution - 1


def _heart_minus_lung(image, inner=0.2, outer=0.4):
    """Mean of the band inner < x < outer right of centre minus its mirror image, at the level of the heart."""
    c = _centres(image.shape[0])
    rows = image[(c > 0.1) & (c < 0.35)]
    return rows[:, (c > inner) & (c < outer)].mean() - rows[:, (c > -outer) & (c < -inner)].mean()


def _lowest_lung_row(image, side):
    """Lowest row holding dark lung (in the lower half, on side -1 = image left or +1 = image right): the
    costophrenic angle, which sits under its hemidiaphragm."""
    c = _centres(image.shape[0])
    threshold = (np.percentile(image, 10) + np.percentile(image, 90)) / 2
    bright = image > threshold
    # Dark pixels with body on both sides of them along the row: lung, not the black background.
    inside = np.maximum.accumulate(bright, 1) & np.maximum.accumulate(bright[:, ::-1], 1)[:, ::-1]
    dark_rows = ((image < threshold) & inside)[:, c * side > 0.15].any(1) & (c > 0)
    return np.nonzero(dark_rows)[0].max()


@pytest.fixture(scope="module")
def laterality_images():
    return [render_phantom(128, np.random.default_rng([11, i])).astype(float) for i in range(12)]


def test_heart_is_on_the_image_right(laterality_images):
    for image in laterality_images:
        assert _heart_minus_lung(image) > 10
        assert _heart_minus_lung(image[:, ::-1]) < -10  # the check does catch a mirrored film


def test_right_hemidiaphragm_on_the_image_left_is_higher(laterality_images):
    for image in laterality_images:
        assert _lowest_lung_row(image, -1) < _lowest_lung_row(image, +1)
        mirrored = image[:, ::-1]
        assert _lowest_lung_row(mirrored, -1) > _lowest_lung_row(mirrored, +1)


def test_radiograph_convention_dark_background_and_lungs_bright_mediastinum(laterality_images):
    c = _centres(128)
    for image in laterality_images:
        assert image[:4, :4].mean() < 10 and image[:4, -4:].mean() < 10  # outside the body, above the shoulders
        spine = image[(c > -0.3) & (c < 0.0)][:, np.abs(c) < 0.05].mean()
        lung = image[(c > -0.3) & (c < 0.0)][:, np.abs(c + 0.45) < 0.05].mean()
        assert spine > lung + 60


@pytest.mark.parametrize("resolution", [32, 64, 1024])
def test_any_resolution_gives_uint8_square(resolution):
    image = render_phantom(resolution, np.random.default_rng(0))
    assert image.shape == (resolution, resolution) and image.dtype == np.uint8
    assert image.min() < 20 and image.max() > 200


def test_dataset_images_are_mode_l_with_the_right_size():
    ds = phantom_dataset(3, resolution=48)
    assert ds.column_names == ["image", "patient_id", "finding_labels", *FINDINGS, "patient_sex", "patient_age",
                               "view_position", "report"]
    for image in ds["image"]:
        assert isinstance(image, Image.Image) and image.mode == "L" and image.size == (48, 48)


def _png_bytes(ds):
    return [row["bytes"] for row in ds.with_format("arrow")["image"].to_pylist()]


def test_same_seed_same_bytes_and_subsets_regenerate():
    full = phantom_dataset(6, resolution=32, seed=3, finding_prob=0.5)
    assert _png_bytes(full) == _png_bytes(phantom_dataset(6, resolution=32, seed=3, finding_prob=0.5))
    part = phantom_dataset(2, resolution=32, seed=3, finding_prob=0.5, start_index=4)
    assert _png_bytes(part) == _png_bytes(full)[4:]
    assert part["patient_id"] == full["patient_id"][4:] == ["phantom-3-4", "phantom-3-5"]
    assert part["finding_labels"] == full["finding_labels"][4:]


def test_different_seeds_and_indices_differ():
    a = phantom_dataset(2, resolution=32, seed=0)
    b = phantom_dataset(2, resolution=32, seed=1)
    assert len(set(_png_bytes(a) + _png_bytes(b))) == 4
    assert len(set(list(a["patient_id"]) + list(b["patient_id"]))) == 4


def test_labels_match_the_finding_columns():
    ds = phantom_dataset(40, resolution=32, seed=5, finding_prob=0.5)
    seen = set()
    for row in ds:
        present = [f for f in FINDINGS if row[f]]
        assert row["finding_labels"] == (present or ["No Finding"])
        seen.update(present)
    assert seen == set(FINDINGS)
    assert "No Finding" in {label for labels in ds["finding_labels"] for label in labels}
    assert all(labels == ["No Finding"] for labels in phantom_dataset(5, 32, finding_prob=0.0)["finding_labels"])
    assert all(labels == list(FINDINGS) for labels in phantom_dataset(5, 32, finding_prob=1.0)["finding_labels"])


@pytest.mark.parametrize("finding", FINDINGS)
def test_each_finding_changes_only_part_of_the_same_anatomy(finding):
    clean = render_phantom(96, np.random.default_rng([2, 7])).astype(int)
    sick = render_phantom(96, np.random.default_rng([2, 7]), [finding]).astype(int)
    changed = np.abs(sick - clean) > 8
    assert 0.001 < changed.mean() < 0.25
    assert sick[changed].mean() > clean[changed].mean()  # findings are opacities: brighter, never darker


def test_finding_draw_moves_the_finding_and_nothing_else():
    others = [f for f in FINDINGS if f != "consolidation"]
    clean, drawn, _ = draw_phantom(4, 9, 96, 1.0, without=FINDINGS)
    here, findings, _ = draw_phantom(4, 9, 96, 1.0, without=others)
    there, findings_there, _ = draw_phantom(4, 9, 96, 1.0, without=others, finding_draw=0)
    # Without findings the image is the same whatever the draw, and the labels never move.
    assert np.array_equal(draw_phantom(4, 9, 96, 1.0, without=FINDINGS, finding_draw=0)[0], clean)
    assert findings == findings_there == drawn
    at_here, at_there = (np.abs(image.astype(int) - clean) > 8 for image in (here, there))
    assert at_here.sum() > 50 and at_there.sum() > 50
    assert (at_here & at_there).sum() < 0.5 * min(at_here.sum(), at_there.sum())  # elsewhere, not the same spot
    assert not np.array_equal(draw_phantom(4, 9, 96, 1.0, without=others, finding_draw=1)[0], there)


def test_cardiomegaly_widens_the_heart_to_the_image_right():
    clean = render_phantom(128, np.random.default_rng([4, 1])).astype(float)
    big = render_phantom(128, np.random.default_rng([4, 1]), ["cardiomegaly"]).astype(float)
    assert _heart_minus_lung(big, 0.35, 0.6) > _heart_minus_lung(clean, 0.35, 0.6) + 15


def test_patients_follow_nih_marginals():
    ds = phantom_dataset(2000, resolution=32, seed=8)
    sex, view, age = (np.asarray(ds[c]) for c in ("patient_sex", "view_position", "patient_age"))
    # NIH ChestX-ray14: 0.565 male, 0.40 AP, age mean 46.6, 4.8% under 18; 2,000 draws read each to ~+-0.02.
    assert abs((sex == "M").mean() - 0.565) < 0.035 and abs((view == "AP").mean() - 0.40) < 0.035
    assert abs(age.mean() - 47) < 2 and abs((age < 18).mean() - 0.048) < 0.015 and age.min() >= 1 and age.max() <= 95


def test_the_patient_changes_the_pixels_but_not_the_anatomy_draws():
    rng = lambda: np.random.default_rng([6, 3])  # noqa: E731
    reference = render_phantom(64, rng()).astype(int)
    assert (render_phantom(64, rng(), [], Demographics()) == reference).all()
    for demographics in (Demographics("F", 45, "PA"), Demographics("M", 80, "PA"), Demographics("M", 6, "PA"),
                         Demographics("M", 45, "AP")):
        image = render_phantom(64, rng(), [], demographics)
        assert (np.abs(image - reference) > 8).mean() > 0.05, demographics
        # Still the same patient's anatomy (another index of the set correlates at about 0.6).
        assert np.corrcoef(image.ravel(), reference.ravel())[0, 1] > 0.9, demographics
    # Who the patient is comes from its own stream: the findings of an index are the same with or without a bias.
    assert draw_phantom(4, 9, 32, 0.5)[1] == draw_phantom(4, 9, 32, 0.5, finding_prob_scale={"age_bin=80+": 1.0})[1]


def test_a_planted_subgroup_bias_halves_its_prevalence_only():
    ds = phantom_dataset(1500, resolution=32, seed=2, finding_prob=0.3, finding_prob_scale={"patient_sex=F": 0.5})
    sex, sick = np.asarray(ds["patient_sex"]), np.asarray([ds[f] for f in FINDINGS]).T
    # 0.3 for men and 0.15 for women, each read on ~650-850 patients x 4 findings to about +-0.02.
    assert abs(sick[sex == "M"].mean() - 0.3) < 0.03 and abs(sick[sex == "F"].mean() - 0.15) < 0.03


def test_an_adult_woman_casts_breast_shadows_over_the_lower_lungs():
    c = (np.arange(128) + 0.5) / 64 - 1
    rng = lambda: np.random.default_rng([5, 5])  # noqa: E731
    man = render_phantom(128, rng(), [], Demographics("M", 40, "PA")).astype(float)
    woman = render_phantom(128, rng(), [], Demographics("F", 40, "PA")).astype(float)
    girl = render_phantom(128, rng(), [], Demographics("F", 6, "PA")).astype(float)
    boy = render_phantom(128, rng(), [], Demographics("M", 6, "PA")).astype(float)
    lower, upper = (c > 0.15) & (c < 0.4), (c > -0.6) & (c < -0.35)
    lateral = (np.abs(c) > 0.35) & (np.abs(c) < 0.6)
    shadow = lambda a, b, rows: (a[rows][:, lateral] - b[rows][:, lateral]).mean()  # noqa: E731
    # A woman's frame is smaller at every level; only the lower lateral fields gain a shadow, and a girl's do not.
    adult = shadow(woman, man, lower) - shadow(woman, man, upper)
    child = shadow(girl, boy, lower) - shadow(girl, boy, upper)
    assert adult > 8 and adult > child + 8


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: render_phantom(31, np.random.default_rng(0)), r"resolution .*\[32, 1024\].*31"),
        (lambda: render_phantom(1025, np.random.default_rng(0)), r"resolution .*\[32, 1024\].*1025"),
        (lambda: render_phantom(64, np.random.default_rng(0), ["fracture"]), r"fracture.*cardiomegaly"),
        (lambda: render_phantom(64, np.random.default_rng(0), "nodule"), r"sequence"),
        (lambda: phantom_dataset(0), r"num_images .*>= 1.*0"),
        (lambda: phantom_dataset(2, resolution=2048), r"resolution .*\[32, 1024\].*2048"),
        (lambda: phantom_dataset(2, finding_prob=1.5), r"finding_prob .*\[0, 1\].*1.5"),
        (lambda: phantom_dataset(2, finding_prob=-0.1), r"finding_prob .*\[0, 1\].*-0.1"),
        (lambda: phantom_dataset(2, seed=-1), r"seed .*>= 0.*-1"),
        (lambda: phantom_dataset(2, start_index=-3), r"start_index .*>= 0.*-3"),
        (lambda: phantom_dataset(2, finding_prob_scale={"patient_sex=X": 0.5}), r"patient_sex=X.*patient_sex=M\|F"),
        (lambda: Demographics("F", 120, "PA"), r"age in \[0, 100\]"),
        (lambda: Demographics("female", 40, "PA"), r"sex must be one of"),
        (lambda: phantom_dataset(2, images_per_patient=0.5), r"images per patient 0.5 .*\[1, 50\]"),
    ],
)
def test_bad_arguments_raise_value_error_naming_value_and_range(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _ncc(a, b):
    a, b = (x.astype(np.float64).ravel() - x.mean() for x in (a, b))
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_a_patients_studies_keep_the_patient_and_change_the_acquisition():
    studies = {p: [draw_study(5, p, s, 64, 0.3) for s in range(3)] for p in range(12)}
    for patient in studies.values():
        (first, _, who), *rest = patient
        for k, (image, _, other) in enumerate(rest, 1):
            assert other.sex == who.sex and other.age == pytest.approx(who.age + 0.5 * k)
            assert not np.array_equal(image, first)  # positioning, exposure and noise are the study's own
    views = {other.view for patient in studies.values() for _, _, other in patient}
    assert views == {"PA", "AP"}
    same = [_ncc(p[0][0], p[1][0]) for p in studies.values()]
    different = [_ncc(studies[p][0][0], studies[(p + 1) % 12][1][0]) for p in studies]
    # Same anatomy: a patient's two studies correlate more than strangers' (0.84 against 0.79 here); positioning,
    # view and exposure keep pixels from telling patients apart alone (the verifier's test is in test_privacy.py).
    assert np.mean(same) > np.mean(different) + 0.02


def test_patients_get_a_long_tailed_number_of_studies_near_nih():
    images = patients_of(0, 3.64, 0, 40_000)
    counts = np.bincount([patient for patient, _ in images])
    assert 3.3 < counts.mean() < 4.0 and 0.52 < (counts == 1).mean() < 0.62  # NIH: 3.64 and 0.568
    assert patients_of(0, 1.0, 10, 13) == [(10, 0), (11, 0), (12, 0)]


def test_sets_hold_whole_patients_and_adjacent_sets_share_none():
    first = phantom_dataset(60, 32, seed=2, images_per_patient=3.64)
    second = phantom_dataset(60, 32, seed=2, images_per_patient=3.64, start_index=60)
    ids = [set(d["patient_id"]) for d in (first, second)]
    assert not ids[0] & ids[1] and len(ids[0]) < len(first)
    assert all(pid.startswith("phantom-2-p") for pid in ids[0])
    (patient, study), = [pair for pair in patients_of(2, 3.64, 0, 60) if pair[1] == 1][:1]
    row = [i for i, pid in enumerate(first["patient_id"]) if pid == f"phantom-2-p{patient}"][study]
    assert np.array_equal(np.asarray(first[row]["image"]), draw_study(2, patient, study, 32, 0.0)[0])
    single = phantom_dataset(3, 32, seed=2)
    assert single["patient_id"] == ["phantom-2-0", "phantom-2-1", "phantom-2-2"]
    assert np.array_equal(np.asarray(single[1]["image"]), draw_phantom(2, 1, 32, 0.0)[0])


def test_grid_png_is_written_and_marked_synthetic(tmp_path):
    path = tmp_path / "docs" / "grid.png"
    grid = phantom_grid(path, resolution=32, rows=2, cols=3)
    assert grid.size == (96, 64)
    with Image.open(path) as written:
        assert written.size == (96, 64) and written.text["synthetic"] == "procedural phantom"
        # The first tile is image 0 of the seed, exactly as the dataset makes it.
        tile = np.asarray(written.convert("L"))[:32, :32]
    first = phantom_dataset(1, resolution=32, seed=0, finding_prob=0.3)["image"][0]
    np.testing.assert_array_equal(tile, np.asarray(first))


def test_cli_writes_grid_and_reports_bad_arguments(tmp_path, capsys):
    path = tmp_path / "grid.png"
    assert main(["--grid", str(path), "--resolution", "32", "--rows", "1", "--cols", "2"]) is None
    assert Image.open(path).size == (64, 32)
    with pytest.raises(SystemExit) as exit_:
        main(["--grid", str(path), "--resolution", "16"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "error: resolution must be an integer in [32, 1024], got 16"
