"""Feature extractors (a registry: `pixels`, `raddino`, `inception`, `phantom`) and a per-source feature cache.

Every extractor takes the same input, uint8 grayscale images (N, H, W) at the evaluation size, and returns float32
(N, D). Features are cached on disk keyed by the source's fingerprint, the extractor's identity and the image size,
so a reference set is embedded once however many checkpoints are evaluated against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..cli import UsageError
from ..networks import encoder_embedder
from ..runtime import process_share, process_state
from ..utils import atomic_path, stable_hash
from .images import ImageSource, cache_root

EXTRACTORS = ("pixels", "raddino", "inception", "phantom")
DEFAULT_FEATURE_MODEL = "microsoft/rad-dino"
INCEPTION_INSTALL = "pip install torch-fidelity"


@dataclass(frozen=True)
class Extractor:
    name: str
    identity: str  # everything that changes the features (model id + revision, parameters): part of the cache key
    description: str  # the exact recipe, written into the report
    embed: Callable[[np.ndarray], np.ndarray]


def pixel_features(images: np.ndarray, size: int = 16) -> np.ndarray:
    """Area-downsampled pixels, flattened: float32 (N, size*size) in [0, 1] (not standardised).

    `images` is uint8 (N, H, W) or float in [0, 1]. Area averaging is the antialiased downsample, so the
    features do not alias noise or fine texture into the comparison."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim != 3:
        raise ValueError(f"expected images shaped (N, H, W), got {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    x = F.adaptive_avg_pool2d(x[:, None], (size, size))
    return x.reshape(len(x), -1).numpy()


def _pixels(size: int) -> Extractor:
    return Extractor("pixels", f"pixels-area-{size}", f"pixels: area-downsampled to {size}x{size}, values in [0, 1]",
                     lambda images: pixel_features(images, size))


def _model_identity(path: str, config) -> str:
    """Hub models by commit; local folders by their files' sizes and times (a retrained folder must miss the cache)."""
    if Path(path).is_dir():
        files = sorted(Path(path).rglob("*"))
        return stable_hash([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()])
    return getattr(config, "_commit_hash", None) or "unknown-revision"


def _raddino(model_name_or_path: str, device: str, batch_size: int) -> Extractor:
    embed, model, processor = encoder_embedder(model_name_or_path, device, batch_size)
    identity = f"raddino:{model_name_or_path}@{_model_identity(model_name_or_path, model.config)}"
    description = (f"raddino: CLS embedding (pooler_output, {model.config.hidden_size}-d) of {model_name_or_path} "
                   f"via transformers {type(model).__name__} + {type(processor).__name__}; gray replicated to RGB")
    return Extractor("raddino", identity, description, embed)


def _inception(weights_path: str | None, device: str, batch_size: int) -> Extractor:
    try:
        import torch_fidelity
        from torch_fidelity.feature_extractor_inceptionv3 import (
            FeatureExtractorInceptionV3,
        )
    except ImportError:
        raise UsageError(f"--features inception needs the optional torch-fidelity package: {INCEPTION_INSTALL}") \
            from None
    model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights_path)
    model = model.to(device).eval()

    @torch.inference_mode()
    def embed(images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            x = torch.as_tensor(images[start:start + batch_size])[:, None].expand(-1, 3, -1, -1).to(device)
            out.append(model(x)[0].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048), np.float32)

    weights = weights_path or "weights-inception-2015-12-05-6726825d.pth"
    description = (f"inception: torch-fidelity {torch_fidelity.__version__} FeatureExtractorInceptionV3"
                   f"('inception-v3-compat'), 2048-d pool3, TF1-compatible bilinear resize to 299, weights {weights}")
    return Extractor("inception", f"inception-tf-compat:{weights}", description, embed)


def get_extractor(name: str, model_name_or_path: str | None = None, device: str = "cpu", batch_size: int = 32,
                  pixel_size: int = 16) -> Extractor:
    """`pixels` (offline, always available), `raddino` (any transformers image encoder, default microsoft/rad-dino;
    local path or Hub id), `inception` (optional extra; `model_name_or_path` may name a local weights file) or
    `phantom` (the phantom classifier's penultimate layer: the built-in phantom only)."""
    if name == "pixels":
        return _pixels(pixel_size)
    if name == "raddino":
        return _raddino(model_name_or_path or DEFAULT_FEATURE_MODEL, device, batch_size)
    if name == "inception":
        local = model_name_or_path if model_name_or_path and Path(model_name_or_path).is_file() else None
        return _inception(local, device, batch_size)
    if name == "phantom":  # imported here: the classifier trains on first use, and only phantom runs need it
        from .phantom_classifier import load_classifier

        classifier = load_classifier(device=device)
        return Extractor("phantom", classifier.identity, classifier.description, classifier.features)
    raise UsageError(f"unknown feature extractor {name!r}; accepted: {', '.join(EXTRACTORS)}")


def extract(source: ImageSource, extractors: dict[str, Extractor], image_size: int, batch_size: int = 64,
            cache_dir: str | None = None) -> dict[str, np.ndarray]:
    """Features of every image in `source` for each extractor, read from the cache or computed in one pass.

    Under `accelerate launch` each process embeds its own share, in the batches one process would form (so each
    image's features come out the same), and every process gets the whole array back; the main process alone
    writes the cache."""
    state = process_state()
    root = cache_root(cache_dir)
    paths = {key: root / f"{stable_hash([source.fingerprint, ex.identity, image_size])}.npy"
             for key, ex in extractors.items()}
    # A hit must be every process's: with per-machine caches, a process that skipped the pass while the others
    # ran it would leave them waiting for its share.
    found = gather_object([sorted(key for key, path in paths.items() if path.exists())])
    result = {key: np.load(paths[key]) for key in set.intersection(*map(set, found))}
    todo = [key for key in extractors if key not in result]
    if not todo:
        return result
    share = process_share(len(source), batch_size, state)
    parts = {key: [] for key in todo}
    batches = source.batches(image_size, batch_size, share)
    total = (len(share) + batch_size - 1) // batch_size
    for batch in tqdm(batches, total=total, desc=f"features {source.spec}", unit="batch",
                      disable=not state.is_main_process):
        for key in todo:
            parts[key].append(np.asarray(extractors[key].embed(batch), dtype=np.float32))
    mine = {key: np.concatenate(parts[key]) for key in todo if parts[key]}
    shares = gather_object([mine])  # in process order, which is row order: shares are consecutive
    for key in todo:
        result[key] = np.concatenate([part[key] for part in shares if key in part])
    if state.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for key in todo:
            with atomic_path(paths[key]) as temporary:  # an interrupted run never leaves a truncated cache entry
                np.save(temporary, result[key])
    # The next extract() call may look up the same entry (two specs of one folder): every process should find it.
    state.wait_for_everyone()
    return result
