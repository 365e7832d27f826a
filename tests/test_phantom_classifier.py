"""The phantom classifier: a measuring instrument trained on phantoms, cached, deterministic, and able to see anatomy."""

import numpy as np
import pytest
import torch

from lunggen_diffusers.data.phantom import render_phantom
from lunggen_diffusers.evaluation import phantom_classifier as pc
from lunggen_diffusers.evaluation.features import get_extractor

# 32 px, 80 steps on 96 phantoms (+ their mirrors): seconds on a quiet machine, and enough to learn laterality.
TINY = pc.ClassifierSettings(resolution=32, num_train=96, num_test=32, steps=80, batch_size=32, feature_dim=16)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("phantom-classifier"))


@pytest.fixture(scope="module")
def classifier(cache):
    return pc.load_classifier(TINY, cache_dir=cache, progress=False)


def _images(n, findings, size=32, seed=99):
    return np.stack([render_phantom(size, np.random.default_rng([seed, i]), findings) for i in range(n)])


def test_training_is_deterministic(classifier):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)  # a caller whose global RNG stands elsewhere must still get the same network
        net, report = pc.train_classifier(TINY, progress=False)
    # Same seeds, same data order, fp32 on one machine: the weights agree to rounding; 1e-5 allows for a BLAS
    # kernel that splits a reduction differently between runs, far below what a different seed moves (~1e-1).
    for (name, a), b in zip(net.state_dict().items(), classifier.net.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert report == classifier.report
    images = _images(4, [])
    retrained = pc.PhantomClassifier(net, TINY, report)
    np.testing.assert_allclose(retrained.features(images), classifier.features(images), rtol=1e-4, atol=1e-5)


def test_predictions_and_features_shapes(classifier):
    images = _images(5, ["nodule"])
    probabilities = classifier.predict(images)
    assert probabilities.shape == (5, len(pc.OUTPUTS)) and probabilities.dtype == np.float32
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    assert classifier.features(images).shape == (5, TINY.feature_dim)
    # Any size is resized (antialiased) to the classifier's own: a 64-px image reads like its 32-px rendering.
    big = classifier.predict(_images(5, ["nodule"], size=64))
    assert big.shape == probabilities.shape
    assert np.allclose(pc.predict(images, classifier), probabilities)


def test_sees_laterality_and_cardiomegaly(classifier):
    upright = _images(32, [])
    heart = pc.OUTPUTS.index(pc.HEART_RIGHT)
    heart_right = classifier.predict(upright)[:, heart]
    heart_right_mirrored = classifier.predict(upright[:, :, ::-1].copy())[:, heart]
    # Chance is 0.5; a classifier that ignored the side would score the mirrors like the originals.
    assert ((heart_right > 0.5).mean() + (heart_right_mirrored < 0.5).mean()) / 2 >= 0.85
    assert classifier.report["laterality_accuracy"] >= 0.85
    big = classifier.predict(_images(32, ["cardiomegaly"]))[:, 0]
    normal = classifier.predict(upright)[:, 0]
    # Same anatomy and noise (same seeds), only the heart size differs: ranked right in most pairs (chance 0.5).
    assert (big > normal).mean() >= 0.75


def test_report_covers_every_finding(classifier):
    report = classifier.report
    assert report["num_images"] == 2 * TINY.num_test
    for finding in pc.FINDINGS:
        entry = report[finding]
        assert 0 <= entry["accuracy"] <= 1 and 0 <= entry["false_positive_rate"] <= 1
        assert 0 < entry["negatives"] < TINY.num_test  # upright images only, those without the finding


def test_cache_is_reused_and_keyed_by_settings(classifier, cache, monkeypatch):
    path = pc.classifier_path(TINY, cache)
    assert path.exists() and not list(path.parent.glob(".*.tmp*"))  # written atomically, nothing left behind

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the cache holds this classifier")

    monkeypatch.setattr(pc, "train_classifier", no_training)
    again = pc.load_classifier(TINY, cache_dir=cache)
    images = _images(3, ["pleural_effusion"])
    np.testing.assert_array_equal(again.predict(images), classifier.predict(images))
    assert again.report == classifier.report and again.identity == classifier.identity
    other = pc.ClassifierSettings(**{**TINY.__dict__, "steps": TINY.steps + 1})
    assert pc.classifier_path(other, cache) != path and other.key() != TINY.key()


def test_get_extractor_phantom_is_the_penultimate_layer(classifier, monkeypatch):
    monkeypatch.setattr(pc, "load_classifier", lambda device="cpu": classifier)
    extractor = get_extractor("phantom")
    images = _images(3, [])
    assert extractor.name == "phantom" and extractor.identity == classifier.identity
    np.testing.assert_array_equal(extractor.embed(images), classifier.features(images))


@pytest.mark.parametrize("change, message", [({"resolution": 16}, "resolution"), ({"steps": 0}, "steps"),
                                             ({"num_train": 8}, "num_train")])
def test_bad_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        pc.ClassifierSettings(**{**TINY.__dict__, **change})


def test_images_must_be_a_stack():
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        pc.to_input(np.zeros((32, 32), np.uint8), 32)


def test_the_evaluate_command_accepts_phantom_features():
    from transformers import HfArgumentParser

    from lunggen_diffusers.evaluation.run import EvaluationArguments

    (args,) = HfArgumentParser(EvaluationArguments).parse_args_into_dataclasses(
        ["--real", "real/", "--fake", "fake/", "--features", "phantom"])
    assert args.features == "phantom"


def test_the_shipped_classifier_still_reads_todays_phantom(tmp_path, monkeypatch):
    settings = pc.ClassifierSettings()
    shipped = pc.shipped_path(settings)
    # A changed setting, VERSION or phantom needs a new file: delete the old one, run
    #   python -c "from lunggen_diffusers.evaluation.phantom_classifier import load_classifier; load_classifier()"
    # and copy phantom-classifier-<key>.pt from ~/.cache/lunggen_diffusers/features into the weights folder.
    assert shipped.exists(), f"no shipped classifier for today's settings ({shipped.name}); see this test"
    reader = pc.SHIPPED_DIR / f"phantom-location-reader-{pc.ClassifierSettings(seed=pc.LOCATION_SEED).key()}.pt"
    # no stale instrument left beside the two of today
    assert sorted(p.name for p in pc.SHIPPED_DIR.iterdir()) == sorted([shipped.name, reader.name])

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the package ships this classifier")

    monkeypatch.setattr(pc, "train_classifier", no_training)
    classifier = pc.load_classifier(cache_dir=str(tmp_path), progress=False)  # an empty cache: a fresh machine
    # Phantoms after every image it was trained and reported on: a phantom whose findings or anatomy were redrawn
    # since the weights were trained reads worse than the report says; 0.06 is 2.5 standard errors at 100 images.
    images, labels = pc._phantom_set(settings, 100, settings.num_train + settings.num_test)
    report = pc.held_out_report(classifier, images, labels)
    assert report["laterality_accuracy"] >= classifier.report["laterality_accuracy"] - 0.06
    for finding in pc.FINDINGS:
        assert report[finding]["accuracy"] >= classifier.report[finding]["accuracy"] - 0.06, finding
    # Issue #29's readability goals for the patient, on phantoms it never saw (its own held-out report is
    # 0.99 / 1.00 / 0.8x on 600 images; 0.06 below that is still above each goal).
    assert report["sex_accuracy"] >= 0.85 and report["view_accuracy"] >= 0.90 and report["age_correlation"] >= 0.5


def test_the_shipped_location_reader_reads_side_extent_and_height_of_fresh_phantoms(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained although the package ships this reader")

    monkeypatch.setattr(pc, "train_location_reader", no_training)
    reader = pc.load_location_reader(cache_dir=str(tmp_path), progress=False)
    settings = reader.settings
    images, targets, weights = pc._location_set(settings, 120, settings.num_train + settings.num_test)
    read = reader.predict(images)
    for name in pc.LOCATION_OUTPUTS:
        i, applies = pc.LOCATION_OUTPUTS.index(name), weights[:, pc.LOCATION_OUTPUTS.index(name)] > 0
        if name.endswith(("_extent", "_height")):  # held-out error 0.06-0.09 of a 0-1 range on 300 images
            assert np.abs(read[applies, i] - targets[applies, i]).mean() <= 0.13, name
        else:  # held-out accuracy 0.97-1.00
            assert ((read[applies, i] >= 0.5) == (targets[applies, i] >= 0.5)).mean() >= 0.9, name


def test_reads_the_patient_from_pixels_alone():
    """Same anatomy, findings and noise; only the patient differs: the shipped instrument must follow it."""
    from lunggen_diffusers.data.phantom import Demographics

    classifier = pc.load_classifier(progress=False)
    female, ap, age = (pc.OUTPUTS.index(name) for name in (pc.FEMALE, pc.VIEW_AP, pc.AGE))
    rngs = [[77, i] for i in range(24)]

    def read(demographics):
        return classifier.predict(np.stack([render_phantom(64, np.random.default_rng(r), [], demographics)
                                            for r in rngs]))

    man, woman = read(Demographics("M", 45, "PA")), read(Demographics("F", 45, "PA"))
    assert (woman[:, female] > man[:, female]).mean() >= 0.9
    assert (read(Demographics("M", 45, "AP"))[:, ap] > man[:, ap]).mean() >= 0.9
    assert (read(Demographics("M", 80, "PA"))[:, age] > read(Demographics("M", 25, "PA"))[:, age]).mean() >= 0.9
