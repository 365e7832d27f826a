"""Every command fails alike: an unknown flag is argparse's error, a bad value or a missing path is one line naming
the option; exit status 2 and never a traceback. And `lunggen-train` trains."""

import importlib
import json
from pathlib import Path

import pytest
import tomllib

from lunggen_diffusers.cli import UsageError
from lunggen_diffusers.generation.sampling import check_scheduler

from fixtures import TINY

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _main(script):
    module, _, function = SCRIPTS[script].partition(":")
    return getattr(importlib.import_module(module), function)


def _exit_code(main, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return exit_.value.code


def test_every_command_has_a_console_script_and_a_module():
    assert sorted(SCRIPTS) == ["lunggen-autoencoder-report", "lunggen-edit", "lunggen-evaluate", "lunggen-generate",
                               "lunggen-hub", "lunggen-prepare", "lunggen-reader-study", "lunggen-train",
                               "lunggen-utility"]
    assert importlib.import_module("lunggen_diffusers.train").main is _main("lunggen-train")


# Each command's required arguments, so that the unknown flag is the only thing wrong.
REQUIRED = {"lunggen-autoencoder-report": ["--vae", "a", "--output_dir", "b"],
            "lunggen-evaluate": ["--real", "a", "--fake", "b"], "lunggen-generate": ["--model", "a", "--output_dir", "b"],
            "lunggen-hub": ["card", "a"], "lunggen-prepare": ["--nih_dir", "a", "--output_dir", "b"],
            "lunggen-train": [], "lunggen-utility": ["--real", "a", "--synthetic", "b", "--output_dir", "c"],
            "lunggen-reader-study": ["analyze", "a"], "lunggen-edit": ["--model", "a", "--input", "b", "--output_dir", "c"]}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_an_unknown_flag_is_argparses_error(script, capsys):
    assert _exit_code(_main(script), [*REQUIRED[script], "--no_such_flag", "1"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --no_such_flag 1" in err and "Traceback" not in err
    assert err.splitlines()[0].startswith("usage:")


@pytest.mark.parametrize("script, argv, message", [
    ("lunggen-train", ["--resolution", "60"], "--resolution 60 cannot be divided down"),
    ("lunggen-train", ["--preset", "huge"], "--preset 'huge' is not one of: demo, demo-latent, demo-text, lunggen-1024-latent, lunggen-256, lunggen-512-latent"),
    ("lunggen-prepare", ["--nih_dir", "/no/such/folder", "--output_dir", "{tmp}/out"], "--nih_dir /no/such/folder"),
    ("lunggen-generate", ["--model", "{tmp}", "--output_dir", "{tmp}/out", "--cpu_threads", "0"], "--cpu_threads"),
    ("lunggen-generate", ["--model", "{tmp}/absent", "--output_dir", "{tmp}/out"], "is neither a local folder nor"),
    ("lunggen-evaluate", ["--real", "/no/such/folder", "--fake", "{tmp}"], "not a folder"),
    ("lunggen-utility", ["--real", "/no/such/folder", "--synthetic", "{tmp}", "--output_dir", "{tmp}/u"],
     "/no/such/folder"),
    ("lunggen-hub", ["card", "{tmp}/absent"], "absent"),
    ("lunggen-hub", ["push", "{tmp}/absent", "--repo_id", "org/name"], "no model_index.json"),
    ("lunggen-hub", ["publish", "{tmp}"], "choose a command: push, card or push-dataset (got 'publish')"),
    ("lunggen-reader-study", ["serve", "{tmp}/absent"], "holds no reader study"),
    ("lunggen-edit", ["--model", "{tmp}/absent", "--input", "{tmp}", "--output_dir", "{tmp}/out", "--add", "Effusion"],
     "is neither a local folder nor"),
    ("lunggen-reader-study", ["read", "{tmp}"], "choose a command: create, serve, analyze (got 'read')"),
])
def test_a_bad_value_or_path_is_one_line_naming_it(script, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _exit_code(_main(script), [a.format(tmp=tmp_path) for a in argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("usage")]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, module, function, argv", [
    ("lunggen-generate", "lunggen_diffusers.generation.cli", "load_pipeline", ["--model", "m", "--output_dir", "{tmp}"]),
    ("lunggen-train", "lunggen_diffusers.training.diffusion", "train", ["--output_dir", "{tmp}/run"]),
])
def test_an_unexpected_value_error_keeps_its_traceback(script, module, function, argv, tmp_path, monkeypatch):
    """Only a deliberate refusal (UsageError) becomes one line: a ValueError from a bug (numpy broadcasting, a
    diffusers config) reaches the user as itself, with its traceback."""
    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together with shapes (2,3) (4,)")

    monkeypatch.setattr(importlib.import_module(module), function, broken)
    with pytest.raises(ValueError, match="could not be broadcast") as raised:
        _main(script)([a.format(tmp=tmp_path) for a in argv])
    assert not isinstance(raised.value, UsageError)


def test_a_refusal_is_a_usage_error_and_a_value_error():
    with pytest.raises(UsageError, match="unknown scheduler"):
        check_scheduler("fast")
    assert issubclass(UsageError, ValueError)  # library callers that catch ValueError still do


def test_lunggen_train_trains_and_exits_0(tmp_path):
    argv = [a for k, v in TINY.items() if v is not None for a in
            (f"--{k}", *(map(str, v) if isinstance(v, list) else [str(v)]))]
    assert _main("lunggen-train")([*argv, "--output_dir", str(tmp_path / "run"), "--max_train_steps", "2"]) is None
    assert json.loads((tmp_path / "run" / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
