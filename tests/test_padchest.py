"""PadChest: projections, labels into the vocabulary, 16-bit PNGs by their real range; counts from the real metadata
(skipped when ../shared is absent) computed here independently, with 16-bit stand-ins named after real rows."""

import ast
import csv
import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lunggen_diffusers.config import from_dict
from lunggen_diffusers.data import registry
from lunggen_diffusers.data.decode import decode_images, stored_pixels
from lunggen_diffusers.data.padchest import findings, padchest_dataset
from lunggen_diffusers.vocabulary import NO_FINDING

CSV = next(iter(sorted((Path(__file__).resolve().parents[2] / "shared" / "data" / "padchest").glob("*.csv.gz"))),
           Path("absent"))
needs_real = pytest.mark.skipif(not CSV.is_file(), reason="real PadChest metadata not found in ../shared")
VIEWS = {"PA": "PA", "AP": "AP", "AP_horizontal": "AP", "L": "LL"}


def _rows():
    with gzip.open(CSV, "rt", newline="") as f:
        return list(csv.DictReader(f))


def _parsed(cell):
    try:
        names = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        return None
    return {str(n).strip() for n in names} if isinstance(names, list) else None


@needs_real
def test_labels_and_views_count_as_the_csv_says():
    rows = _rows()
    parsed = [_parsed(r["Labels"]) for r in rows]
    assert len(rows) == 160861 and sum(p is None for p in parsed) == 103
    labels = [findings(r["Labels"]) for r in rows]
    got = Counter(n for names in labels if names for n in names)
    for theirs, ours in (("cardiomegaly", "Cardiomegaly"), ("pleural effusion", "Effusion"), ("nodule", "Nodule"),
                         ("pneumonia", "Pneumonia"), ("consolidation", "Consolidation"), ("COPD signs", "COPD signs")):
        assert got[ours] == sum(p is not None and theirs in p for p in parsed), theirs
    assert got[NO_FINDING] == sum(p is not None and not (p - {"normal", ""}) for p in parsed)
    views = Counter(VIEWS.get(r["Projection"]) for r, p in zip(rows, parsed, strict=True) if p is not None)
    assert views["PA"] == 91728 - sum(r["Projection"] == "PA" and p is None for r, p in zip(rows, parsed, strict=True))


def _padchest_folder(root, rows):
    """`rows` of the real CSV as the folder's labels file, and a 16-bit stand-in for each (12 bits used)."""
    root.mkdir()
    with gzip.open(root / CSV.name, "wt", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for i, row in enumerate(rows):
        path = root / row["ImageDir"] / row["ImageID"]
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.linspace(1000, 3000 + 10 * i, 48 * 48).reshape(48, 48).astype(np.uint16)).save(path)
    return root


@needs_real
def test_a_padchest_folder_reads_its_16_bit_pngs_by_their_real_range(tmp_path):
    rows = _rows()[:40]
    root = _padchest_folder(tmp_path / "padchest", rows)
    ds, left_out = padchest_dataset(root)
    kept = [r for r in rows if r["Projection"] in VIEWS and _parsed(r["Labels"]) is not None]
    assert len(ds) == len(kept) and len(left_out) == len(rows) - len(kept)
    assert ds["view_position"] == [VIEWS[r["Projection"]] for r in kept]
    assert ds["patient_id"] == [r["PatientID"] for r in kept]
    assert ds["finding_labels"] == [findings(r["Labels"]) for r in kept]
    prepared, failures = decode_images(ds, 32)
    pixels = stored_pixels(prepared.with_format("arrow", columns=["image"])[:]["image"])
    # 1000..3000 spread over the 8 bits (a plain convert("L") would clip all of it to white); the antialiased resize
    # softens the extremes by a level or two.
    assert failures == [] and pixels.min() <= 2 and pixels.max() >= 253
    settings = from_dict({"train_data_dir": str(root), "cache_dir": str(tmp_path / "c")}).data
    assert registry.folder_source(settings)[1] == "the PadChest dataset"


@needs_real
def test_a_padchest_folder_prepares_patient_wise_for_a_conditional_model(tmp_path):
    import datasets

    from lunggen_diffusers.data import prepare
    from lunggen_diffusers.data.build import build_dataset
    from lunggen_diffusers.data.conditioning import label_config
    from lunggen_diffusers.vocabulary import ALIASES

    from fixtures import TINY

    rows = [r for r in _rows()[:200] if r["Projection"] in VIEWS and _parsed(r["Labels"]) is not None][:40]
    root = _padchest_folder(tmp_path / "padchest", rows)
    prepare.main(["--train_data_dir", str(root), "--output_dir", str(tmp_path / "prepared"), "--resolution", "32",
                  "--cache_dir", str(tmp_path / "c"), "--validation_fraction", "0.2"])
    splits = datasets.load_from_disk(str(tmp_path / "prepared"))
    patients = [set(s["patient_id"]) for s in splits.values()]
    assert sum(len(s) for s in splits.values()) == len(rows)
    assert all(not (a & b) for i, a in enumerate(patients) for b in patients[i + 1:])
    dataset, _ = build_dataset(from_dict({**TINY, "dataset_name": str(tmp_path / "prepared"),
                                          "condition_on": ["findings"]}))
    findings = label_config(dataset, ["findings"])["findings"]
    # PadChest's names with a canonical one in the vocabulary's spelling ("pulmonary fibrosis" as Fibrosis).
    assert findings and not set(findings) & set(ALIASES["padchest"])
