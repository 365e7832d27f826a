"""`pip install .` gives the package, its data files and working console commands."""

import importlib
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.mark.parametrize("name, target", sorted(PYPROJECT["project"]["scripts"].items()))
def test_every_console_command_points_at_a_main(name, target):
    module, _, function = target.partition(":")
    assert callable(getattr(importlib.import_module(module), function)), name


def test_package_data_covers_every_non_python_file_the_package_reads():
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["lunggen_diffusers"]
    package = REPO / "lunggen_diffusers"
    data = [p for p in package.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")]
    covered = {p for pattern in patterns for p in package.glob(pattern)}
    assert set(data) <= covered, sorted(map(str, set(data) - covered))


def test_requirements_pin_the_cpu_torch_and_install_the_project():
    lines = (REPO / "requirements.txt").read_text().splitlines()
    assert "torch==2.13.0" in lines and "-e ." in lines
    assert not any(line.startswith("torchvision") for line in lines)


@pytest.mark.parametrize("name, target, argv", [
    (name, target, ["card", "--help"] if name == "lunggen-hub" else ["create", "--help"] if name ==
     "lunggen-reader-study" else ["--help"])
    for name, target in sorted(PYPROJECT["project"]["scripts"].items())
])
def test_every_console_command_prints_its_help(name, target, argv, capsys):
    # argparse expands "%" in help strings: a bare "95%" crashes --help with a TypeError instead of printing it.
    module, _, function = target.partition(":")
    with pytest.raises(SystemExit) as exit_info:
        getattr(importlib.import_module(module), function)(argv)
    assert exit_info.value.code == 0, name
    assert "usage:" in capsys.readouterr().out
