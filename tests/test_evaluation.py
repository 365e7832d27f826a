"""Evaluation: image sources, extractors (tiny random Dinov2 loaded by path), metrics, cache, CLI end to end."""

import json
import sys

import datasets
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from lunggen_diffusers.cli import UsageError
from lunggen_diffusers.data.phantom import phantom_dataset
from lunggen_diffusers.evaluation.cli import main
from lunggen_diffusers.evaluation.features import (
    Extractor,
    extract,
    get_extractor,
    pixel_features,
)
from lunggen_diffusers.evaluation.images import load_source
from lunggen_diffusers.evaluation.metrics import (
    frechet_distance,
    frechet_distance_from_stats,
    kernel_inception_distance,
    ms_ssim,
    ms_ssim_scales,
    prdc,
)
from lunggen_diffusers.evaluation.run import split_halves

from helpers import phantom_array, save_tiny_encoder


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("encoder"))


@pytest.fixture(scope="module")
def phantoms():
    return phantom_array(120, 0), phantom_array(120, 1)


def test_frechet_distance_is_zero_on_itself_and_grows_with_a_shift(phantoms):
    a, b = (pixel_features(x) for x in phantoms)  # 256 features from 120 images: singular covariances
    # Rounding can only push FD(a, a) up through the covariance's range (measured 1e-12, d u tr S = 8e-14); the
    # square roots of its ~136 null-space eigenvalues (noise around 0) only add to tr sqrt, pushing FD down (-5e-7,
    # then clipped to 0). So 1e-8 holds with a 1e4 margin for any BLAS.
    assert frechet_distance(a, a) < 1e-8
    darker = [frechet_distance(a, pixel_features(np.round(phantoms[1] * (1 - d)).astype(np.uint8)))
              for d in (0.0, 0.05, 0.1, 0.2)]
    assert darker == sorted(darker) and darker[-1] > 10 * darker[0] > 0  # [0] is the finite-sample floor


def test_frechet_distance_is_stable_in_float64_on_ill_conditioned_covariances():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    l1, l2 = np.logspace(-12, 3, 20), rng.permutation(np.logspace(-10, 2, 20))
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    s1, s2 = (q * l1) @ q.T, (q * l2) @ q.T  # commuting, so the closed form holds
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    fd = frechet_distance_from_stats(mu1, s1, mu2, s2)
    assert isinstance(fd, float) and fd == pytest.approx(expected, rel=1e-7)
    few = rng.standard_normal((10, 64)).astype(np.float32) * np.logspace(-6, 3, 64, dtype=np.float32)
    assert 0.0 <= frechet_distance(few, few) < 1e-6 * np.sum(few.var(0))


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift(phantoms):
    a, b = (pixel_features(x) for x in phantoms)
    same, _ = kernel_inception_distance(a, b, num_subsets=20, subset_size=100)
    shifted, _ = kernel_inception_distance(a, pixel_features(np.round(phantoms[1] * 0.8).astype(np.uint8)), 20, 100)
    assert shifted > 20 * abs(same)


def _prdc_by_definition(real, fake, k):
    """Naeem et al.'s definition on every pair's direct difference: the reference for small sets."""
    sq = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)  # noqa: E731
    real_radius, fake_radius = np.sort(sq(real, real), 1)[:, k], np.sort(sq(fake, fake), 1)[:, k]
    d = sq(fake, real)
    inside = d < real_radius[None]
    recalled = d < fake_radius[:, None]
    return {"precision": int(inside.any(1).sum()) / len(fake), "recall": int(recalled.any(0).sum()) / len(real),
            "density": int(inside.sum()) / (k * len(fake)), "coverage": int(inside.any(0).sum()) / len(real)}


def test_prdc_on_identical_and_on_disjoint_sets():
    x = np.random.default_rng(0).standard_normal((80, 8))
    # Every k-th neighbour is a tie here: exact 1.0 whatever BLAS rounds, also where a common offset makes the
    # matrix product's rounding large (1e3: density was 1.0175 when ties were decided on it).
    for offset in (0.0, 1e3):
        assert prdc(x + offset, x + offset, k=5) == {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}
    assert prdc(x, x + 100, k=5) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    y = np.random.default_rng(1).standard_normal((60, 8)) * 1.5
    assert prdc(x, y, k=5, chunk_size=7) == prdc(x, y, k=5) == _prdc_by_definition(x, y, 5)
    with pytest.raises(ValueError, match="at least 6 rows"):
        prdc(x[:5], y, k=5)


def test_prdc_equals_its_definition_on_ties_and_where_the_product_is_too_coarse_to_decide():
    rng = np.random.default_rng(2)
    # Small integers: every distance is exact in float64, so the definition is exact too; many duplicate rows and
    # equal distances test the strict "<" (a row with 5 copies has a radius of 0 and an empty ball).
    grid, other = rng.integers(0, 3, (60, 2)).astype(float), rng.integers(0, 3, (50, 2)).astype(float)
    assert prdc(grid, other, k=5, chunk_size=7) == _prdc_by_definition(grid, other, 5)
    # A 1e8 offset makes |a|^2 + |b|^2 - 2a.b round by more than the distances themselves, so nearly every
    # comparison falls in the band that is recomputed from direct differences.
    x, y = rng.standard_normal((40, 8)) + 1e8, rng.standard_normal((30, 8)) + 1e8
    assert prdc(x, y, k=3, chunk_size=16) == _prdc_by_definition(x, y, 3)


def test_ms_ssim_is_one_on_itself_bounded_and_falls_with_noise(phantoms):
    x = phantoms[0][:16]
    assert torch.allclose(ms_ssim(x, x), torch.ones(16))
    rng = np.random.default_rng(0)
    values = [float(ms_ssim(x, np.clip(x + rng.normal(0, s, x.shape), 0, 255).astype(np.uint8)).mean())
              for s in (5, 20, 60)]
    assert 1 > values[0] > values[1] > values[2] > 0
    for other in (phantoms[1][:16], 255 - x, rng.integers(0, 256, x.shape, dtype=np.uint8)):
        v = ms_ssim(x, other)
        assert ((v >= 0) & (v <= 1)).all() and v.max() < 0.999
    assert torch.allclose(ms_ssim(x / 255.0, phantoms[1][:16] / 255.0), ms_ssim(x, phantoms[1][:16]), atol=1e-6)
    assert [ms_ssim_scales(s, s) for s in (256, 161, 160, 64, 32, 11)] == [5, 5, 4, 3, 2, 1]
    with pytest.raises(ValueError, match="at least 11x11"):
        ms_ssim_scales(10, 10)


def test_raddino_extractor_loads_by_path_and_returns_the_cls_embedding(encoder_path, phantoms):
    extractor = get_extractor("raddino", encoder_path, batch_size=7)
    features = extractor.embed(phantoms[0][:10])
    model = transformers.AutoModel.from_pretrained(encoder_path).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(encoder_path)
    inputs = processor(images=[np.stack([im] * 3, -1) for im in phantoms[0][:10]], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    assert features.shape == (10, 32)
    # Batches of 7 vs 10 may take other matmul kernels: float32 outputs of size ~2 after 2 blocks of width 32-64 can
    # then differ by tens of ulps (about 1e-6; 0 on the AMD EPYC where this was written), well below 1e-5.
    np.testing.assert_allclose(features, hidden[:, 0].numpy(), atol=1e-5)
    assert encoder_path in extractor.description
    with pytest.raises(ValueError, match="accepted: pixels, raddino, inception"):
        get_extractor("clip")


def test_inception_without_its_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # importing it now fails, installed or not
    with pytest.raises(UsageError, match="pip install torch-fidelity"):
        get_extractor("inception")


def test_pixel_features_are_area_averages_in_unit_range():
    images = np.zeros((2, 32, 32), np.uint8)
    images[0, :, :16], images[1] = 255, 51
    features = pixel_features(images, size=4)
    assert features.shape == (2, 16) and features.dtype == np.float32
    np.testing.assert_allclose(features[0].reshape(4, 4), [[1, 1, 0, 0]] * 4)
    np.testing.assert_allclose(features[1], 0.2, atol=1e-6)


def test_sources_read_folders_of_any_mode_and_saved_datasets(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    gray = phantom_array(1, 3)[0]
    Image.fromarray(gray).save(folder / "a.png")
    Image.fromarray(gray).convert("RGB").save(folder / "sub" / "b.jpg", quality=95)
    Image.fromarray(np.pad(gray, ((0, 0), (16, 16)))).save(folder / "e.png")  # wide: centre-cropped back
    Image.fromarray((gray.astype(np.uint16) * 257)).save(folder / "c.png")  # 16-bit PNG
    rgba = Image.fromarray(gray).convert("RGBA")
    rgba.putalpha(255)
    rgba.save(folder / "d.png")
    source = load_source(str(folder))
    images = source.read(range(len(source)), 32)
    assert images.shape == (5, 32, 32) and images.dtype == np.uint8 and source.patient_ids is None
    # Sorted: a, c (16-bit: rescaled by its range, not clipped to white), d (RGBA), e (wide), sub/b.jpg (RGB).
    assert np.corrcoef(images[1].ravel(), images[0].ravel())[0, 1] > 0.999 and images[1].mean() < 200
    np.testing.assert_array_equal(images[2], images[0])
    np.testing.assert_array_equal(images[3], images[0])
    assert np.abs(images[4].astype(int) - images[0]).mean() < 3

    # A pipeline.py folder: the images its manifest lists, not grid.png (or anything else) beside them.
    (folder / "manifest.csv").write_text("file,index\na.png,0\nsub/b.jpg,1\n")
    Image.fromarray(np.tile(gray, (2, 2))).save(folder / "grid.png")
    assert len(load_source(str(folder))) == 2

    table = {"pixel_values": [gray] * 3, "patient_id": ["p1", "p1", "p2"]}
    features = datasets.Features({"pixel_values": datasets.Array2D((64, 64), "uint8"),
                                  "patient_id": datasets.Value("string")})
    prepared = datasets.Dataset.from_dict(table, features=features)
    datasets.DatasetDict(train=prepared, validation=prepared.select([2])).save_to_disk(tmp_path / "prepared")
    source = load_source(f"{tmp_path / 'prepared'}:train")
    assert len(source) == 3 and source.patient_ids == ["p1", "p1", "p2"]
    np.testing.assert_array_equal(source.read([1], 64)[0], gray)

    with pytest.raises(ValueError, match="one of train, validation"):
        load_source(str(tmp_path / "prepared"))
    with pytest.raises(ValueError, match="only applies to a saved dataset"):
        load_source(f"{folder}:train")
    with pytest.raises(UsageError, match="not a folder"):
        load_source(str(tmp_path / "missing"))
    datasets.Dataset.from_dict({"text": ["x"]}).save_to_disk(tmp_path / "no_images")
    with pytest.raises(ValueError, match="no image column"):
        load_source(str(tmp_path / "no_images"))


def test_feature_cache_is_reused_and_invalidated_by_new_files(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(phantom_array(3, 4)):
        Image.fromarray(image).save(folder / f"{i}.png")
    calls = []
    extractor = Extractor("pixels", "test-pixels", "test", lambda x: calls.append(len(x)) or pixel_features(x, 4))
    first = extract(load_source(str(folder)), {"f": extractor}, 32, batch_size=2, cache_dir=str(tmp_path / "cache"))
    again = extract(load_source(str(folder)), {"f": extractor}, 32, batch_size=2, cache_dir=str(tmp_path / "cache"))
    assert calls == [2, 1] and np.array_equal(first["f"], again["f"])
    Image.fromarray(phantom_array(1, 5)[0]).save(folder / "3.png")
    grown = extract(load_source(str(folder)), {"f": extractor}, 32, batch_size=4, cache_dir=str(tmp_path / "cache"))
    assert calls == [2, 1, 4] and grown["f"].shape == (4, 16)


def test_real_halves_are_patient_disjoint():
    patients = [f"p{i // 3}" for i in range(30)] + ["big"] * 7
    a, b = split_halves(len(patients), patients, seed=1)
    assert not {patients[i] for i in a} & {patients[i] for i in b}
    assert sorted(np.concatenate([a, b])) == list(range(37)) and abs(len(a) - len(b)) <= 7
    a, b = split_halves(9, None)
    assert len(a) == 4 and len(b) == 5 and not set(a) & set(b)
    with pytest.raises(ValueError, match="single patient"):
        split_halves(4, ["p"] * 4)


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    """A patient-wise phantom DatasetDict, and a folder of generated phantoms holding two exact training copies."""
    root = tmp_path_factory.mktemp("eval_data")
    train = phantom_dataset(60, 64, seed=0)
    splits = datasets.DatasetDict(train=train, validation=phantom_dataset(40, 64, seed=1),
                                  leaky=train.select(range(12)))  # same patients as train
    splits.save_to_disk(root / "nih-like")
    (root / "synth").mkdir()
    for i, image in enumerate(phantom_dataset(40, 64, seed=2)["image"]):
        image.save(root / "synth" / f"{i:03d}.png")
    for i in (3, 7):
        splits["train"][i]["image"].save(root / "synth" / f"copy{i}.png")
    return root


def _cli(eval_data, out, *extra):
    return ["--real", f"{eval_data / 'nih-like'}:validation", "--fake", str(eval_data / "synth"),
            "--image_size", "64", "--output_dir", str(out), "--cache_dir", str(eval_data / "cache"),
            "--diversity_pairs", "50", "--kid_subsets", "5", "--top_k", "4", "--null_percentile", "99", *extra]


def test_cli_writes_the_report_and_a_card_section_without_identifiers(eval_data, encoder_path, tmp_path):
    out = tmp_path / "eval"
    assert main(_cli(eval_data, out, "--train", f"{eval_data / 'nih-like'}:train", "--features", "raddino",
                     "--feature_model", encoder_path, "--max_shift", "3")) is None  # a console script's exit 0
    written = json.loads((out / "metrics.json").read_text())
    assert written["recipe"]["extractor"].startswith("raddino: CLS embedding")
    assert written["counts"] == {"real": 40, "fake": 42, "train": 60, "real_half_a": 20, "real_half_b": 20}
    for part in ("fake_vs_real", "fake_vs_real_half", "real_vs_real"):
        assert set(written["metrics"][part]) == {"fd", "kid", "kid_std", "precision", "recall", "density",
                                                 "coverage"}
    mem = written["memorization"]
    assert mem["num_flagged"] >= 2 and mem["matched_by"] == "patient"
    card = json.dumps(written["model_card"])
    assert "phantom-" not in card and str(eval_data) not in card and encoder_path not in card
    assert written["model_card"]["metrics"]["fd_rad_dino"] == written["metrics"]["fake_vs_real"]["fd"]
    lines = (out / "memorized_patients.csv").read_text().splitlines()
    assert lines[0].startswith("# LOCAL ONLY") and lines[1] == "patient_id,flagged_matches,nearest_matches,train_images"
    flagged = {line.split(",")[0] for line in lines[2:] if int(line.split(",")[1]) > 0}
    assert {"phantom-0-3", "phantom-0-7"} <= flagged
    pairs = Image.open(out / "nearest_pairs.png")
    assert pairs.size == (4 * (2 * 128 + 8), 128 + 26 + 8) and "SYNTHETIC" in pairs.info["Description"]
    assert "real-vs-real floor" in (out / "report.md").read_text().lower()


def test_cli_pixels_without_train_reuses_the_cache(eval_data, tmp_path):
    main(_cli(eval_data, tmp_path / "a", "--features", "pixels"))
    cached = sorted((eval_data / "cache").iterdir())
    main(_cli(eval_data, tmp_path / "b", "--features", "pixels"))
    report = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert sorted((eval_data / "cache").iterdir()) == cached
    assert report["memorization"] is None and not (tmp_path / "b" / "memorized_patients.csv").exists()
    assert "Not run" in (tmp_path / "b" / "report.md").read_text()


@pytest.mark.parametrize("change, message", [
    (("--real", "/no/such/folder"), "not a folder"),
    (("--train", "{data}:validation"), "same images"),
    (("--real", "{data}:leaky", "--train", "{data}:train"), "share 12 patient(s)"),
    (("--null_percentile", "100"), "null_percentile"),
    (("--features", "inception", "--train", "{data}:train"), "pip install torch-fidelity"),
])
def test_cli_bad_input_is_one_error_line_and_exit_2(eval_data, tmp_path, capsys, monkeypatch, change, message):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    argv = _cli(eval_data, tmp_path / "eval", "--features", "pixels")
    argv += [value.format(data=eval_data / "nih-like") for value in change]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith("error: ") and message in err[-1]
