"""The shared helpers, and the rule they exist for: every module reads the same image files."""

import numpy as np
import pytest
from PIL import Image

from lunggen_diffusers.evaluation.images import load_source
from lunggen_diffusers.utils import (
    IMAGE_EXTENSIONS,
    atomic_path,
    image_grid,
    list_images,
    markdown_table,
    split_spec,
)


@pytest.mark.parametrize("suffix", IMAGE_EXTENSIONS)
def test_a_folder_training_accepts_also_evaluates(tmp_path, suffix):
    # Training reads every IMAGE_EXTENSIONS file; evaluation once read only PNG/JPEG, so a .tif folder failed as --real.
    for i in range(2):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(tmp_path / f"x{i}{suffix.upper()}")
    source = load_source(str(tmp_path))
    assert len(source) == 2
    assert source.read([1], 8)[0].mean() == pytest.approx(40, abs=1)  # lossy formats (JPEG, WebP) may round


def test_atomic_path_replaces_on_success_and_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]
    with atomic_path(target) as temporary:
        assert temporary.suffix == ".txt" and temporary != target
        temporary.write_text("new")
    assert target.read_text() == "new" and sorted(tmp_path.iterdir()) == [target]


def test_list_images_is_recursive_sorted_and_skips_other_files(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.png", "1.JPG", "notes.txt", "3.tiff"):
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["1.JPG", "3.tiff", "b/2.png"]


def test_split_spec_prefers_an_existing_path(tmp_path):
    assert split_spec(f"{tmp_path}/data:train") == (tmp_path / "data", "train")
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert split_spec(str(odd)) == (odd, None)


def test_image_grid_is_gray_row_major_and_padded():
    tiles = [Image.new("L", (4, 3), 50 * (i + 1)) for i in range(3)]
    grid = image_grid(tiles)
    assert grid.mode == "L" and grid.size == (8, 6)
    pixels = np.asarray(grid)
    assert [pixels[0, 0], pixels[0, 4], pixels[3, 0], pixels[3, 4]] == [50, 100, 150, 0]


def test_markdown_table_formats_and_escapes():
    assert markdown_table(["a", "b"], [[0.123456, 12345], ["x|y", None]]).splitlines() == [
        "| a | b |", "|---|---|", "| 0.1235 | 12,345 |", "| x\\|y | none |"]
