"""Distribution metrics on feature rows (Fréchet distance, KID, PRDC) and MS-SSIM diversity on images.

No scipy: the matrix square root goes through symmetric eigendecompositions in float64, which cannot return
the complex values scipy.linalg.sqrtm produces on nearly singular covariances (few samples, many features).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..cli import UsageError

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli & Bovik 2003


def _rows(x, name: str, min_rows: int = 2) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < min_rows:
        raise ValueError(f"{name} must be a 2-D array with at least {min_rows} rows (samples), got shape {x.shape}")
    return x


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), all in float64.

    S1^1/2 S2 S1^1/2 is symmetric positive semi-definite, so its eigenvalues are real; the tiny negative ones that
    rounding leaves on rank-deficient covariances are clipped to zero before the square root."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if not (mu1.shape == mu2.shape and s1.shape == s2.shape == (mu1.size, mu1.size)):
        raise ValueError(f"mismatched statistics: means {mu1.shape}/{mu2.shape}, covariances {s1.shape}/{s2.shape}")
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    fd = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    return max(float(fd), 0.0)  # rounding can leave -1e-12 for identical sets; a distance is never negative


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples)."""
    a, b = _rows(a, "a"), _rows(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y/d + 1)^3 (Binkowski et al. 2018), averaged over random
    subsets of min(subset_size, len(a), len(b)) rows; returns (mean, std over subsets)."""
    a, b = _rows(a, "a"), _rows(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    n, d = min(subset_size, len(a), len(b)), a.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x, y = a[rng.choice(len(a), n, replace=False)], b[rng.choice(len(b), n, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        off_diagonal = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        values.append(off_diagonal - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


# Squared distances come from one float64 matrix product, |a|^2 + |b|^2 - 2 a.b, whose rounding depends on the
# BLAS kernel (vendor, ISA, summation order), and ties (a row and itself, the k-th neighbour that defines a ball,
# duplicated rows) are exactly where PRDC's strict "<" is decided. So every comparison within a band of that
# product is redone on the exact value (_exact_sq). For any summation order (Higham, ch. 3; u = 2^-53) the product
# is within (2d + 4) u (|a|^2 + |b|^2) of the true value and the direct difference within (2d + 6) u (|a|^2 + |b|^2),
# to first order; the band is twice their sum, so no decision outside it can differ from the exact one.
def _band(width: int, sq_norm_bound: float) -> float:
    return 2 * (4 * width + 10) * 2.0**-53 * sq_norm_bound


def _exact_sq(a: np.ndarray, b: np.ndarray, rows: torch.Tensor, cols: torch.Tensor,
              batch: int = 1 << 16) -> torch.Tensor:
    """Squared distances of the pairs (a[rows], b[cols]) as direct differences, each summed along its own row by
    numpy (single-threaded, an order fixed by the width alone): a pair gets the same value in every call and chunk,
    (x, y) the same as (y, x), and a row's distance to itself is exactly 0."""
    rows, cols, out = rows.numpy(), cols.numpy(), np.empty(len(rows))
    for i in range(0, len(rows), batch):  # bounded memory even when many rows tie (duplicates)
        diff = a[rows[i:i + batch]] - b[cols[i:i + batch]]
        out[i:i + batch] = (diff * diff).sum(1)
    return torch.from_numpy(out)


def _approx_sq(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    return torch.addmm(b_sq[None], a, b.T, alpha=-2).add_(a_sq[:, None])


def _kth_neighbour_sq(x: torch.Tensor, x_sq: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """Exact squared distance from each row to its k-th nearest other row (the row itself is index 0).

    Every row within the exact k-th distance has an approximate value within the approximate k-th + 2 tol, so
    only those candidates are recomputed exactly."""
    tol = _band(x.shape[1], 2 * float(x_sq.max()))
    xn, out = x.numpy(), []
    for i in range(0, len(x), chunk_size):
        s = _approx_sq(x[i:i + chunk_size], x_sq[i:i + chunk_size], x, x_sq)
        bound = s.topk(k + 1, largest=False).values[:, k] + 2 * tol
        rows, cols = (s <= bound[:, None]).nonzero(as_tuple=True)
        s.fill_(float("inf"))
        s[rows, cols] = _exact_sq(xn, xn, rows + i, cols)
        out.append(s.topk(k + 1, largest=False).values[:, k])
    return torch.cat(out)


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5, chunk_size: int = 1024) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) with k-nearest-neighbour balls, in float64.

    Membership (distance < a ball's radius) is decided on exact squared distances (see _exact_sq), so identical
    sets score exactly 1.0 on all four on any CPU; a float64 matrix product only selects which pairs need that.
    Memory is chunk_size x max(len(real), len(fake)) values."""
    real = torch.from_numpy(_rows(real, "real", k + 1))
    fake = torch.from_numpy(_rows(fake, "fake", k + 1))
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} vs {fake.shape[1]}")
    real_sq, fake_sq = (real * real).sum(1), (fake * fake).sum(1)
    real_radius = _kth_neighbour_sq(real, real_sq, k, chunk_size)
    fake_radius = _kth_neighbour_sq(fake, fake_sq, k, chunk_size)
    tol = _band(real.shape[1], float(real_sq.max()) + float(fake_sq.max()))
    real_lo, real_hi = real_radius - tol, real_radius + tol
    precise, dense = 0, 0
    covered, recalled = torch.zeros(len(real), dtype=torch.bool), torch.zeros(len(real), dtype=torch.bool)
    for i in range(0, len(fake), chunk_size):  # one pass over fake x real serves all four
        s = _approx_sq(fake[i:i + chunk_size], fake_sq[i:i + chunk_size], real, real_sq)
        radius = fake_radius[i:i + chunk_size, None]
        in_real, in_fake = s < real_lo, s < radius - tol  # surely inside; below, the unsure band is redone
        unsure = ((s < real_hi) & ~in_real) | ((s < radius + tol) & ~in_fake)
        rows, cols = unsure.nonzero(as_tuple=True)
        if len(rows):
            exact = _exact_sq(fake.numpy(), real.numpy(), rows + i, cols)
            in_real[rows, cols] = exact < real_radius[cols]
            in_fake[rows, cols] = exact < fake_radius[rows + i]
        precise += int(in_real.any(1).sum())
        dense += int(in_real.sum())
        covered |= in_real.any(0)  # a real ball holding any fake row: its nearest fake is inside
        recalled |= in_fake.any(0)
    return {"precision": precise / len(fake), "recall": int(recalled.sum()) / len(real),
            "density": dense / (k * len(fake)), "coverage": int(covered.sum()) / len(real)}


def _gaussian_filter(x: torch.Tensor, win_size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(win_size, dtype=x.dtype) - (win_size - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    x = F.conv2d(x, g.reshape(1, 1, 1, -1))  # separable and "valid": no padding artefacts at the borders
    return F.conv2d(x, g.reshape(1, 1, -1, 1))


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, win_size: int, sigma: float, c1: float, c2: float):
    """SSIM's luminance and contrast-structure maps of (N, 1, H, W) batches (valid windows only)."""
    mu_x, mu_y = _gaussian_filter(x, win_size, sigma), _gaussian_filter(y, win_size, sigma)
    var_x = _gaussian_filter(x * x, win_size, sigma) - mu_x**2
    var_y = _gaussian_filter(y * y, win_size, sigma) - mu_y**2
    cov = _gaussian_filter(x * y, win_size, sigma) - mu_x * mu_y
    return (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1), (2 * cov + c2) / (var_x + var_y + c2)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, win_size: int = 11,
             sigma: float = 1.5) -> torch.Tensor:
    """SSIM of each window of (N, 1, H, W) float batches: (N, 1, H - win_size + 1, W - win_size + 1), the value at
    (i, j) belonging to the window centred on pixel (i + win_size // 2, j + win_size // 2)."""
    luminance, cs = _ssim_terms(x, y, win_size, sigma, (0.01 * data_range) ** 2, (0.03 * data_range) ** 2)
    return luminance * cs


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, win_size: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM of each pair of (N, 1, H, W) float batches, differentiable (a training loss term); the default
    data range is the model's [-1, 1]. `ms_ssim(..., scales=1)` is the same figure for evaluation."""
    return ssim_map(x, y, data_range, win_size, sigma).mean((-1, -2, -3))


def ms_ssim_scales(height: int, width: int, win_size: int = 11) -> int:
    """Scales MS-SSIM uses at this size: 5 from 161 px (the coarsest scale must still hold the 11-px window);
    fewer below, down to 1 at 11 px; smaller images raise ValueError."""
    side, scales = min(height, width), 0
    while scales < len(MS_SSIM_WEIGHTS) and side >= win_size:
        scales, side = scales + 1, (side + 1) // 2
    if scales == 0:
        raise UsageError(f"MS-SSIM needs images of at least {win_size}x{win_size} px, got {height}x{width}")
    return scales


def ms_ssim(x, y, data_range: float | None = None, win_size: int = 11, sigma: float = 1.5,
            scales: int | None = None) -> torch.Tensor:
    """MS-SSIM of each pair of 1-channel images: x, y are (N, H, W) or (N, 1, H, W), uint8 (range 255) or float
    (data_range, default 1.0). Gaussian 11-px window, sigma 1.5, the standard 5-scale weights; images under 161 px
    use fewer scales with the leading weights renormalised (see `ms_ssim_scales`). `scales=1` is plain SSIM.
    Returns (N,) values in [0, 1]."""
    x, y = torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(y))
    if x.shape != y.shape or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[1] != 1):
        raise ValueError(f"expected two equal (N, H, W) or (N, 1, H, W) batches, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if data_range is None:
        data_range = 255.0 if x.dtype == torch.uint8 else 1.0
    x, y = x.double().reshape(len(x), 1, *x.shape[-2:]), y.double().reshape(len(y), 1, *y.shape[-2:])
    scales = min(scales or len(MS_SSIM_WEIGHTS), ms_ssim_scales(x.shape[-2], x.shape[-1], win_size))
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64)
    weights = weights / weights.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    factors = []
    for scale in range(scales):
        luminance, cs = _ssim_terms(x, y, win_size, sigma, c1, c2)
        if scale < scales - 1:
            factors.append(cs.mean((-1, -2, -3)))
            pad = (0, x.shape[-1] % 2, 0, x.shape[-2] % 2)
            x, y = F.avg_pool2d(F.pad(x, pad, mode="replicate"), 2), F.avg_pool2d(F.pad(y, pad, mode="replicate"), 2)
        else:
            factors.append((luminance * cs).mean((-1, -2, -3)))
    # Negative contrast structure (anti-correlated images) is clipped, as in the reference implementations.
    return torch.prod(torch.stack(factors, 1).clamp_min(0) ** weights, dim=1).float()


def mean_pairwise_ms_ssim(images: np.ndarray, pairs: np.ndarray, batch_size: int = 64) -> float:
    """Mean MS-SSIM over the index pairs (P, 2) of images (N, H, W): a diversity score (lower = more diverse)."""
    values = [ms_ssim(images[pairs[i:i + batch_size, 0]], images[pairs[i:i + batch_size, 1]])
              for i in range(0, len(pairs), batch_size)]
    return float(torch.cat(values).mean())


def random_pairs(n: int, num_pairs: int, seed: int = 0) -> np.ndarray:
    """Up to num_pairs distinct unordered pairs i < j of range(n); all pairs when there are fewer."""
    if n < 2:
        raise UsageError(f"diversity needs at least 2 images, got {n}")
    total = n * (n - 1) // 2
    rng = np.random.default_rng(seed)
    if total <= num_pairs:
        return np.array([(i, j) for i in range(n) for j in range(i + 1, n)])
    chosen = set()
    while len(chosen) < num_pairs:
        i, j = sorted(rng.choice(n, 2, replace=False))
        chosen.add((int(i), int(j)))
    return np.array(sorted(chosen))
