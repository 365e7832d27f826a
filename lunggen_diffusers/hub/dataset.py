"""A synthetic dataset on the Hub: `lunggen-hub push-dataset SYNTH_DIR --repo_id org/name` turns a `pipeline.py`
folder into Parquet shards (an `image` column, what each image was asked for, its seed, sampler, model and revision)
with a dataset card, and uploads them in one commit to a repo that is private unless asked otherwise.

Refused, in one line, when the folder has no evaluation with both the memorization audit and the re-identification
check; when either flags it (unless `--allow_flagged`, and then the card says so); when an image is not marked
synthetic or is marked as derived from a real image; when any published text or image chunk would hold a local
path or a patient identifier.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import datasets
from huggingface_hub import CommitOperationAdd, DatasetCard, DatasetCardData, HfApi
from huggingface_hub.errors import HTTPError
from PIL import Image

from ..cli import UsageError
from ..data.reports import REAL_TEXT
from ..evaluation.images import load_source
from ..evaluation.report import reid_card
from ..evaluation.subgroups import manifest_metadata
from ..generation.output_folder import MANIFEST, PROMPT_SOURCE, read_manifest
from ..generation.privacy_filter import SUMMARY as FILTER_SUMMARY
from ..utils import DERIVED_FROM_REAL, SYNTHETIC_NOTICE
from ..vocabulary import FINDINGS_COLUMN, SUBGROUPS
from .privacy import check_published, local_paths
from .push import hub_error

TEMPLATE = Path(__file__).with_name("dataset_card.md")
LICENSE_NAME = "lunggen-synthetic-research-only"
TAGS = ["medical-imaging", "chest-x-ray", "synthetic-data", "lunggen", "research-only"]
SHARD_IMAGES = 2000
DEFAULT_EVAL = "eval"


def _evaluation(folder: Path, eval_dir: Path, num_images: int) -> dict:
    path = eval_dir / "metrics.json"
    if not path.is_file():
        raise UsageError(f"{folder} has no audit: {path} is missing; run `python -m lunggen_diffusers.evaluate --fake "
                         f"{folder} --train ... --reid VERIFIER --output_dir {eval_dir}` first")
    report = json.loads(path.read_text())
    fake = report.get("recipe", {}).get("fake", "")
    if Path(fake.partition(":")[0]).resolve() != folder.resolve() or report["counts"]["fake"] != num_images:
        raise UsageError(f"{eval_dir} evaluates another image set ({report['counts']['fake']} images), not the "
                         f"{num_images} of {folder}; evaluate this folder")
    missing = [name for name, key in (("the memorization audit (--train)", "memorization"),
                                      ("the re-identification check (--reid)", "reidentification"))
               if not (report.get(key) or report["metrics"].get(key))]
    if missing:
        raise UsageError(f"{folder} has no audit: {eval_dir} lacks {' and '.join(missing)}")
    return report


def _flags(report: dict) -> list[str]:
    flags = []
    mem = report["memorization"]
    if mem["num_flagged"]:
        flags.append(f"the memorization audit flags {mem['num_flagged']} image(s) as near-copies of training images")
    reid = report["metrics"]["reidentification"]
    if reid["flagged"]:
        flags.append(f"the re-identification check flags the set ({reid['share_generated']:.2%} matched to a "
                     f"training patient against {reid['share_null']:.2%} of held-out strangers)")
    return flags


def _image_bytes(path: Path) -> tuple[bytes, dict[str, str]]:
    """The PNG as written, after checking its chunks mark it synthetic and not derived from a real image."""
    with Image.open(path) as image:
        chunks = dict(image.text)
    derived = DERIVED_FROM_REAL in chunks
    if derived or not chunks.get("synthetic"):
        why = f"carries {DERIVED_FROM_REAL!r}: it was made from a real image" if derived else "is not marked synthetic"
        raise UsageError(f"{path.name} {why}; a synthetic dataset holds generated images only")
    return path.read_bytes(), chunks


def _rows(folder: Path) -> tuple[dict[str, list], list[str]]:
    """The dataset's columns, in manifest order, and every text an image carries (for the leak check)."""
    manifest = read_manifest(str(folder))
    source = load_source(str(folder))
    meta = manifest_metadata(source, str(folder))
    order = {path.relative_to(folder).as_posix(): i for i, path in enumerate(source._folder_files)}
    columns = {"image": [], "index": [], "findings": [], **{g: [] for g in SUBGROUPS}, "seed": [], "noise_seed": [],
               "sampler": [], "steps": [], "guidance_scale": [], "model": [], "revision": [], "redraws": []}
    texts = []
    for row in manifest:
        data, chunks = _image_bytes(folder / row["file"])
        texts.extend(chunks.values())
        i = order[row["file"]]
        columns["image"].append({"bytes": data, "path": None})
        columns["index"].append(int(row["index"]))
        columns["findings"].append(meta[FINDINGS_COLUMN][i] if row.get("labels") not in (None, "") else None)
        for group in SUBGROUPS:
            columns[group].append(meta[group][i] or None)
        columns["seed"].append(int(row["seed"]))
        columns["noise_seed"].append(row["noise_seed"])
        columns["sampler"].append(row["scheduler"])
        columns["steps"].append(int(row["steps"]))
        columns["guidance_scale"].append(float(row["guidance_scale"]) if row.get("guidance_scale") else None)
        columns["model"].append(row["model"])
        columns["revision"].append(row["revision"])
        columns["redraws"].append(int(row["redraws"]) if row.get("redraws") else 0)
    # Columns no image uses (the findings of an unconditional model, subgroups it was not conditioned on) go.
    empty = [name for name, values in columns.items() if name != "image" and all(v is None for v in values)]
    return {k: v for k, v in columns.items() if k not in empty}, texts


def _features(columns: dict[str, list]) -> datasets.Features:
    kinds = {"image": datasets.Image(), "index": datasets.Value("int64"),
             "findings": datasets.List(datasets.Value("string")), "seed": datasets.Value("int64"),
             "noise_seed": datasets.Value("string"), "steps": datasets.Value("int32"),
             "guidance_scale": datasets.Value("float32"), "redraws": datasets.Value("int32")}
    return datasets.Features({name: kinds.get(name, datasets.Value("string")) for name in columns})


def _counts(columns: dict[str, list]) -> dict[str, list[tuple[str, int]]]:
    counts = {}
    if "findings" in columns:
        found = Counter(f for names in columns["findings"] for f in (names or ["No Finding"]))
        counts["finding"] = sorted(found.items())
    for group in SUBGROUPS:
        if group in columns:
            counts[group] = sorted(Counter(v or "unset" for v in columns[group]).items())
    return counts


def _forbidden(folder: Path, eval_dir: Path, report: dict):
    """The local paths no published text may hold: the folders, and every path the evaluation recipe names."""
    recipe = report["recipe"]
    named = [str(recipe.get(key) or "").partition(":")[0] for key in ("real", "fake", "train", "reid", "cache_dir",
                                                                       "feature_model", "output_dir")]
    return local_paths({}, folder, eval_dir, *(Path(p) for p in named if p and Path(p).exists()))


def dataset_files(synth_dir, repo_id: str, eval_dir=None, allow_flagged: bool = False,
                  shard_images: int = SHARD_IMAGES) -> dict[str, bytes]:
    """Everything the push uploads, by path in the repo: the Parquet shards and README.md."""
    folder = Path(synth_dir)
    if not (folder / MANIFEST).is_file():
        raise UsageError(f"{folder}: no {MANIFEST}; give a folder written by pipeline.py")
    eval_dir = Path(eval_dir) if eval_dir else folder / DEFAULT_EVAL
    real = sum(row.get(PROMPT_SOURCE) == REAL_TEXT for row in read_manifest(str(folder)))
    if real:
        raise UsageError(f"refused: {real} image(s) of {folder.name} were generated from reports of a real collection, "
                         "patient data under its data-use agreement (their PNGs and manifest carry the text); "
                         "generate from written or templated prompts to publish")
    columns, texts = _rows(folder)
    report = _evaluation(folder, eval_dir, len(columns["index"]))
    flags = _flags(report)
    if flags and not allow_flagged:
        raise UsageError(f"refused: {'; '.join(flags)}; publish anyway only with --allow_flagged (the card then says "
                         "so), or filter the images (pipeline.py --privacy_filter) and evaluate again")
    forbidden = _forbidden(folder, eval_dir, report)
    for text in texts:
        check_published(text, forbidden, "an image's PNG text chunks")
    plain = {k: v for k, v in columns.items() if k != "image"}
    check_published(json.dumps(plain), forbidden, "the dataset's columns")
    privacy_filter = folder / FILTER_SUMMARY
    card = _card(repo_id, columns, report, flags,
                 json.loads(privacy_filter.read_text()) if privacy_filter.is_file() else None)
    check_published(str(card), forbidden, "the dataset card")
    dataset = datasets.Dataset.from_dict(columns, features=_features(columns))
    shards = max(1, -(-len(dataset) // shard_images))
    files = {"README.md": str(card).encode()}
    for k in range(shards):
        buffer = io.BytesIO()
        dataset.shard(shards, k, contiguous=True).to_parquet(buffer)
        files[f"data/train-{k:05d}-of-{shards:05d}.parquet"] = buffer.getvalue()
    return files


def _card(repo_id: str, columns: dict, report: dict, flags: list[str], privacy_filter: dict | None) -> DatasetCard:
    n = len(columns["index"])
    data = DatasetCardData(
        license="other", license_name=LICENSE_NAME, tags=TAGS, pretty_name=repo_id.split("/")[-1],
        task_categories=["image-classification", "unconditional-image-generation"],
        size_categories=["n<1K" if n < 1000 else "1K<n<10K" if n < 10_000 else "10K<n<100K" if n < 100_000
                         else "100K<n<1M"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}])
    section = report["model_card"]
    first = {name: columns[name][0] for name in ("model", "revision", "sampler", "steps", "seed")}
    return DatasetCard.from_template(
        data, template_path=str(TEMPLATE), repo_id=repo_id, num_images=n, made=first,
        indices=(min(columns["index"]), max(columns["index"])),
        guidance=sorted({g for g in columns.get("guidance_scale", []) if g is not None}),
        counts=_counts(columns), evaluation=section, memorization=section.get("memorization"),
        reid=reid_card(report["metrics"]["reidentification"]), flags=flags, privacy_filter=privacy_filter,
        columns=[name for name in columns if name != "image"], notice=SYNTHETIC_NOTICE)


def push_dataset(synth_dir, repo_id: str, private: bool = True, token: str | None = None, eval_dir=None,
                 allow_flagged: bool = False, commit_message: str = "Upload synthetic chest X-rays (LungGen)") -> str:
    """Check, build and upload (one commit, private unless told otherwise); returns the repo URL."""
    files = dataset_files(synth_dir, repo_id, eval_dir, allow_flagged)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content) for name, content in files.items()]
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        api.create_commit(repo_id, operations, repo_type="dataset", commit_message=commit_message)
    except (OSError, HTTPError) as err:
        raise hub_error(err, repo_id, Path(synth_dir)) from None
    return str(url)
