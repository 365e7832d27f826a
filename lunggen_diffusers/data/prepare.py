"""Prepare a source once: `python -m lunggen_diffusers.prepare --nih_dir /data/NIH --output_dir data/nih-256`, or
`--train_data_dir DIR` for any other (a DICOM folder, VinDr-CXR, RSNA Pneumonia, an image folder with patient IDs).

Writes a `save_to_disk` DatasetDict (train / validation / test; grayscale PNGs in `image` + metadata) that
`train.py --dataset_name data/nih-256` reads directly, with `prepare_report.json`, `failed_images.csv` and a dataset
card (README.md) beside it. Same inputs and settings again: nothing is redone. Interrupted: run it again; finished
chunks are kept in `<output_dir>.partial/` and the output folder only appears once complete.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
from huggingface_hub import DatasetCard, DatasetCardData
from transformers import HfArgumentParser

from ..cli import UsageError, parse, run
from ..config import DataConfig
from ..utils import files_fingerprint, list_images, stable_hash
from . import dicom, nih
from .decode import decode_images
from .folders import PHI_DIGESTS, SKIPPED_CSV
from .phantom import phantom_dataset
from .prepared import describe, read_report, save_prepared
from .registry import detect_source, folder_source, source_report_dir
from .splits import SPLITS, check_patient_disjoint, filter_dataset, patient_splits

CITATION = """@inproceedings{wang2017chestxray8,
  author    = {Wang, Xiaosong and Peng, Yifan and Lu, Le and Lu, Zhiyong and Bagheri, Mohammadhadi and
               Summers, Ronald M.},
  title     = {ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on Weakly-Supervised Classification and
               Localization of Common Thorax Diseases},
  booktitle = {IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2017}
}"""
SOURCE_URL = "https://nihcc.app.box.com/v/ChestXray-NIHCC"


# Flags of earlier versions, now spelled as DataConfig (and train.py) spell them.
OLD_FLAGS = {"--num_proc": "--preprocessing_num_workers", "--seed": "--split_seed"}


@dataclass
class PrepareArguments:
    """What only this command has; every data setting (resolution, filters, splits, workers) is a DataConfig field."""

    output_dir: str = field(metadata={"help": "Where the prepared dataset goes (a `save_to_disk` folder)."})
    nih_dir: str | None = field(default=None, metadata={
        "help": "The NIH ChestX-ray14 folder (Data_Entry_2017_v2020.csv and the PNGs). Other sources (a DICOM folder, "
                "VinDr-CXR, RSNA Pneumonia, an image folder with a metadata.csv of patient IDs): --train_data_dir."})
    phantom: bool = field(default=False, metadata={
        "help": "Prepare the built-in phantom instead of a folder (--num_phantom_images, --phantom_images_per_patient, "
                "--phantom_finding_prob, at --resolution), split patient-wise like any source: a demo of everything "
                "that needs patients, such as `evaluate --reid`."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a dataset prepared differently."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload as a PRIVATE Hub dataset."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "e.g. my-org/nih-chestxray14-256."})
    hub_token: str | None = field(default=None, metadata={"help": "Else HF_TOKEN or the cached login."})


def parse_command_line(argv: list[str] | None = None) -> tuple[PrepareArguments, DataConfig]:
    """The command line -> (this command's arguments, the DataConfig); defaults: 256 px, all cores decoding."""
    parser = HfArgumentParser((PrepareArguments, DataConfig))
    parser.set_defaults(resolution=256, preprocessing_num_workers=os.cpu_count())
    argv = sys.argv[1:] if argv is None else argv
    renamed = [OLD_FLAGS.get(flag, flag) + sep + value for flag, sep, value in (a.partition("=") for a in argv)]
    return parse(parser, renamed)


def counts_table(splits: dict) -> str:
    """Markdown table of images, patients and views per split."""
    views = sorted({v for s in splits.values() for v in s["views"]})
    lines = ["| split | images | patients | " + " | ".join(views) + " |", "|---" * (3 + len(views)) + "|"]
    for name, s in splits.items():
        cells = [name, s["images"], s["patients"], *(s["views"].get(v, 0) for v in views)]
        lines.append("| " + " | ".join(f"{c:,}" if isinstance(c, int) else c for c in cells) + " |")
    return "\n".join(lines)


def partial_download(report: dict) -> str:
    """The card's line on archives not downloaded (empty for a complete download)."""
    absent = report["images_in_absent_archives"]
    if not absent:
        return ""
    found = report["selected_images"] - absent - report["missing_images"]
    return (
        f"- Partial download: {found:,} of {report['selected_images']:,} images found; the archive folder(s) "
        f"{', '.join(report['absent_archives'])} ({absent:,} images) were absent, and the splits hold only the "
        "images present.\n"
    )


def dataset_card(report: dict) -> str:
    """The prepared folder's README.md: source, counts, splits, preprocessing, citation and terms (no patient IDs)."""
    s = report["settings"]
    res = s["resolution"]
    filters = ", ".join(f"`--{k} {v}`" for k, v in report["filters"].items()) or "none"
    data = DatasetCardData(
        pretty_name=f"NIH ChestX-ray14, prepared at {res}x{res}",
        license="other",
        license_name="nih-chestxray14",
        license_link=SOURCE_URL,
        task_categories=["unconditional-image-generation"],
        tags=["medical-imaging", "chest-x-ray", "lunggen-diffusers"],
    )
    body = f"""
# NIH ChestX-ray14, prepared at {res}x{res}

Prepared with `python -m lunggen_diffusers.prepare` (LungGen-Diffusers) from the NIH Clinical Center's ChestX-ray14
release ({report['metadata_file']}: {report['metadata_rows']:,} images). Data provider: the NIH Clinical Center,
{SOURCE_URL}.

## Contents

{counts_table(report['splits'])}

- Splits are patient-wise and no patient is in two of them (checked when prepared): {report['split_method']};
  validation holds {s['validation_fraction']:.0%} of the train/validation patients (seed {s['split_seed']}).
  Train on `train` only.
- Filters: {filters}.
- {report['missing_images']:,} image(s) named in the metadata were missing and {report['failed_images']:,} could not
  be read; they are left out.
{partial_download(report)}
## Preprocessing

Each PNG was decoded once, converted to 8-bit grayscale (16-bit images scaled by their value range, transparency
over black), {'centre-cropped' if s['center_crop'] else 'padded with black'} to a square and resized with Lanczos
(antialiased) to {res}x{res}. `image` holds them as 8-bit grayscale PNGs (lossless); nothing was flipped or
normalised.
Other columns: `image_index`, `patient_id`, `finding_labels` (list), `view_position`, `patient_age` (empty where the
metadata's age is implausible), `patient_sex`, `follow_up`, `split`.

This dataset carries NIH's de-identified patient IDs and image names (needed for patient-wise splits and per-patient
caps): keep any copy on the Hub private.

## Terms and citation

Use of ChestX-ray14 is unrestricted, provided that you link to the original download site ({SOURCE_URL}),
acknowledge the NIH Clinical Center as the data provider, and cite:

Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks
on Weakly-Supervised Classification and Localization of Common Thorax Diseases. IEEE CVPR 2017.

```bibtex
{CITATION}
```
"""
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def push_prepared(folder: str | Path, repo_id: str, token: str | None = None) -> None:
    """Upload the prepared dataset as a private Hub dataset; its card body comes from the local README.md."""
    datasets.load_from_disk(str(folder)).push_to_hub(repo_id, private=True, token=token)
    # push_to_hub wrote a card whose YAML says how to load the data; keep that YAML, add ours and our text.
    hub_card = DatasetCard.load(repo_id, repo_type="dataset", token=token)
    card = DatasetCard((Path(folder) / "README.md").read_text())
    for key, value in hub_card.data.to_dict().items():
        card.data[key] = value
    card.push_to_hub(repo_id, token=token, repo_type="dataset")


def _previous(output: Path, key: str, overwrite: bool) -> dict | None:
    """The report of `output` when it was prepared from the same inputs and settings (nothing to do); None when it
    may be (re)made; refused when it holds something else."""
    if not output.exists():
        return None
    previous = read_report(output)
    if previous is not None and previous.get("key") == key:
        return previous
    if previous is None and any(output.iterdir()):
        raise UsageError(f"--output_dir {output} is not a prepared dataset; refusing to replace it")
    if previous is not None and not overwrite:
        raise UsageError(
            f"--output_dir {output} holds a dataset prepared from other inputs or settings; "
            "pass --overwrite_output_dir to replace it"
        )
    return None


def make_prepared_dataset(args: PrepareArguments, settings: DataConfig) -> tuple[dict, bool]:
    """Decode, split and save (or reuse) `args.output_dir`; returns its report and whether it reused one."""
    if bool(args.nih_dir) + bool(settings.train_data_dir) + args.phantom != 1:
        raise UsageError("give --nih_dir (NIH ChestX-ray14), --train_data_dir (any other source) or --phantom, one of "
                         "them")
    if args.phantom:
        return prepare_phantom(args, settings)
    if settings.train_data_dir and len(settings.train_data_dir) > 1:
        raise UsageError("prepare one --train_data_dir at a time (training joins several: give each to train.py)")
    if settings.train_data_dir and detect_source(settings) != "nih":
        return prepare_folder(args, settings)
    args.nih_dir = args.nih_dir or settings.train_data_dir[0]
    output = Path(args.output_dir)
    plan = nih.plan_nih(args.nih_dir, settings)
    previous = _previous(output, plan.report["key"], args.overwrite_output_dir)
    if previous is not None:
        return previous, True
    work_dir = output.with_name(output.name + ".partial")
    dsdict, report, failures = nih.decode_splits(plan, settings, work_dir)
    save_prepared(dsdict, output, work_dir, report, failures, {"README.md": dataset_card(report)})
    return report, False


def prepare_folder(args: PrepareArguments, settings: DataConfig) -> tuple[dict, bool]:
    """Any other folder (DICOM, VinDr-CXR, RSNA Pneumonia, an image folder with patient IDs) into the same layout as
    NIH's: train / validation / test split by patient, decoded once, with its report, failed and skipped files."""
    root = Path(settings.train_data_dir[0])
    if not root.is_dir():
        raise UsageError(f"--train_data_dir {root}: no such folder")
    output = Path(args.output_dir)
    options = {k: v for k, v in asdict(settings).items()
               if k not in ("preprocessing_num_workers", "cache_dir", "pseudonym_key")}
    # Which key, not where its file is: the same key under another path prepares the same split.
    pseudonyms = dicom.key_id(dicom.pseudonym_key(settings.pseudonym_key)) if detect_source(settings, str(root)) in (
        "vindr", "rsna", "dicom") else None
    key = stable_hash({"files": files_fingerprint(list_images(root)), "settings": options, "pseudonyms": pseudonyms})
    previous = _previous(output, key, args.overwrite_output_dir)
    if previous is not None:
        return previous, True
    raw, source = folder_source(settings)
    if "patient_id" not in raw.column_names:
        raise UsageError(f"--train_data_dir {root}: no patient IDs (add a metadata.csv with file_name and patient_id)"
                         ", so no patient-wise split can be made; train on the folder directly instead")
    raw = filter_dataset(raw.add_column("split", patient_splits(raw, settings)), settings)
    work_dir = output.with_name(output.name + ".partial")
    prepared, failures = decode_images(
        raw, settings.resolution, settings.center_crop, num_proc=settings.preprocessing_num_workers,
        work_dir=work_dir, max_failed_fraction=settings.max_failed_fraction,
        dicom_percentiles=tuple(settings.dicom_percentiles) if settings.dicom_percentiles else None)
    names = prepared["split"]
    dsdict = datasets.DatasetDict({s: prepared.select([i for i, n in enumerate(names) if n == s])
                                   for s in SPLITS if s in names})
    check_patient_disjoint(dsdict)
    skipped = source_report_dir(settings) / SKIPPED_CSV
    digests = source_report_dir(settings) / PHI_DIGESTS  # so that runs on the prepared copy are checked
    method = ("the collection's official split" if "official_split" in raw.column_names else
              "the collection's own test set, validation by a hash of the patient IDs"
              if "official_test" in raw.column_names else "by a hash of the patient IDs")
    report = {"key": key, "source": source, "split_method": method,
              "splits": describe(dsdict), "failed_images": len(failures),
              "skipped_files": max(0, len(skipped.read_text().splitlines()) - 1) if skipped.is_file() else 0,
              "settings": {"resolution": settings.resolution, "center_crop": settings.center_crop,
                           "validation_fraction": settings.validation_fraction, "split_seed": settings.split_seed}}
    if pseudonyms is not None:
        report["pseudonym_key_id"] = pseudonyms  # which key made the patient pseudonyms; never the key
    extra = {"README.md": folder_card(report)}
    for path in (skipped, digests):
        if path.is_file():
            extra[path.name] = path.read_text()
    save_prepared(dsdict, output, work_dir, report, failures, extra)
    return report, False


def prepare_phantom(args: PrepareArguments, settings: DataConfig) -> tuple[dict, bool]:
    """The built-in phantom (seed 0, the demo's) in the layout of a prepared folder: train / validation / test by
    patient, with its report and card."""
    output = Path(args.output_dir)
    options = {k: getattr(settings, k) for k in ("num_phantom_images", "phantom_images_per_patient",
                                                  "phantom_finding_prob", "resolution", "validation_fraction",
                                                  "test_fraction", "split_seed")}
    key = stable_hash({"phantom": options})
    previous = _previous(output, key, args.overwrite_output_dir)
    if previous is not None:
        return previous, True
    raw = phantom_dataset(settings.num_phantom_images, settings.resolution, finding_prob=settings.phantom_finding_prob,
                          images_per_patient=settings.phantom_images_per_patient)
    names = patient_splits(raw, settings)
    dsdict = datasets.DatasetDict({s: raw.select([i for i, n in enumerate(names) if n == s])
                                   for s in SPLITS if s in names})
    check_patient_disjoint(dsdict)
    report = {"key": key, "source": "the built-in procedural chest phantom", "split_method": "by a hash of the "
              "patient IDs", "splits": describe(dsdict), "failed_images": 0, "skipped_files": 0,
              "settings": {"resolution": settings.resolution, "center_crop": settings.center_crop,
                           "validation_fraction": settings.validation_fraction, "split_seed": settings.split_seed},
              "phantom": options}
    work_dir = output.with_name(output.name + ".partial")
    save_prepared(dsdict, output, work_dir, report, [], {"README.md": folder_card(report)})
    return report, False


def pseudonym_line(report: dict) -> str:
    if "pseudonym_key_id" not in report:
        return ""
    return (f"\n- Patient pseudonyms are HMAC-SHA256 of the Patient ID under a local key (key id "
            f"{report['pseudonym_key_id']}; the key itself is kept on the preparing machine, never here).")


def _preprocessing(report: dict) -> str:
    s = report["settings"]
    if "phantom" in report:
        return (f"Procedural phantoms drawn at {s['resolution']}x{s['resolution']}, "
                f"{report['phantom']['phantom_images_per_patient']} images per patient on average: no real patient.")
    return ("Each image was decoded once (DICOM through its modality LUT, VOI and MONOCHROME1 inversion), converted "
            f"to 8-bit\n  grayscale, {'centre-cropped' if s['center_crop'] else 'padded with black'} to a square and "
            f"resized with Lanczos\n  to {s['resolution']}x{s['resolution']}; nothing was flipped. DICOM headers keep "
            f"only a patient pseudonym, age,\n  sex and view.{pseudonym_line(report)}")


def folder_card(report: dict) -> str:
    """The prepared folder's README.md for a source other than NIH: counts, splits, preprocessing (no identifiers)."""
    s = report["settings"]
    data = DatasetCardData(pretty_name=f"Chest radiographs prepared at {s['resolution']}x{s['resolution']}",
                           task_categories=["unconditional-image-generation"],
                           tags=["medical-imaging", "chest-x-ray", "lunggen-diffusers"])
    body = f"""
# Chest radiographs prepared at {s['resolution']}x{s['resolution']}

Prepared with `python -m lunggen_diffusers.prepare --train_data_dir ...` (LungGen-Diffusers) from {report['source']}.

{counts_table(report['splits'])}

- Splits are patient-wise and no patient is in two of them (checked when prepared), {report['split_method']};
  validation holds {s['validation_fraction']:.0%} of the train/validation patients (seed {s['split_seed']}).
- {report['failed_images']:,} image(s) could not be decoded (`failed_images.csv`); {report['skipped_files']:,} file(s)
  were no usable radiograph (`skipped_files.csv`: non-image DICOM objects, multi-frame, colour, unreadable).
- {_preprocessing(report)}

Research use only, under the source collection's own terms. The patient pseudonyms allow patient-wise splits;
keep any copy of this dataset private.
"""
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args, settings = parse_command_line(argv)
    run(lambda: _prepare(args, settings))


def _prepare(args: PrepareArguments, settings: DataConfig) -> None:
    if args.push_to_hub and not args.hub_dataset_id:
        raise UsageError("--push_to_hub needs --hub_dataset_id (e.g. my-org/nih-chestxray14-256)")
    report, reused = make_prepared_dataset(args, settings)
    print(("Reused" if reused else "Prepared") + f" {args.output_dir} ({report['split_method']}):")
    print(counts_table(report["splits"]))
    print(f"missing: {report.get('missing_images', 0)}, unreadable: {report['failed_images']} (see failed_images.csv)"
          + (f", skipped: {report['skipped_files']} (see skipped_files.csv)" if "skipped_files" in report else ""))
    if args.push_to_hub:
        push_prepared(args.output_dir, args.hub_dataset_id, args.hub_token)
        print(f"Pushed to the Hub as the private dataset {args.hub_dataset_id}")


if __name__ == "__main__":
    main()
