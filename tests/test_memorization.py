"""Memorization audit: chunked nearest-neighbour search, shift-tolerant NCC, planted copies, false-flag rate."""

import numpy as np
import pytest

from lunggen_diffusers.evaluation.features import get_extractor, pixel_features
from lunggen_diffusers.evaluation.memorization import (
    Audit,
    audit,
    matched_patients,
    ncc_search,
    top_matches,
)

from helpers import phantom_array, save_tiny_encoder

SIZE = 64


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return get_extractor("raddino", save_tiny_encoder(tmp_path_factory.mktemp("encoder")), batch_size=64)


def _plant(train, rng):
    """Copies of training images 0..23, three per kind; returns the images and the index each copies."""
    kinds = {
        "exact": lambda x: x,
        "noise": lambda x: x + rng.normal(0, 0.03 * 255, x.shape),
        "shift_2": lambda x: np.roll(x, (2, -2), axis=(0, 1)),
        "shift_3": lambda x: np.roll(x, (3, 0), axis=(0, 1)),
        "shift_4": lambda x: np.roll(x, (-4, 4), axis=(0, 1)),
        "shift_crop_pad": lambda x: np.pad(x[:-3, 2:], ((3, 0), (0, 2)), mode="edge"),
        "gain": lambda x: x * 0.95,
        "gain_offset": lambda x: x * 0.95 + 5,
    }
    copies, sources, names = [], [], []
    for n, (name, change) in enumerate(kinds.items()):
        for i in range(3 * n, 3 * n + 3):
            copies.append(np.clip(np.round(change(train[i].astype(np.float64))), 0, 255).astype(np.uint8))
            sources.append(i)
            names.append(name)
    return np.stack(copies), np.array(sources), names


@pytest.fixture(scope="module")
def audit_inputs(encoder):
    train, null, independent = phantom_array(240, 0), phantom_array(240, 1), phantom_array(200, 2)
    planted, sources, names = _plant(train, np.random.default_rng(0))
    generated = np.concatenate([independent, planted])
    embed = lambda images: (pixel_features(images, SIZE), encoder.embed(images))  # noqa: E731
    return {"gen": embed(generated), "null": embed(null), "train": embed(train), "n_independent": len(independent),
            "sources": sources, "names": names}


def _audit(inputs, percentile):
    return audit(*inputs["gen"], *inputs["null"], *inputs["train"], percentile=percentile, max_shift=4)


def test_top_matches_equals_brute_force_across_chunks():
    rng = np.random.default_rng(0)
    queries, keys = rng.standard_normal((23, 5)), rng.standard_normal((41, 5))
    values, indices = top_matches(queries, keys, k=3, chunk_size=7)
    sims = queries @ keys.T
    # The order is only defined where rounding cannot swap neighbours: top_matches works in float32, whose 5-term
    # dots are within 5 u |q||k| < 5e-6 of these (u = 2^-24, |q||k| < 16); the closest ranks here are 6e-3 apart.
    top4 = -np.sort(-sims, axis=1)[:, :4]
    assert np.diff(top4, axis=1).max() < -1e-4
    expected = np.argsort(-sims, axis=1)[:, :3]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(values, top4[:, :3], atol=1e-5)


def test_equal_similarities_rank_by_key_index_whatever_the_chunks():
    """The rule that lets processes split the keys: an exact tie goes to the lower index, in any chunking."""
    rng = np.random.default_rng(1)
    # Small integers: every product and sum is exact in float32, so copies tie exactly in any block shape (with
    # random floats, the same dot product differs in the last bit between a 2-row and a 4-row block).
    queries, distinct = rng.integers(-3, 4, (6, 4)).astype(np.float32), rng.integers(-3, 4, (5, 4)).astype(np.float32)
    # Keys 3, 8 and 9 copy key 0, key 6 copies key 1, key 7 copies key 2.
    keys = distinct[[0, 1, 2, 0, 3, 4, 1, 2, 0, 0]]
    groups = ([0, 3, 8, 9], [1, 6], [2, 7])
    found = []
    for chunk_size in (1, 3, 4, 10):
        _, top4 = top_matches(queries, keys, k=4, chunk_size=chunk_size)
        _, top1 = top_matches(queries, keys, k=1, chunk_size=chunk_size)
        for row in top4:
            for group in groups:  # tied keys that made the cut come lowest index first
                picked = [j for j in row if j in group]
                assert picked == group[:len(picked)], (chunk_size, row)
        assert set(top1[:, 0]) <= {0, 1, 2, 4, 5}, chunk_size  # the first copy of each distinct key
        found.append(top4)
    assert all(np.array_equal(f, found[0]) for f in found)


def test_ncc_ignores_gain_offset_and_shifts_within_range():
    key = phantom_array(1, 5).astype(np.float32) / 255
    keys = np.concatenate([pixel_features(phantom_array(20, 6), SIZE), key.reshape(1, -1)])
    variants = np.stack([key[0] * 0.8 + 0.1, np.roll(key[0], (2, -2), (0, 1)), np.roll(key[0], (3, 3), (0, 1))])
    values, indices = ncc_search(variants.reshape(3, -1), keys, max_shift=2)
    # float32 correlation over 3,600 pixels: BLAS's blocked sums stay within about (b + n / b) u |q| / |q - mean|
    # = 120 * 6e-8 * 2.2 = 1.6e-5 of exact for any vendor (block b = 60); 1e-4 still separates a shift beyond range.
    np.testing.assert_allclose(values[:2], 1.0, atol=1e-4)
    assert list(indices[:2]) == [20, 20]
    assert values[2] < 0.999  # a shift beyond max_shift is not undone
    with pytest.raises(ValueError, match="max_shift"):
        ncc_search(variants.reshape(3, -1), keys, max_shift=32)


def test_audit_catches_every_kind_of_planted_copy(audit_inputs):
    result = _audit(audit_inputs, 99.9)
    n = audit_inputs["n_independent"]
    # No verdict here sits where rounding decides it (EPS below; measured on the AMD EPYC): every copy clears the
    # NCC threshold by > 190 EPS["ncc"], its NCC neighbour beats the next training image by > 0.03, and the
    # independent images' flagged fraction stays 0.5%-0.8% with every similarity moved by -2 or +2 EPS.
    missed = [name for name, hit in zip(audit_inputs["names"], result.flagged[n:], strict=True) if not hit]
    assert not missed, f"planted copies not flagged: {missed}"
    np.testing.assert_array_equal(result.matched_index()[n:], audit_inputs["sources"])
    assert result.flagged[:n].mean() <= 0.03  # independent images: about 2 x 0.1% expected


# How far another CPU's rounding can move a similarity, and so the null's percentile (float32 products; an image
# changes side only within 2 eps of a threshold). Cosine: a 32-d dot of unit rows is within 32 u = 2e-6 of exact
# for any summation order (u = 2^-24). NCC: 3,136 pixels (56^2 at max_shift 4), divided by the query's centred norm
# (|q| / |q - mean| is about 2.2 here); BLAS kernels sum in blocks, about (b + n / b) u * 2.2 = 1.5e-5 for b = 56.
# The tiny random encoder puts every cosine within 3e-4 of 1, so this matters: 20 images lie within 2e-5 of it.
EPS = {"ncc": 1e-4, "cosine": 1e-5}


def _flagged(result, n, shift):
    """Flagged fractions of the independent generated images and of the null, with every similarity moved by
    shift * EPS (shift -2: as high as rounding can make them; +2: as low)."""
    above = lambda ncc, cos: (ncc > result.ncc_threshold + shift * EPS["ncc"]) | (  # noqa: E731
        cos > result.cos_threshold + shift * EPS["cosine"])
    return above(result.gen_ncc[:n], result.gen_cos[:n]).mean(), above(result.null_ncc, result.null_cos).mean()


def test_false_flag_rate_on_independent_images_is_near_the_configured_level(audit_inputs):
    result = _audit(audit_inputs, 90.0)
    n = audit_inputs["n_independent"]
    for name, values, threshold in (("ncc", result.gen_ncc[:n], result.ncc_threshold),
                                    ("cosine", result.gen_cos[:n], result.cos_threshold)):
        low, high = ((values > threshold + shift * EPS[name]).mean() for shift in (2, -2))
        assert 0.03 <= low and high <= 0.2, f"{name}: {low:.3f}-{high:.3f} above the null's 90th percentile"
    (gen_low, null_low), (gen_high, null_high) = _flagged(result, n, 2), _flagged(result, n, -2)
    assert gen_high - null_low <= 0.1 and null_high - gen_low <= 0.1
    assert gen_high <= 0.3  # either of two 10% tests: at most about 20%


def test_matched_patients_counts_by_patient():
    result = Audit(gen_ncc=np.array([0.99, 0.5, 0.2, 0.3]), gen_ncc_index=np.array([0, 1, 3, 2]),
                   gen_cos=np.array([0.1, 0.1, 0.95, 0.1]), gen_cos_index=np.array([0, 0, 2, 0]),
                   null_ncc=np.zeros(3), null_cos=np.zeros(3), ncc_threshold=0.9, cos_threshold=0.9, percentile=99.9)
    rows = matched_patients(result, ["p1", "p1", "p2", "p3"])
    # Image 0 flagged by NCC (training image 0, p1); image 2 flagged only by cosine (training image 2, p2).
    assert rows == [
        {"patient_id": "p1", "flagged_matches": 1, "nearest_matches": 2, "train_images": 2},
        {"patient_id": "p2", "flagged_matches": 1, "nearest_matches": 1, "train_images": 1},
        {"patient_id": "p3", "flagged_matches": 0, "nearest_matches": 1, "train_images": 1},
    ]


def test_audit_rejects_bad_percentile(audit_inputs):
    with pytest.raises(ValueError, match="percentile"):
        _audit(audit_inputs, 100.0)
