"""Memorization audit: how close is each generated image to its nearest training image, compared with how close
held-out real images (patients never seen in training) come to the same training set.

Two similarities, both a matrix product in chunks (memory is chunk_size^2 values whatever the set sizes):
- pixel NCC: Pearson correlation of area-downsampled images (default 64x64), maximised over integer shifts of up
  to `max_shift` pixels at that size. Correlation ignores gain and offset; area averaging suppresses added noise.
  Shifts are searched explicitly because downsampling alone does not absorb them: chest X-rays share their layout,
  so independent images already correlate at 0.97-0.99 at low resolution, and a copy misaligned by half a
  low-resolution pixel falls below that. At 64x64 one pixel is 4 px of a 256-px image, so the default +-2 covers
  +-8 px there; the cost is (2*max_shift + 1)^2 products.
- feature cosine: cosine similarity of the extractor's embeddings (RAD-DINO sees anatomy, not pixel alignment).
A generated image is flagged when either similarity exceeds the null's `percentile`; the null's own flagged
fraction (up to twice 1 - percentile/100, as two tests are combined) is what the generated fraction is read against.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object

from ..cli import UsageError
from ..runtime import process_share, process_state


def _chunk_top(similarities: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row, ties in column order: max returns the first maximum (the audit's k=1
    path, as fast as topk); for k > 1 a stable sort, since topk breaks ties in no documented order."""
    if k == 1:
        v, i = similarities.max(dim=1, keepdim=True)
        return v, i
    v, i = similarities.sort(dim=1, descending=True, stable=True)
    return v[:, :k], i[:, :k]


def top_matches(queries, keys, k: int = 1, chunk_size: int = 4096,
                device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The k largest dot products of each query row with the key rows: (values (Q, k), key indices (Q, k)); equal
    values are ranked by key index, lowest first, so any split of the keys gives the same answer.

    Both sets are moved to `device` once; keys are streamed in chunks with a running top-k, so no similarity
    block larger than chunk_size x chunk_size exists at any time. Rows should already be normalised (unit norm
    for cosine, centred too for correlation)."""
    queries = torch.as_tensor(queries, dtype=torch.float32, device=device)
    keys = torch.as_tensor(keys, dtype=torch.float32, device=device)
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"query and key sizes differ: {queries.shape[1]} vs {keys.shape[1]}")
    k = min(k, len(keys))
    values, indices = [], []
    for q0 in range(0, len(queries), chunk_size):
        q = queries[q0:q0 + chunk_size]
        best_v = torch.empty((len(q), 0), device=device)
        best_i = torch.empty((len(q), 0), dtype=torch.long, device=device)
        for k0 in range(0, len(keys), chunk_size):
            v, i = _chunk_top(q @ keys[k0:k0 + chunk_size].T, min(k, len(keys) - k0))
            # The running best holds lower key indices than this chunk, so a stable sort keeps the index order.
            best_v, order = torch.cat([best_v, v], 1).sort(dim=1, descending=True, stable=True)
            best_v, order = best_v[:, :k], order[:, :k]
            best_i = torch.cat([best_i, i + k0], 1).gather(1, order)
        values.append(best_v.cpu().numpy())
        indices.append(best_i.cpu().numpy())
    return np.concatenate(values), np.concatenate(indices)


def _keep_better(best, where, values, indices) -> None:
    """Update the running best (value, index) per query in place: a higher value wins, an equal one the lower
    index. One rule for shifts and for processes, so neither the shift order nor the split decides a tie."""
    better = (values > best) | ((values == best) & (indices < where))
    best[better], where[better] = values[better], indices[better]


def sharded_search(search, queries: np.ndarray, keys: np.ndarray, chunk_size: int = 4096,
                   **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """`search(queries, keys, chunk_size=..., **kwargs)` with the keys split over the launched processes, in
    whole chunks, and the per-process winners gathered and merged: every process forms exactly the chunk products
    one process would, and the merge keeps the same tie rule, so the result is that of one process, bit for bit.
    Every process gets the merged result."""
    state = process_state()
    share = process_share(len(keys), chunk_size, state)
    part = []
    if share:
        values, indices = search(queries, keys[share.start:share.stop], chunk_size=chunk_size, **kwargs)
        part = [(values, indices + share.start)]
    best, where = np.full(len(queries), -np.inf, np.float32), np.zeros(len(queries), np.int64)
    for values, indices in gather_object(part):
        _keep_better(best, where, values, indices)
    return best, where


def _unit(x: torch.Tensor, centre: bool) -> torch.Tensor:
    x = x - x.mean(1, keepdim=True) if centre else x
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)


def ncc_search(queries: np.ndarray, keys: np.ndarray, max_shift: int = 2, chunk_size: int = 4096,
               device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Best shift-tolerant NCC of each query image against the keys: (values (Q,), key indices (Q,)).

    Inputs are flattened square images (N, s*s), e.g. `pixel_features(images, 64)`. Keys are compared on their
    central (s - 2*max_shift)^2 crop; each query contributes the same-sized crop at every shift within
    +-max_shift, so no wrapped or padded border enters the correlation. Cost: (2*max_shift + 1)^2 products."""
    side = int(round(np.sqrt(queries.shape[1])))
    if side * side != queries.shape[1] or keys.shape[1] != queries.shape[1] or side <= 2 * max_shift:
        raise ValueError(f"expected flattened square images larger than 2*max_shift={2 * max_shift} px, "
                         f"got sizes {queries.shape[1]} and {keys.shape[1]}")
    m, inner = max_shift, side - 2 * max_shift
    q_img = torch.as_tensor(queries, dtype=torch.float32, device=device).reshape(-1, 1, side, side)
    k_img = torch.as_tensor(keys, dtype=torch.float32, device=device).reshape(-1, side, side)
    key_rows = _unit(k_img[:, m:m + inner, m:m + inner].reshape(len(keys), -1), centre=True)
    # Centred keys make a query crop's mean irrelevant to the dot product, so the crop is only divided by its
    # centred norm, for all shifts at once from two box filters, and after the top-1 (a per-query scale).
    n = inner * inner
    wide = q_img.double()  # E[x^2] - E[x]^2 over thousands of pixels cancels badly in float32
    mean = F.avg_pool2d(wide, inner, stride=1)[:, 0]
    norm = ((F.avg_pool2d(wide**2, inner, stride=1)[:, 0] - mean**2) * n).clamp_min(0).sqrt().clamp_min(1e-8).cpu()
    best, where = np.full(len(queries), -np.inf, np.float32), np.zeros(len(queries), np.int64)
    for dy in range(2 * m + 1):
        for dx in range(2 * m + 1):
            crops = q_img[:, 0, dy:dy + inner, dx:dx + inner].reshape(len(queries), n)
            v, i = top_matches(crops, key_rows, 1, chunk_size, device)
            # Compared in float32, as stored: a float64 candidate against a float32 best could rank two values
            # that round alike differently depending on which came first.
            _keep_better(best, where, (v[:, 0] / norm[:, dy, dx].numpy()).astype(np.float32), i[:, 0])
    return best, where


def cosine_search(queries: np.ndarray, keys: np.ndarray, chunk_size: int = 4096,
                  device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Nearest key by cosine similarity of feature rows: (values (Q,), key indices (Q,))."""
    unit = lambda x: _unit(torch.as_tensor(x, dtype=torch.float32, device=device), centre=False)  # noqa: E731
    v, i = top_matches(unit(queries), unit(keys), 1, chunk_size, device)
    return v[:, 0], i[:, 0]


@dataclass
class Audit:
    """Per-image nearest-training similarities of generated (gen_*) and held-out (null_*) images, and the verdict."""

    gen_ncc: np.ndarray
    gen_ncc_index: np.ndarray
    gen_cos: np.ndarray
    gen_cos_index: np.ndarray
    null_ncc: np.ndarray
    null_cos: np.ndarray
    ncc_threshold: float
    cos_threshold: float
    percentile: float

    @property
    def flagged(self) -> np.ndarray:
        return (self.gen_ncc > self.ncc_threshold) | (self.gen_cos > self.cos_threshold)

    @property
    def null_flagged(self) -> np.ndarray:
        return (self.null_ncc > self.ncc_threshold) | (self.null_cos > self.cos_threshold)

    def matched_index(self) -> np.ndarray:
        """The training image each generated image is matched to: its NCC neighbour, unless only the feature
        similarity flags it."""
        only_cos = (self.gen_cos > self.cos_threshold) & ~(self.gen_ncc > self.ncc_threshold)
        return np.where(only_cos, self.gen_cos_index, self.gen_ncc_index)


def audit(gen_pixels, gen_features, null_pixels, null_features, train_pixels, train_features, percentile=99.9,
          max_shift: int = 2, chunk_size: int = 4096, device: str = "cpu") -> Audit:
    """Nearest training image of every generated and every held-out image on both similarities; thresholds are
    the held-out (null) similarities' `percentile`. Under `accelerate launch` each process searches its share of
    the training set (sharded_search); every process returns the same Audit."""
    if not 0 < percentile < 100:
        raise UsageError(f"percentile must lie strictly between 0 and 100, got {percentile}")
    if len(null_pixels) < 2:
        raise UsageError(f"the null needs at least 2 held-out real images, got {len(null_pixels)}")
    ncc = {"max_shift": max_shift, "device": device}
    gen_ncc, gen_ncc_index = sharded_search(ncc_search, gen_pixels, train_pixels, chunk_size, **ncc)
    null_ncc, _ = sharded_search(ncc_search, null_pixels, train_pixels, chunk_size, **ncc)
    gen_cos, gen_cos_index = sharded_search(cosine_search, gen_features, train_features, chunk_size, device=device)
    null_cos, _ = sharded_search(cosine_search, null_features, train_features, chunk_size, device=device)
    return Audit(gen_ncc, gen_ncc_index, gen_cos, gen_cos_index, null_ncc, null_cos,
                 float(np.percentile(null_ncc, percentile)), float(np.percentile(null_cos, percentile)), percentile)


def matched_patients(result: Audit, train_patient_ids: list[str]) -> list[dict]:
    """Training patients by how often they are matched: as the match of a flagged image, and as the plain nearest
    neighbour of any generated image, next to how many training images they have (heavy patients are matched
    more by chance). Patient-level, because one memorised patient can surface through many of their images."""
    matched = result.matched_index()
    flagged = Counter(train_patient_ids[i] for i in matched[result.flagged])
    nearest = Counter(train_patient_ids[i] for i in result.gen_ncc_index)
    images = Counter(train_patient_ids)
    rows = [{"patient_id": p, "flagged_matches": flagged[p], "nearest_matches": nearest[p], "train_images": images[p]}
            for p in set(flagged) | set(nearest)]
    return sorted(rows, key=lambda r: (-r["flagged_matches"], -r["nearest_matches"], r["patient_id"]))
