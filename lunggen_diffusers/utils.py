"""Small helpers every module shares: atomic writes, image listing, grids, Markdown tables, fingerprints, devices.

One copy each, so a rule (which image files count, how a file is replaced safely) holds everywhere at once.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .cli import UsageError

# Every image suffix PIL reads that chest X-ray collections ship in (NIH PNG, CheXpert/MIMIC JPEG, DICOM exports
# to TIFF). Training and evaluation both read this list, so a folder that trains also evaluates.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DICOM_SUFFIXES = (".dcm", ".dicom")
SYNTHETIC_NOTICE = "research use only"
# The PNG chunk of an image edited from a real radiograph (`lunggen-edit`): patient data, never published as synthetic.
DERIVED_FROM_REAL = "derived_from_real"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, on error it is removed.

    So a reader (or a resumed run) never sees half a file. The name keeps `path`'s suffix (np.save and PIL pick the
    format from it) and carries the process id (processes sharing a folder never write the same temporary).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Indented, key-sorted JSON (diffable between runs), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def has_dicom_preamble(path: str | Path) -> bool:
    """The DICOM file format's mark: 128 bytes of preamble, then b"DICM"."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom(path: str | Path) -> bool:
    """A `.dcm` / `.dicom` file, or a file without a suffix that carries the DICM mark (PACS exports often do)."""
    path = Path(path)
    return path.suffix.lower() in DICOM_SUFFIXES or (not path.suffix and path.is_file() and has_dicom_preamble(path))


def list_images(root: str | Path) -> list[Path]:
    """Every image file under `root` (recursive, sorted): any case of IMAGE_EXTENSIONS, and DICOM files (`is_dicom`;
    only suffix-less files are opened to look for the mark)."""
    return sorted(p for p in Path(root).rglob("*")
                  if p.is_file() and (p.suffix.lower() in IMAGE_EXTENSIONS or is_dicom(p)))


def find_table(root: str | Path, name: str) -> Path | None:
    """`root/name`, or its gzipped copy `root/name.gz` (collections ship their CSVs either way); None if neither."""
    return next((p for p in (Path(root) / name, Path(root) / f"{name}.gz") if p.is_file()), None)


def _open_text(path: Path):
    return (gzip.open if path.suffix == ".gz" else open)(path, "rt", newline="", encoding="utf-8")


def read_table(path: str | Path) -> list[dict]:
    """The rows of a CSV file, gzipped or not."""
    with _open_text(Path(path)) as f:
        return list(csv.DictReader(f))


def table_columns(path: str | Path) -> list[str]:
    """The header of a CSV file, gzipped or not, without reading the rest."""
    with _open_text(Path(path)) as f:
        return next(csv.reader(f), [])


def split_spec(spec: str) -> tuple[Path, str | None]:
    """`PATH[:SPLIT]` -> (PATH, SPLIT or None). A path that exists as given wins (a folder may contain ':')."""
    if not Path(spec).exists() and ":" in spec:
        head, split = spec.rsplit(":", 1)
        return Path(head), split
    return Path(spec), None


def files_fingerprint(paths: Iterable[str | Path], salt: str = "") -> str:
    """Digest of files' (path, size, mtime) and `salt`: a cache key that changes when any file does."""
    h = hashlib.sha256(salt.encode())
    for path in paths:
        stat = os.stat(path)
        h.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def stable_hash(obj: Any) -> str:
    """Short SHA-256 of a JSON-able object: cache keys and source fingerprints."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def secret_digests(values: Iterable[str]) -> dict:
    """Salted SHA-256 digests of strings that must never be published, and their lengths: enough to find them in a
    text (`find_secret`) without keeping them anywhere."""
    salt = os.urandom(16).hex()
    values = {v for v in values if v}
    return {"salt": salt, "lengths": sorted({len(v) for v in values}),
            "digests": sorted(hashlib.sha256((salt + v).encode()).hexdigest() for v in values)}


def find_secret(text: str, digests: dict) -> str | None:
    """The first substring of `text` that is one of the digested strings (case-insensitively; the digests hold
    upper-cased strings), or None."""
    salt, wanted, upper = digests["salt"], set(digests["digests"]), text.upper()
    for length in digests["lengths"]:
        for start in range(len(upper) - length + 1):
            piece = upper[start:start + length]
            if hashlib.sha256((salt + piece).encode()).hexdigest() in wanted:
                return piece
    return None


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """An 8-bit grayscale grid, row by row, `cols` wide (default: as square as it gets); the last row padded black."""
    if not images:
        raise UsageError("image_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    grid = Image.new("L", (cols * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image.convert("L"), ((i % cols) * width, (i // cols) * height))
    return grid


SAMPLE_GRID = "Grid of synthetic chest X-rays generated by a diffusion model; not real patients; not for diagnosis."


def synthetic_png_info(description: str, synthetic: str = SYNTHETIC_NOTICE, **fields: Any) -> PngInfo:
    """PNG text chunks that mark an image as synthetic (generated samples, grids, phantoms) and say how it was
    made: one set of chunk names for every image the project writes."""
    info = PngInfo()
    info.add_text("Software", "LungGen-Diffusers")
    info.add_text("Description", description)
    info.add_text("synthetic", synthetic)
    for key, value in fields.items():
        info.add_text(key, str(value))
    return info


def derived_from_real(path: str | Path) -> bool:
    """Whether an image file carries the mark of an edit of a real patient's radiograph."""
    with Image.open(path) as image:
        return DERIVED_FROM_REAL in getattr(image, "text", {})


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "none"}[value]
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats to 4 significant digits, integers with thousands separators."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pick_device(device: str | None = None):
    """`device` if given, else CUDA, then Apple's MPS, then the CPU."""
    import torch  # here, so the file and table helpers stay light to import

    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
