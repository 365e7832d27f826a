"""`create`: a study folder from real images and one or more folders of generated images (each an arm).

Per arm, as many real images as synthetic; real images are drawn to match the synthetic images' labels (findings,
sex, view, where both sides have them) so that a finding never tells the origin. Every image is re-encoded the same
way (8-bit grayscale PNG at one size, no text chunks, a random 128-bit ID as its name, written in random order):
nothing but its pixels can tell a reader where it came from. Each reader gets a personal token and their own
seeded order: an optional practice round first (with feedback, left out of the analysis), then the study images,
and optionally a share of them shown again later for agreement of a reader with themself.
"""

from __future__ import annotations

import json
import random
import secrets
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..cli import UsageError
from ..config import from_dict
from ..data.phantom import phantom_dataset
from ..evaluation.images import ImageSource, load_source, to_eval_image
from ..evaluation.subgroups import dataset_metadata, manifest_metadata
from ..generation.output_folder import MANIFEST, read_manifest
from ..utils import derived_from_real, split_spec
from ..vocabulary import (
    FINDINGS,
    FINDINGS_COLUMN,
    MANIFEST_LABELS,
    age_bin,
    finding_lists,
)
from . import store

PHANTOM = "phantom"  # held-out phantoms of the demo (never its training images)
STRATA = ("patient_sex", "view_position")  # with the findings: what real images are matched to the synthetic on


@dataclass
class Pool:
    """An image source with each image's labels (findings list, sex, view, age bin; "" where unknown)."""

    name: str
    read: Callable[[int, int], np.ndarray]  # (index, size) -> uint8 (size, size)
    labels: list[dict]
    labelled: bool  # whether its findings are known: asked for (generated) or the dataset's labels (real)
    side: int | None = None  # a generated folder's image side

    def __len__(self) -> int:
        return len(self.labels)


def parse_reader(text: str) -> tuple[str, float | None]:
    """`NAME` or `NAME:YEARS` (years of experience) -> (name, years)."""
    name, _, years = text.partition(":")
    if not name.strip() or (years and not _is_number(years)):
        raise UsageError(f"--readers {text!r}: give NAME or NAME:YEARS (years of experience, e.g. alice:12)")
    return name.strip(), float(years) if years else None


def _is_number(text: str) -> bool:
    try:
        return float(text) >= 0
    except ValueError:
        return False


def _labels(metadata: dict, count: int) -> list[dict]:
    findings = finding_lists(metadata[FINDINGS_COLUMN]) if FINDINGS_COLUMN in metadata else [[]] * count
    def column(name):
        return [str(v or "") for v in metadata.get(name) or [""] * count]

    ages = column("age_bin") if metadata.get("age_bin") else [
        age_bin(a) if a not in (None, "") else "" for a in metadata.get("patient_age", [None] * count)]
    sexes, views = column("patient_sex"), column("view_position")
    return [{"findings": sorted(findings[i]), "patient_sex": sexes[i], "view_position": views[i], "age_bin": ages[i]}
            for i in range(count)]


def _source_pool(name: str, source: ImageSource, metadata: dict, side=None) -> Pool:
    return Pool(name, lambda i, size: source.read([i], size)[0], _labels(metadata, len(source)),
                FINDINGS_COLUMN in metadata, side)


def real_pool(spec: str, needed: int) -> Pool:
    """`phantom`, a prepared dataset (its test split unless `PATH:SPLIT` says otherwise, so no training patient is
    shown), an image folder or a DICOM folder."""
    if spec == PHANTOM:
        demo = from_dict({"preset": "demo"})
        dataset = phantom_dataset(max(4 * needed, 64), demo.data.resolution, seed=demo.training.seed,
                                  finding_prob=demo.data.phantom_finding_prob,
                                  start_index=demo.data.num_phantom_images)
        metadata = dataset.select_columns([c for c in dataset.column_names if c != "image"]).to_dict()
        images = dataset["image"]
        return Pool("phantom", lambda i, size: to_eval_image(images[i], size), _labels(metadata, len(dataset)), True)
    path, split = split_spec(spec)
    if split is None and (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if "test" in splits:
            spec = f"{spec}:test"
    source = load_source(spec)
    metadata = dataset_metadata(source) if source._dataset is not None else {}
    return _source_pool(Path(split_spec(spec)[0]).name, source, metadata)


def synthetic_pool(folder: str) -> Pool:
    """A `pipeline.py` output folder: its images and, from manifest.csv, what each was asked for."""
    source = load_source(folder)
    if source._dataset is not None:
        raise UsageError(f"--synthetic {folder}: a saved dataset; give a folder of generated images (pipeline.py "
                         "--output_dir)")
    edited = next((p for p in source._folder_files if derived_from_real(p)), None)
    if edited is not None:
        raise UsageError(f"--synthetic {folder}: {edited.name} was edited from a real patient's radiograph "
                         "(lunggen-edit); it is patient data, not a synthetic image")
    labelled = any(row.get(MANIFEST_LABELS) for row in read_manifest(folder)) if (Path(folder) / MANIFEST).is_file() \
        else False
    metadata = manifest_metadata(source, folder) if labelled else {}
    with Image.open(source._folder_files[0]) as first:
        side = max(first.size)
    return _source_pool(Path(folder).name, source, metadata, side)


def _key(labels: dict, fields: tuple[str, ...]) -> tuple:
    return tuple("|".join(labels[f]) if f == "findings" else labels[f] for f in fields)


def match_real(real: Pool, wanted: list[dict], count: int, taken: set[int], rng: random.Random) -> list[int]:
    """`count` real images not in `taken`: first, per stratum of the synthetic images (findings, sex, view where both
    sides know them), as many as the synthetic side has in it; the rest drawn at random."""
    fields = ("findings",) + tuple(f for f in STRATA if any(w[f] for w in wanted) and any(r[f] for r in real.labels))
    by_key = defaultdict(list)
    for i in rng.sample(range(len(real)), len(real)):
        if i not in taken:
            by_key[_key(real.labels[i], fields)].append(i)
    chosen = []
    for key, n in Counter(_key(w, fields) for w in wanted).most_common():
        chosen += by_key[key][:n]
        del by_key[key][:n]
    rest = [i for key in by_key for i in by_key[key]]
    chosen += rng.sample(rest, min(count - len(chosen), len(rest)))
    if len(chosen) < count:
        raise UsageError(f"--real {real.name}: {len(real) - len(taken)} unused images, the study needs {count} more")
    return chosen[:count]


def _order(items: list[str], repeats: int, practice: list[str], rng: random.Random) -> list[tuple[str, int, int]]:
    """(image id, repeat, practice) in reading order: practice first, then the study images shuffled, each of
    `repeats` of them shown again at a random later place."""
    order = [(i, 0, 0) for i in rng.sample(items, len(items))]
    for image in rng.sample(items, repeats):
        first = next(k for k, item in enumerate(order) if item[0] == image)
        order.insert(rng.randint(first + 2, len(order)) if first + 2 <= len(order) else len(order), (image, 1, 0))
    return [(i, 0, 1) for i in practice] + order


def create_study(output_dir, real: str, synthetic: list[str], num_images: int, readers: list[str],
                 repeat_fraction: float = 0.0, practice: int = 0, size: int | None = None, seed: int = 0,
                 ask_findings: bool = True, progress: bool = True) -> dict:
    """Write the study folder; returns {"readers": {name: token}, "organiser": token, ...} for the links."""
    folder = Path(output_dir)
    if (folder / store.DATABASE).exists():
        raise UsageError(f"--output_dir {output_dir} already holds a study; choose a new folder")
    if not synthetic:
        raise UsageError("--synthetic: give at least one folder of generated images")
    arms = len(synthetic)
    if num_images < 2 * arms or num_images % (2 * arms):
        raise UsageError(f"--num_images {num_images}: give a multiple of {2 * arms} (half real, half synthetic, "
                         f"split evenly over {arms} arm{'s' * (arms > 1)})")
    if not 0 <= repeat_fraction <= 1 or practice < 0 or practice % 2:
        raise UsageError(f"--repeat_fraction {repeat_fraction} --practice {practice}: a share in [0, 1] and an even "
                         "number of practice images (half real)")
    people = [parse_reader(r) for r in readers]
    if not people or len({name for name, _ in people}) < len(people):
        raise UsageError(f"--readers {' '.join(readers)}: give each reader once")
    per_arm = num_images // (2 * arms)
    rng = random.Random(seed)
    pools = [synthetic_pool(f) for f in synthetic]
    names = [p.name if [q.name for q in pools].count(p.name) == 1 else f"{p.name}-{k}" for k, p in enumerate(pools)]
    picks = []  # (pool, index, origin, arm, practice)
    for arm, pool in zip(names, pools, strict=True):
        need = per_arm + (practice // 2 if arm == names[0] else 0)
        if len(pool) < need:
            raise UsageError(f"--synthetic {pool.name}: {len(pool)} images, the study needs {need}")
        chosen = rng.sample(range(len(pool)), need)
        picks += [(pool, i, "synthetic", arm, 0) for i in chosen[:per_arm]]
        picks += [(pool, i, "synthetic", None, 1) for i in chosen[per_arm:]]
    real_pool_ = real_pool(real, num_images // 2 + practice // 2)
    taken: set[int] = set()
    for arm, pool in zip(names, pools, strict=True):
        wanted = [pool.labels[i] for p, i, _, a, _ in picks if p is pool and a == arm] if pool.labelled else []
        matched = match_real(real_pool_, wanted, per_arm, taken, rng)
        taken.update(matched)
        picks += [(real_pool_, i, "real", None, 0) for i in matched]
    picks += [(real_pool_, i, "real", None, 1) for i in match_real(real_pool_, [], practice // 2, taken, rng)]
    side = size or max(pool.side for pool in pools)  # real images are brought to the generators' resolution
    db = store.create(folder)
    (folder / store.IMAGES).mkdir(exist_ok=True)
    ids = {}
    rng.shuffle(picks)  # written in random order: nothing about a file's place or time follows its origin
    for pool, index, origin, arm, is_practice in tqdm(picks, desc="study images", unit="img", disable=not progress):
        image_id = secrets.token_hex(16)
        # zlib level 1: a 1024 px image in 22 ms against 129 ms at PIL's default 6, for 17% more bytes
        # (benchmarks/HISTORY.md, "Reader study"); the same level for every image.
        Image.fromarray(pool.read(index, side)).save(folder / store.IMAGES / f"{image_id}.png", format="PNG",
                                                     compress_level=1)
        labels = pool.labels[index]
        shown = labels["findings"] if pool.labelled else None
        store.add_image(db, image_id, origin, arm, shown, labels, index, is_practice)
        ids[image_id] = is_practice
    study_ids = sorted(i for i, p in ids.items() if not p)
    practice_ids = sorted(i for i, p in ids.items() if p)
    tokens = {}
    for number, (name, years) in enumerate(people):
        reader_seed = random.Random(f"{seed}:{number}").getrandbits(32)
        reader_rng = random.Random(reader_seed)
        tokens[name] = secrets.token_urlsafe(24)
        order = _order(study_ids, round(repeat_fraction * len(study_ids)),
                       reader_rng.sample(practice_ids, len(practice_ids)), reader_rng)
        store.add_reader(db, name, years, tokens[name], reader_seed, order)
    vocabulary = sorted({f for pool in (*pools, real_pool_) for labels in pool.labels for f in labels["findings"]})
    organiser = secrets.token_urlsafe(24)
    settings = {"seed": seed, "size": side, "arms": names, "num_images": num_images, "per_arm": per_arm,
                "repeat_fraction": repeat_fraction, "practice": practice, "ask_findings": ask_findings,
                "vocabulary": vocabulary or list(FINDINGS), "organiser_token": organiser}
    store.write_meta(db, settings)
    db.close()
    return {"readers": tokens, "organiser": organiser, **settings}

