"""Image sources for evaluation: an image folder (a `pipeline.py` folder: the images its manifest lists) or a
`datasets.save_to_disk` folder (optionally `path:split`).

Every image becomes 8-bit grayscale (mode L) at one square evaluation size, the same way for real, generated
and training images, so every metric compares like with like. Images are read lazily in batches: a 100,000-image
training set never has to sit in memory at full size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from ..cli import UsageError
from ..data.decode import open_image
from ..data.transforms import preprocess_image
from ..generation.output_folder import MANIFEST, read_manifest
from ..utils import IMAGE_EXTENSIONS, list_images, split_spec, stable_hash

IMAGE_COLUMNS = ("image", "pixel_values")


def to_eval_image(image, size: int) -> np.ndarray:
    """A PIL image, a datasets Image cell ({"bytes", "path"}) or an array (HxW, or with a singleton channel) ->
    uint8 (size, size), through the training preprocessing (any mode -> L, centre-crop, antialiased resize)."""
    if isinstance(image, dict):
        image = open_image(image)
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
            array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
        if array.dtype.kind == "i" and array.size and array.min() >= 0 and array.max() <= 255:
            array = array.astype(np.uint8)  # datasets' numpy format widens nested-list uint8 pixels to int64
        if array.shape == (size, size) and array.dtype == np.uint8:
            return array
        image = Image.fromarray(array)
    return preprocess_image(image, size, center_crop=True)


@dataclass
class ImageSource:
    """A readable set of images; `fingerprint` changes whenever the images may have changed (feature cache key)."""

    spec: str
    fingerprint: str
    patient_ids: list[str] | None
    _folder_files: list[Path] | None = None
    _dataset: object = None
    _column: str | None = None

    def __len__(self) -> int:
        return len(self._folder_files) if self._folder_files is not None else len(self._dataset)

    def names(self) -> list[str]:
        """What a report calls each image: its file name in a folder, its row in a dataset."""
        if self._folder_files is None:
            return [f"row-{i}" for i in range(len(self))]
        return [path.name for path in self._folder_files]

    def read(self, indices, size: int) -> np.ndarray:
        """The images at `indices` as uint8 (len(indices), size, size)."""
        indices = [int(i) for i in indices]
        if not indices:
            return np.zeros((0, size, size), np.uint8)
        if self._folder_files is None:
            return np.stack([to_eval_image(image, size) for image in self._dataset[indices][self._column]])
        out = []
        for i in indices:
            with open_image(self._folder_files[i]) as image:  # a DICOM file through its grey pipeline
                out.append(to_eval_image(image, size))
        return np.stack(out)

    def batches(self, size: int, batch_size: int, rows: range | None = None) -> Iterator[np.ndarray]:
        """`rows` (default: all) in consecutive batches of `batch_size` images."""
        rows = range(len(self)) if rows is None else rows
        for start in range(rows.start, rows.stop, batch_size):
            yield self.read(range(start, min(start + batch_size, rows.stop)), size)


def _folder_source(spec: str, root: Path) -> ImageSource:
    files = list_images(root)
    if (root / MANIFEST).is_file():  # a pipeline.py folder: its images, not grid.png beside them
        listed = {row["file"] for row in read_manifest(str(root))}
        files = [p for p in files if p.relative_to(root).as_posix() in listed]
    if not files:
        raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    listing = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    fingerprint = stable_hash({"folder": str(root.resolve()), "files": listing})
    return ImageSource(spec, fingerprint, None, _folder_files=files)


def _dataset_source(spec: str, root: Path, split: str | None) -> ImageSource:
    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        if split is None and len(loaded) == 1:
            split = next(iter(loaded))
        if split not in loaded:
            raise UsageError(f"{spec!r}: choose a split with PATH:SPLIT, one of {', '.join(loaded)}")
        dataset = loaded[split]
    elif split is not None:
        raise UsageError(f"{spec!r}: {root} holds a single Dataset, not a DatasetDict; drop ':{split}'")
    else:
        dataset = loaded
    column = next((c for c in IMAGE_COLUMNS if c in dataset.column_names), None)
    if column is None:
        raise UsageError(f"{spec!r} has no image column; expected one of {IMAGE_COLUMNS}, got {dataset.column_names}")
    if column == "pixel_values":
        dataset = dataset.with_format("numpy", columns=[column])
    patients = None
    if "patient_id" in dataset.column_names:
        patients = [str(p) for p in dataset.with_format(None)["patient_id"]]
    # The arrow files' sizes and times as well as datasets' own fingerprint: a rebuilt dataset can keep the latter.
    arrow = [(f["filename"], os.path.getsize(f["filename"]), os.stat(f["filename"]).st_mtime_ns)
             for f in dataset.cache_files]
    fingerprint = stable_hash({"dataset": str(root.resolve()), "split": split, "fingerprint": dataset._fingerprint,
                               "files": arrow})
    return ImageSource(spec, fingerprint, patients, _dataset=dataset, _column=column)


def load_source(spec: str) -> ImageSource:
    """Open `spec`: an image folder (any of IMAGE_EXTENSIONS, recursive) or a saved dataset folder with an optional
    `:split`."""
    path, split = split_spec(spec)
    if not path.is_dir():
        raise UsageError(f"{spec!r} is not a folder; expected an image folder or a saved dataset [PATH:SPLIT]")
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _dataset_source(spec, path, split)
    if split is not None:
        raise UsageError(f"{spec!r}: ':{split}' only applies to a saved dataset, and {path} is an image folder")
    return _folder_source(spec, path)


def cache_root(cache_dir: str | None) -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lunggen_diffusers" / "features"
    return Path(cache_dir) if cache_dir else default
