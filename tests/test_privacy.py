"""Privacy by measurement (#42): the patient verifier, the re-identification risk in `evaluate --reid`, the privacy
filter at generation, and synthetic datasets pushed to (a local stand-in of) the Hub."""

import csv
import io
import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from huggingface_hub import HfApi
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lunggen_diffusers.data.phantom import draw_study, patients_of, phantom_dataset
from lunggen_diffusers.evaluate import main as evaluate_main
from lunggen_diffusers.evaluation.images import load_source
from lunggen_diffusers.evaluation.reid import (
    VerifierRecipe,
    held_out_pairs,
    patient_interval,
    reid_risk,
    verifier_for,
)
from lunggen_diffusers.generation.cli import main as generate_main
from lunggen_diffusers.generation.sampling import noise_seed
from lunggen_diffusers.hub import push_dataset
from lunggen_diffusers.hub.cli import main as hub_main
from lunggen_diffusers.verifier import load_verifier

from hub_stand_in import HubStandIn

pytestmark = pytest.mark.usefixtures("one_thread")
SEED, SIZE, PER_PATIENT = 3, 48, 3.64
RECIPE = VerifierRecipe(resolution=32, width=16, steps=600)  # images at 48 px, read at 32: half the cost


def _folder(path, images):
    path.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(path / f"image_{i:03d}.png")
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Phantom patients with several studies (train / held out), a verifier trained on them, a planted set (other
    studies of training patients: same patient, never a training image) and an independent set (new patients)."""
    root = tmp_path_factory.mktemp("privacy")
    train = phantom_dataset(2000, SIZE, seed=SEED, finding_prob=0.1, images_per_patient=PER_PATIENT)
    held = phantom_dataset(800, SIZE, seed=SEED, finding_prob=0.1, images_per_patient=PER_PATIENT, start_index=2000)
    datasets.DatasetDict({"train": train, "test": held}).save_to_disk(root / "data")
    counts = np.bincount([p for p, _ in patients_of(SEED, PER_PATIENT, 0, 2000)])
    patients = np.flatnonzero(counts)[:400]
    _folder(root / "planted", [draw_study(SEED, p, counts[p], SIZE, 0.1)[0] for p in patients])
    _folder(root / "independent", [draw_study(SEED, 10**6 + i, 0, SIZE, 0.1)[0] for i in range(400)])
    verifier = verifier_for(str(root / "verifier"), load_source(f"{root / 'data'}:train"),
                            load_source(f"{root / 'data'}:test"), RECIPE, SIZE, str(root / "cache"), "cpu")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(root / "tiny-cxr")
    return {"root": root, "data": root / "data", "verifier": verifier, "model": str(root / "tiny-cxr")}


def test_the_verifier_tells_held_out_patients_apart_and_keeps_its_recipe(world):
    c = world["verifier"].config
    # A 600-step CNN at 32 px (0.993 here); the benchmark's 64 px verifier reaches 0.998 (benchmarks/README.md).
    assert c["auroc"] > 0.95 and c["same_pairs"] > 100 and c["different_pairs"] > 1000
    assert c["train_patients"] == len(set(load_source(f"{world['data']}:train").patient_ids))
    assert c["train_fingerprint"] == load_source(f"{world['data']}:train").fingerprint
    assert 0 < c["threshold"] < c["search_threshold"] < 1  # a search over M images needs a higher bar than a pair
    loaded = load_verifier(world["root"] / "verifier")
    images = np.asarray(phantom_dataset(4, SIZE, seed=99)["image"][0])[None].repeat(2, 0)
    assert np.allclose(loaded.embed(images), world["verifier"].embed(images), atol=1e-5)
    assert loaded.gallery.embeddings.shape == (c["train_images"], c["dim"]) and len(loaded.gallery.patients) == \
        c["train_patients"]
    assert not any(p.name.startswith(".") for p in world["root"].iterdir())  # no partial folder left


def test_held_out_pairs_and_the_patient_bootstrap_against_hand_values(world):
    verifier = world["verifier"]
    # Patients a, a, b, b, c: same-patient pairs at cosine 1, different at 0 -> AUROC 1, every same pair above.
    embeddings = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    result = held_out_pairs(verifier, embeddings, ["a", "a", "b", "b", "c"])
    assert result["auroc"] == 1.0 and result["same_pairs"] == 2 and result["different_pairs"] == 8
    assert result["true_match_rate"] == 1.0
    assert result["threshold"] == pytest.approx(float(verifier.probability([0.0])[0]), abs=1e-6)
    # One patient holds every hit: resampling patients, the share's interval reaches 0 and far above the mean.
    low, high = patient_interval(np.array([1, 1, 1, 0, 0, 0, 0, 0]), list("aaabcdef"), seed=1)
    assert low == 0.0 and high > 0.5
    # No hit still bounds the share from above, by the Wilson interval over the 4 patients (0 of 4: 0.490).
    assert patient_interval(np.zeros(8), list("aabbccdd")) == (0.0, pytest.approx(0.4899, abs=1e-3))


def _risk(world, folder):
    source = load_source(str(world["root"] / folder))
    held, train = (load_source(f"{world['data']}:{split}") for split in ("test", "train"))
    verifier = world["verifier"]
    embed = lambda s: verifier.embed(s.read(range(len(s)), SIZE))  # noqa: E731
    return reid_risk(verifier, embed(source), embed(held), held.patient_ids, embed(train), train.patient_ids,
                     source.names())


def test_other_images_of_training_patients_are_flagged_and_strangers_are_not(world):
    planted, rows = _risk(world, "planted")
    independent, _ = _risk(world, "independent")
    assert planted["flagged"] and planted["share_generated_interval"][0] > planted["share_null_interval"][1]
    assert planted["share_generated"] > 3 * planted["share_null"] and planted["patients_matched"] >= 10
    assert not independent["flagged"] and independent["share_generated"] < 0.05
    assert planted["num_null"] + planted["num_calibration"] == len(load_source(f"{world['data']}:test"))
    # The local rows name the training patient each image matched, highest first.
    assert [r["probability"] for r in rows] == sorted((r["probability"] for r in rows), reverse=True)
    assert all(r["training_patient"].startswith(f"phantom-{SEED}-p") for r in rows)


def _evaluate(world, fake, out, *extra):
    return evaluate_main(["--real", f"{world['data']}:test", "--fake", str(fake), "--train",
                          f"{world['data']}:train", "--features", "pixels", "--image_size", str(SIZE), "--k", "3",
                          "--diversity_pairs", "20", "--kid_subsets", "5", "--output_dir", str(out),
                          "--cache_dir", str(world["root"] / "cache"), "--reid", str(world["root"] / "verifier"),
                          *extra])


def test_evaluate_reid_reports_the_risk_and_names_patients_only_locally(world, tmp_path, capsys):
    _evaluate(world, world["root"] / "planted", tmp_path / "eval")
    assert "FLAGGED" in capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["metrics"]["reidentification"]["flagged"]
    section = report["model_card"]["reidentification"]
    assert section["flagged"] == "yes" and "AUROC" in section["verifier"]
    assert "phantom-" not in json.dumps(report["model_card"])
    lines = (tmp_path / "eval" / "reidentified_patients.csv").read_text().splitlines()
    assert lines[0].startswith("# LOCAL ONLY") and lines[1] == "image,training_patient,probability"
    assert len(lines) - 2 == report["metrics"]["reidentification"]["num_above"] > 0
    assert "## Re-identification risk" in (tmp_path / "eval" / "report.md").read_text()


def test_evaluate_refuses_a_verifier_of_another_training_set_in_one_line(world, tmp_path, capsys):
    other = tmp_path / "other"
    phantom_dataset(60, SIZE, seed=8, images_per_patient=3).save_to_disk(other)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--real", f"{world['data']}:test", "--fake", str(world["root"] / "planted"), "--train",
                       str(other), "--features", "pixels", "--image_size", str(SIZE), "--output_dir",
                       str(tmp_path / "eval"), "--reid", str(world["root"] / "verifier")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "another training set" in err[-1]
    with pytest.raises(SystemExit):
        evaluate_main(["--real", f"{world['data']}:test", "--fake", str(world["root"] / "planted"),
                       "--output_dir", str(tmp_path / "eval"), "--reid", str(tmp_path / "v")])
    assert "needs --train" in capsys.readouterr().err


def _generate(world, out, *extra):
    generate_main(["--model", world["model"], "--num_images", "12", "--num_inference_steps", "2", "--batch_size", "5",
                   "--output_dir", str(out), *extra])


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _first_draw_scores(world, tmp_path):
    _generate(world, tmp_path / "plain")
    images = np.stack([np.asarray(Image.open(tmp_path / "plain" / f"image_{i:06d}.png")) for i in range(12)])
    return world["verifier"].best_matches(world["verifier"].embed(images))[0]


def test_the_privacy_filter_rejects_redraws_and_is_reproducible(world, tmp_path, capsys):
    threshold = float(np.median(_first_draw_scores(world, tmp_path)))
    flags = ["--privacy_filter", str(world["root"] / "verifier"), "--privacy_threshold", str(threshold)]
    _generate(world, tmp_path / "a", *flags)
    _generate(world, tmp_path / "b", *flags)
    rejected, manifest = _rows(tmp_path / "a" / "rejected.csv"), _rows(tmp_path / "a" / "manifest.csv")
    assert len(rejected) >= 5 and all(float(r["verifier_probability"]) > threshold for r in rejected)
    assert all("verifier" in r["reason"] for r in rejected)
    written = np.stack([np.asarray(Image.open(tmp_path / "a" / row["file"])) for row in manifest])
    assert (world["verifier"].best_matches(world["verifier"].embed(written))[0] <= threshold + 1e-4).all()
    for row in manifest:  # each image from its own seed sequence: (seed, index) or (seed, index, redraw)
        assert int(row["noise_seed"]) == noise_seed(0, int(row["index"]), int(row["redraws"]))
    assert {int(r["index"]) for r in rejected} == {int(r["index"]) for r in manifest if int(r["redraws"])} | \
        set(json.loads((tmp_path / "a" / "privacy_filter.json").read_text())["gave_up"])
    for name in ["manifest.csv", "rejected.csv", *(row["file"] for row in manifest)]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    summary = json.loads((tmp_path / "a" / "privacy_filter.json").read_text())
    assert summary["rejected_draws"] == len(rejected) and summary["images"] == len(manifest)
    assert summary["draws"] == len(rejected) + len(manifest) and summary["threshold_is"] == "given"
    before = (tmp_path / "a" / "rejected.csv").read_bytes()
    _generate(world, tmp_path / "a", *flags)  # a finished folder: nothing drawn, nothing rejected again
    assert (tmp_path / "a" / "rejected.csv").read_bytes() == before
    with pytest.raises(SystemExit):  # resuming without the filter, or with another one, is refused
        _generate(world, tmp_path / "a")
    assert "privacy_filter" in capsys.readouterr().err


def test_an_image_still_rejected_after_its_redraws_is_left_out(world, tmp_path, capsys):
    _generate(world, tmp_path / "out", "--privacy_filter", str(world["root"] / "verifier"), "--privacy_threshold",
              "0.5", "--privacy_nn_threshold", "-0.99", "--privacy_max_redraws", "1")
    out = capsys.readouterr().out
    assert "0 images in" in out and "12 image(s) left out" in out
    summary = json.loads((tmp_path / "out" / "privacy_filter.json").read_text())
    assert summary["gave_up"] == list(range(12)) and summary["rejected_draws"] == 24
    assert summary["rejected_by_ncc"] == 24
    assert not list((tmp_path / "out").glob("image_*.png"))


@pytest.mark.parametrize("flags, words", [
    (["--privacy_threshold", "1.5"], "--privacy_threshold 1.5"),
    (["--privacy_max_redraws", "-1"], "--privacy_max_redraws -1"),
])
def test_bad_filter_settings_are_one_line(world, tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as exit_info:
        _generate(world, tmp_path / "out", "--privacy_filter", str(world["root"] / "verifier"), *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and words in err[-1]
    with pytest.raises(SystemExit):
        _generate(world, tmp_path / "out2", "--privacy_filter", str(tmp_path))
    assert "not a patient verifier" in capsys.readouterr().err


@pytest.fixture
def fake_hub(monkeypatch):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = {"repo_id": repo_id, **kwargs}
        return f"https://huggingface.co/datasets/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        calls["files"] = {op.path_in_repo: op.path_or_fileobj for op in operations}
        calls["commit"] = kwargs

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


@pytest.fixture
def audited(world, tmp_path):
    """A filtered synthetic folder with its evaluation (the audit and --reid) in SYNTH/eval."""
    synth = tmp_path / "synth"
    _generate(world, synth, "--privacy_filter", str(world["root"] / "verifier"))
    _evaluate(world, synth, synth / "eval")
    return synth


def test_push_dataset_round_trips_through_the_hub_as_users_load_it(world, audited, fake_hub, tmp_path):
    url = push_dataset(audited, "org/synthetic")
    assert url.endswith("datasets/org/synthetic") and fake_hub["repo"]["private"] is True
    assert fake_hub["repo"]["repo_type"] == fake_hub["commit"]["repo_type"] == "dataset"
    assert sorted(fake_hub["files"]) == ["README.md", "data/train-00000-of-00001.parquet"]
    card = fake_hub["files"]["README.md"].decode()
    for words in ("research use only", "not for clinical use", "Re-identification", "Privacy filter",
                  "license: other", "real-vs-real", "Memorization audit"):
        assert words in card, words
    assert str(world["root"]) not in card and str(tmp_path) not in card and "phantom-" not in card
    hub = HubStandIn("org/synthetic", fake_hub["files"])
    script = ("import datasets, json\n"
              "d = datasets.load_dataset('org/synthetic', split='train')\n"
              "print(json.dumps({'n': len(d), 'columns': d.column_names, 'mode': d[0]['image'].mode,\n"
              "                  'size': d[0]['image'].size, 'index': list(d['index']),\n"
              "                  'noise_seed': list(d['noise_seed']),\n"
              "                  'synthetic': d[0]['image'].info.get('synthetic')}))\n")
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": "hf_test",
           "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}
    for offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # online, to the loopback stand-in only
        env.pop(offline, None)
    try:
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    finally:
        hub.close()
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    manifest = _rows(audited / "manifest.csv")
    assert loaded["n"] == len(manifest) and loaded["mode"] == "L" and loaded["size"] == [32, 32]
    assert loaded["index"] == [int(r["index"]) for r in manifest]
    assert loaded["noise_seed"] == [r["noise_seed"] for r in manifest]
    assert {"image", "seed", "sampler", "steps", "model", "revision", "redraws"} <= set(loaded["columns"])
    assert loaded["synthetic"] == "research use only"


def _edit_metrics(folder, change):
    path = folder / "eval" / "metrics.json"
    report = json.loads(path.read_text())
    change(report)
    path.write_text(json.dumps(report))


def test_push_dataset_refuses_in_one_line_and_a_flagged_push_says_so(world, audited, fake_hub, tmp_path, capsys):
    def refused(folder, words, *flags):
        capsys.readouterr()  # what an evaluation before it printed
        with pytest.raises(SystemExit) as exit_info:
            hub_main(["push-dataset", str(folder), "--repo_id", "org/x", *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and words in err[0], err
        assert "files" not in fake_hub

    refused(audited, "no audit", "--eval_dir", str(tmp_path / "nowhere"))
    _edit_metrics(audited, lambda r: r["metrics"].pop("reidentification"))
    refused(audited, "re-identification check (--reid)")
    _evaluate(world, audited, audited / "eval")
    refused(audited, "evaluates another image set", "--eval_dir", str(_copy_eval(world, tmp_path)))
    _edit_metrics(audited, lambda r: r["memorization"].update(num_flagged=2))
    refused(audited, "memorization audit flags 2 image(s)")
    hub_main(["push-dataset", str(audited), "--repo_id", "org/x", "--allow_flagged"])
    assert "Published although flagged" in fake_hub["files"]["README.md"].decode()
    del fake_hub["files"]
    _edit_metrics(audited, lambda r: r["memorization"].update(num_flagged=0))
    first = audited / _rows(audited / "manifest.csv")[0]["file"]
    original = first.read_bytes()
    Image.open(first).save(first)  # the chunks that mark it synthetic are gone
    refused(audited, "is not marked synthetic")
    info = Image.open(io.BytesIO(original)).info
    marked = PngInfo()
    for key, value in {**info, "derived_from_real": "sha256:abc"}.items():
        marked.add_text(key, str(value))
    Image.open(io.BytesIO(original)).save(first, pnginfo=marked)
    refused(audited, "made from a real image")
    leaky = PngInfo()
    for key, value in {**info, "Comment": f"from {world['data']}"}.items():
        leaky.add_text(key, str(value))
    Image.open(io.BytesIO(original)).save(first, pnginfo=leaky)
    refused(audited, "would publish the local path")


def _copy_eval(world, tmp_path):
    out = tmp_path / "independent-eval"
    _evaluate(world, world["root"] / "independent", out)
    return out


def test_a_raddino_verifier_is_a_head_over_a_local_encoder_and_filters_offline(world, tmp_path):
    from helpers import save_tiny_encoder

    encoder = save_tiny_encoder(tmp_path / "rad-dino")
    recipe = VerifierRecipe(backbone="raddino", feature_model=encoder, steps=30)
    train, held = (load_source(f"{world['data']}:{split}") for split in ("train", "test"))
    verifier = verifier_for(str(tmp_path / "v"), train, held, recipe, SIZE, str(tmp_path / "cache"), "cpu")
    c = verifier.config
    assert c["backbone"] == "raddino" and c["in_features"] == 32 and c["feature_model"] == encoder
    assert 0 <= c["auroc"] <= 1 and c["train_images"] == len(train)
    loaded = load_verifier(tmp_path / "v")  # the encoder comes back from the recipe's local folder
    images = held.read(range(6), SIZE)
    assert np.allclose(loaded.embed(images), verifier.embed(images), atol=1e-5)
    assert np.allclose(np.linalg.norm(loaded.embed(images), axis=1), 1, atol=1e-5)
    _generate(world, tmp_path / "synth", "--privacy_filter", str(tmp_path / "v"))
    assert json.loads((tmp_path / "synth" / "privacy_filter.json").read_text())["verifier_backbone"] == "raddino"


def test_prepare_phantom_makes_patient_wise_splits_of_patients_with_several_studies(tmp_path, capsys):
    from lunggen_diffusers.prepare import main as prepare_main

    argv = ["--phantom", "--num_phantom_images", "200", "--phantom_images_per_patient", "3.64", "--resolution", "32",
            "--output_dir", str(tmp_path / "pp")]
    prepare_main(argv)
    prepared = datasets.load_from_disk(str(tmp_path / "pp"))
    patients = {split: set(prepared[split]["patient_id"]) for split in prepared}
    assert set(prepared) == {"train", "validation", "test"} and sum(map(len, prepared.values())) >= 200
    assert not patients["train"] & patients["test"] and not patients["train"] & patients["validation"]
    assert len(patients["train"]) < len(prepared["train"])  # patients with several studies
    assert "no real patient" in (tmp_path / "pp" / "README.md").read_text()
    prepare_main(argv)
    assert "Reused" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        prepare_main(["--phantom", "--nih_dir", str(tmp_path), "--output_dir", str(tmp_path / "x")])
    assert "one of them" in capsys.readouterr().err
