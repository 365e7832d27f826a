"""A small CNN that reads the phantom's truth back from an image: its four findings, which side the heart is on, and
the patient (sex, view, age).

A measuring instrument, not a shipped model: it turns "does the generated image show what was asked for" into
numbers, and its penultimate layer is a feature space that sees the phantom's anatomy (Fréchet distance and PRDC
there rank samplers and guidance scales by what matters, where pixels reward smooth averages). It is trained on
phantoms from a seed no generator ever trains on, once per setting, and cached under the feature cache root.

Outputs, in order: one probability per finding (`FINDINGS`), the probability that the heart is on the image's
right (the radiological convention every real film and every phantom follows), that the patient is female, that the
film is AP, and the age in years / 100 (`AGE`, a regression through the same sigmoid; `ages` reads it in years).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cli import UsageError
from ..data.phantom import FINDINGS, MAX_RESOLUTION, MIN_RESOLUTION, draw_phantom, phantom_dataset
from ..networks import conv_block, fit, to_input
from ..utils import atomic_path, stable_hash
from .images import cache_root

HEART_RIGHT, FEMALE, VIEW_AP, AGE = "heart_on_right", "female", "view_ap", "age"
BINARY_OUTPUTS = (*FINDINGS, HEART_RIGHT, FEMALE, VIEW_AP)
OUTPUTS = (*BINARY_OUTPUTS, AGE)
AGE_SCALE = 100.0
# The demo generator trains on phantom seed 0 and the sampler benchmark holds out seed 12345; this seed is neither,
# so the instrument never saw an image any generator learnt from or is compared against.
CLASSIFIER_SEED = 7_340_033
VERSION = 3  # bump when the architecture, the training recipe or the phantom changes: old cache entries must miss
# The default classifier, trained once and shipped (148 KB): a first `--preset demo-latent` run, which judges its
# autoencoder with it, does not spend 3 minutes training it, and every machine measures with the same weights (one
# retrained on another CPU differs in its last bits). tests/test_phantom_classifier.py checks that it still reads
# today's phantom and that its name matches today's settings.
SHIPPED_DIR = Path(__file__).with_name("weights")


@dataclass(frozen=True)
class ClassifierSettings:
    resolution: int = 64
    # Nodule sets the budget: at 3,000 steps on 6,000 phantoms its held-out accuracy was 0.86, at 5,000 on 8,000
    # 0.94 (0.87 since the phantom has patients: breast shadows and AP scapulae overlie the lung fields); every
    # other output is at >= 0.99 by then, the age at a correlation of 0.78.
    num_train: int = 8000
    num_test: int = 300
    steps: int = 5000
    batch_size: int = 32
    learning_rate: float = 3e-3
    width: int = 8
    feature_dim: int = 32
    # 0.5 per finding: each finding present in half the images, so every output is trained on balanced classes.
    finding_prob: float = 0.5
    seed: int = CLASSIFIER_SEED

    def __post_init__(self):
        if self.resolution not in range(MIN_RESOLUTION, MAX_RESOLUTION + 1):
            raise UsageError(f"resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], got {self.resolution!r}")
        for name in ("steps", "batch_size", "width", "feature_dim", "num_test"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_train < self.batch_size:
            raise UsageError(f"num_train must be >= batch_size ({self.batch_size}), got {self.num_train!r}")

    def key(self) -> str:
        return stable_hash({"version": VERSION, **dataclasses.asdict(self)})


class _Net(nn.Module):
    """Two paths from one stem. `where`: strided convs down to a 4x4 map that is flattened, not pooled, because
    where the heart sits is the laterality label and global pooling would discard it. `whether`: a global max over
    the 16x16 map, because a nodule is a 2-3 px dot (at 64 px) anywhere in either lung. The stem runs at full
    resolution so that dot is not subsampled away first. Without BatchNorm the nodule output never left chance
    (accuracy 0.49-0.55 at 1,000-4,000 phantoms and 300-1,500 steps); with it, it trains like the others."""

    def __init__(self, width: int, feature_dim: int, outputs: int = len(OUTPUTS)):
        super().__init__()
        w = width
        self.stem = nn.Sequential(*conv_block(1, w), *conv_block(w, w), nn.MaxPool2d(2), *conv_block(w, 2 * w),
                                  nn.MaxPool2d(2))
        self.where = nn.Sequential(*conv_block(2 * w, 4 * w, stride=2), *conv_block(4 * w, 4 * w, stride=2))
        self.embed = nn.Sequential(nn.Linear(4 * w * 16 + 2 * w, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        local = self.stem(x)
        where = F.adaptive_avg_pool2d(self.where(local), 4).flatten(1)
        return self.embed(torch.cat([where, local.amax((2, 3))], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _phantom_set(settings: ClassifierSettings, num_images: int, start_index: int) -> tuple[np.ndarray, np.ndarray]:
    """`num_images` phantoms, then the same phantoms mirrored and labelled "heart on the left"; (2n, H, W),
    (2n, len(OUTPUTS)).

    Mirroring is allowed here only because it is the explicit label of an evaluation instrument: the generator's
    training data are never flipped (a flipped chest teaches the wrong anatomy). Each phantom beside its own
    mirror makes laterality the only thing that tells the two classes apart."""
    data = phantom_dataset(num_images, settings.resolution, settings.seed, settings.finding_prob, start_index)
    images = np.stack([np.asarray(image) for image in data["image"]])
    patient = [np.asarray(data["patient_sex"]) == "F", np.asarray(data["view_position"]) == "AP",
               np.asarray(data["patient_age"], np.float32) / AGE_SCALE]
    labels = np.stack([np.asarray(data[f], np.float32) for f in FINDINGS] + [np.ones(num_images, np.float32)]
                      + [np.asarray(column, np.float32) for column in patient], 1)
    mirrored = labels.copy()
    mirrored[:, OUTPUTS.index(HEART_RIGHT)] = 0.0
    return np.concatenate([images, images[:, :, ::-1]]), np.concatenate([labels, mirrored])


def held_out_report(classifier: PhantomClassifier, images: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy per output at 0.5, and per finding the false-positive rate on the images without it; findings are
    scored on the upright images only (the generator's world), laterality on upright and mirrored alike."""
    probabilities = classifier.predict(images)
    predicted, truth = probabilities >= 0.5, labels >= 0.5
    heart, female, ap, age = (OUTPUTS.index(name) for name in (HEART_RIGHT, FEMALE, VIEW_AP, AGE))
    upright = truth[:, heart]
    report = {"num_images": int(len(images)),
              "laterality_accuracy": float((predicted[:, heart] == truth[:, heart]).mean()),
              "sex_accuracy": float((predicted[upright, female] == truth[upright, female]).mean()),
              "view_accuracy": float((predicted[upright, ap] == truth[upright, ap]).mean()),
              "age_correlation": float(np.corrcoef(probabilities[upright, age], labels[upright, age])[0, 1]),
              "age_mean_absolute_error": float(np.abs(probabilities[upright, age] - labels[upright, age]).mean()
                                               * AGE_SCALE)}
    for i, finding in enumerate(FINDINGS):
        hit, want = predicted[upright, i], truth[upright, i]
        report[finding] = {"accuracy": float((hit == want).mean()),
                           "sensitivity": float(hit[want].mean()) if want.any() else float("nan"),
                           "false_positive_rate": float(hit[~want].mean()) if (~want).any() else float("nan"),
                           "negatives": int((~want).sum())}
    return report


class PhantomClassifier:
    """A trained network, its settings and its held-out report; inference only."""

    def __init__(self, net: _Net, settings: ClassifierSettings, report: dict, device: str = "cpu",
                 batch_size: int = 256):
        self.net, self.settings, self.report = net.to(device).eval(), settings, report
        self.device, self.batch_size = torch.device(device), batch_size
        self.identity = f"phantom-classifier-v{VERSION}:{settings.key()}"
        self.description = (f"phantom: {settings.feature_dim}-d penultimate layer of a CNN trained to read the "
                            f"phantom's findings, laterality, sex, view and age ({settings.resolution} px, "
                            f"seed {settings.seed}, "
                            f"{settings.num_train} images, {settings.steps} steps)")

    @torch.inference_mode()
    def _run(self, images, layer) -> np.ndarray:
        x = to_input(images, self.settings.resolution)
        out = [layer(x[s:s + self.batch_size].to(self.device)).float().cpu() for s in range(0, len(x), self.batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.settings.feature_dim), np.float32)

    def features(self, images) -> np.ndarray:
        """float32 (N, feature_dim): the penultimate layer."""
        return self._run(images, self.net.features)

    def predict(self, images) -> np.ndarray:
        """float32 (N, len(OUTPUTS)): the probability of each of BINARY_OUTPUTS, then the age / AGE_SCALE."""
        return self._run(images, lambda x: torch.sigmoid(self.net(x)))


def ages(probabilities: np.ndarray) -> np.ndarray:
    """The age in years read by `predict`, from its output rows."""
    return probabilities[:, OUTPUTS.index(AGE)] * AGE_SCALE


def train_classifier(settings: ClassifierSettings, progress: bool = True) -> tuple[_Net, dict]:
    """Train on CPU in fp32 from fixed seeds (the same network on every run on one machine); returns the network
    and its held-out report on phantoms after the training images in the same seed."""
    with torch.random.fork_rng(devices=[]):  # fixed initialisation without moving the caller's global RNG
        torch.manual_seed(settings.seed)
        net = _Net(settings.width, settings.feature_dim)
    images, labels = _phantom_set(settings, settings.num_train, 0)
    x, y = to_input(images, settings.resolution), torch.from_numpy(labels)
    rng, size = np.random.default_rng(settings.seed), settings.batch_size
    per_epoch = len(x) // size  # whole batches only, each epoch a fresh permutation
    order = np.concatenate([rng.permutation(len(x))[:per_epoch * size]
                            for _ in range(-(-settings.steps // per_epoch))])
    batches = (torch.from_numpy(order[step * size:(step + 1) * size]) for step in range(settings.steps))
    fit(net, batches, lambda rows: F.binary_cross_entropy_with_logits(net(x[rows]), y[rows]), settings.learning_rate,
        settings.steps, weight_decay=1e-4, one_cycle=True, desc="phantom classifier", disable=not progress)
    test_images, test_labels = _phantom_set(settings, settings.num_test, settings.num_train)
    report = held_out_report(PhantomClassifier(net, settings, {}), test_images, test_labels)
    return net, report


def classifier_path(settings: ClassifierSettings, cache_dir: str | None = None) -> Path:
    return cache_root(cache_dir) / f"phantom-classifier-{settings.key()}.pt"


def shipped_path(settings: ClassifierSettings) -> Path:
    """Where the package keeps a trained classifier for `settings` (only the default one is shipped). The name
    carries the settings key, so a changed setting or VERSION misses it and trains anew."""
    return SHIPPED_DIR / classifier_path(settings).name


def load_classifier(settings: ClassifierSettings | None = None, cache_dir: str | None = None, device: str = "cpu",
                    progress: bool = True) -> PhantomClassifier:
    """The classifier for `settings`: from the cache, else shipped with the package, else trained now and cached
    (about 3 minutes on 2 Zen 4 EPYC cores: 2 min 24 s of steps, about 30 s of rendering)."""
    settings = settings or ClassifierSettings()
    return _load_or_train(classifier_path(settings, cache_dir), settings, len(OUTPUTS), train_classifier, device,
                          progress)


def _load_or_train(path: Path, settings: ClassifierSettings, outputs: int, train, device: str,
                   progress: bool) -> PhantomClassifier:
    """The network at `path` (the cache) or shipped under its name, else `train(settings, progress)`'s, cached."""
    found = next((p for p in (path, SHIPPED_DIR / path.name) if p.exists()), None)
    if found:
        saved = torch.load(found, map_location="cpu", weights_only=True)
        net = _Net(settings.width, settings.feature_dim, outputs)
        net.load_state_dict(saved["state_dict"])
        return PhantomClassifier(net, settings, saved["report"], device)
    net, report = train(settings, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:  # a run killed mid-write never leaves a network that loads half-trained
        torch.save({"state_dict": net.state_dict(), "report": report}, temporary)
    return PhantomClassifier(net, settings, report, device)


def predict(images, classifier: PhantomClassifier | None = None) -> np.ndarray:
    """`PhantomClassifier.predict` for uint8 (N, H, W) images; the default classifier unless one is given."""
    return (classifier or load_classifier()).predict(images)


# The location reader: where and how large a finding is, read as the phantom's truth states it (`finding_facts`);
# the patient's side throughout. EFFUSION_RIGHT / EFFUSION_LEFT: fluid on that side (both for a bilateral one, neither
# without an effusion); the others are read on images that hold the finding: the lesion on the patient's left, the
# effusion's extent (1 - level / 0.25: 0 the smallest, 1 the largest) and each lesion's height in its lung (0 apex,
# 1 base; the zones' limits are 0.33 and 0.67).
EFFUSION_RIGHT, EFFUSION_LEFT = "effusion_right", "effusion_left"
LOCATION_OUTPUTS = (EFFUSION_RIGHT, EFFUSION_LEFT, "effusion_extent", "consolidation_left", "consolidation_height",
                    "nodule_left", "nodule_height")
_GIVEN = {"effusion_extent": "pleural_effusion", "consolidation_left": "consolidation",
          "consolidation_height": "consolidation", "nodule_left": "nodule", "nodule_height": "nodule"}
LOCATION_SEED = CLASSIFIER_SEED + 1  # its own phantoms, which no generator trains on either


def location_targets(findings: list[str], facts: dict) -> tuple[np.ndarray, np.ndarray]:
    """(targets, weights) of one phantom for LOCATION_OUTPUTS: weight 0 where the finding a target needs is absent."""
    effusion, consolidation, nodule = (facts.get(f) for f in ("pleural_effusion", "consolidation", "nodule"))
    side = effusion["side"] if effusion else None
    values = {EFFUSION_RIGHT: side in ("right", "bilateral"), EFFUSION_LEFT: side in ("left", "bilateral"),
              "effusion_extent": 1 - effusion["level"] / 0.25 if effusion else 0.0,
              "consolidation_left": bool(consolidation) and consolidation["side"] == "left",
              "consolidation_height": (consolidation["height"] + 0.6) / 1.2 if consolidation else 0.0,
              "nodule_left": bool(nodule) and nodule["side"] == "left",
              "nodule_height": (nodule["height"] + 0.6) / 1.2 if nodule else 0.0}
    weights = [float(_GIVEN.get(name) is None or _GIVEN[name] in findings) for name in LOCATION_OUTPUTS]
    return np.asarray([float(values[name]) for name in LOCATION_OUTPUTS], np.float32), np.asarray(weights, np.float32)


def _location_set(settings: ClassifierSettings, num_images: int, start_index: int):
    images, targets, weights = [], [], []
    for index in range(start_index, start_index + num_images):
        pixels, findings, _, facts = draw_phantom(settings.seed, index, settings.resolution, settings.finding_prob,
                                                  facts=True)
        target, weight = location_targets(findings, facts)
        images.append(pixels), targets.append(target), weights.append(weight)
    return np.stack(images), np.stack(targets), np.stack(weights)


def train_location_reader(settings: ClassifierSettings, progress: bool = True) -> tuple[_Net, dict]:
    """As `train_classifier`, on LOCATION_OUTPUTS with each target weighted by whether it applies (no mirroring:
    the side is what it reads). The held-out report: accuracy of each binary output at 0.5 and the mean absolute
    error of each extent and height, on the images where they apply."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = _Net(settings.width, settings.feature_dim, len(LOCATION_OUTPUTS))
    images, targets, weights = _location_set(settings, settings.num_train, 0)
    x, y, w = to_input(images, settings.resolution), torch.from_numpy(targets), torch.from_numpy(weights)
    rng, size = np.random.default_rng(settings.seed), settings.batch_size
    batches = (torch.from_numpy(rng.choice(len(x), size, replace=False)) for _ in range(settings.steps))

    def loss(rows):
        error = F.binary_cross_entropy_with_logits(net(x[rows]), y[rows], reduction="none")
        return (error * w[rows]).sum() / w[rows].sum()

    fit(net, batches, loss, settings.learning_rate, settings.steps, weight_decay=1e-4, one_cycle=True,
        desc="phantom location reader", disable=not progress)
    test_images, test_targets, test_weights = _location_set(settings, settings.num_test, settings.num_train)
    reader = PhantomClassifier(net, settings, {})
    read = reader.predict(test_images)
    report = {}
    for i, name in enumerate(LOCATION_OUTPUTS):
        applies = test_weights[:, i] > 0
        if name.endswith(("_extent", "_height")):
            report[name] = {"mean_absolute_error": float(np.abs(read[applies, i] - test_targets[applies, i]).mean())}
        else:
            report[name] = {"accuracy": float(((read[applies, i] >= 0.5) == (test_targets[applies, i] >= 0.5)).mean())}
    return net, report


def load_location_reader(settings: ClassifierSettings | None = None, cache_dir: str | None = None,
                         device: str = "cpu", progress: bool = True) -> PhantomClassifier:
    """The location reader for `settings` (default: the classifier's, on LOCATION_SEED): cached, shipped, or
    trained now (about 3 minutes on 2 cores) and cached. Its `predict` returns LOCATION_OUTPUTS."""
    settings = settings or ClassifierSettings(seed=LOCATION_SEED)
    path = cache_root(cache_dir) / f"phantom-location-reader-{settings.key()}.pt"
    return _load_or_train(path, settings, len(LOCATION_OUTPUTS), train_location_reader, device, progress)
