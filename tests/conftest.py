"""Shared test helpers: a tiny, fast training configuration (32 px, two UNet levels, a handful of phantoms)."""

import os
import tempfile

import pytest
import torch

from lunggen_diffusers.config import from_dict

from fixtures import TINY, write_mimic

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The DICOM pseudonym key lives in a folder of this run, never the user's ~/.config, and is fixed: splits are made
# from the pseudonyms, and a key drawn at random would split the tests' small DICOM folders differently each run.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="lunggen-tests-config-")
os.makedirs(os.path.join(os.environ["XDG_CONFIG_HOME"], "lunggen_diffusers"))
with open(os.path.join(os.environ["XDG_CONFIG_HOME"], "lunggen_diffusers", "pseudonym.key"), "wb") as _key:
    _key.write(bytes(range(100, 132)))

@pytest.fixture
def tiny_config(tmp_path):
    """`tiny_config(**overrides)` -> a validated Config writing under tmp_path/out."""

    def make(**overrides):
        return from_dict({**TINY, "output_dir": str(tmp_path / "out"), **overrides})

    return make


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny models gain nothing from threads (on a busy CPU OpenMP's threads wait on
    each other), and launched test processes run one thread each (OMP_NUM_THREADS=1), so a reference computed here
    runs the same kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mimic(tmp_path):
    """A MIMIC-CXR-JPG folder in PhysioNet's layout (`fixtures.write_mimic`)."""
    return write_mimic(tmp_path / "mimic-cxr-jpg")
