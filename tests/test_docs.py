"""Every command and code block in the README and docs/ stays true. A shell command's flags are parsed by the
parser of the command it names (launcher flags by Accelerate's own), without running it: the data it points at
need not exist. A page's Python blocks run in order, in one namespace, in a folder where `lunggen-output` is a
tiny model the project trained (conditioned when the page conditions). `...` in a command stands for the reader's
own flags."""

import ast
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import tomllib
from accelerate.commands.launch import launch_command_parser

from lunggen_diffusers.cli import parse_args
from lunggen_diffusers.config import parse_args as parse_config
from lunggen_diffusers.data import prepare
from lunggen_diffusers.evaluation.run import EvaluationArguments
from lunggen_diffusers.generation.cli import SamplingArguments
from lunggen_diffusers.generation.edit import EditArguments
from lunggen_diffusers.hub import cli as hub_cli
from lunggen_diffusers.reader_study import cli as reader_study_cli
from lunggen_diffusers.training.autoencoder_report import AutoencoderReportArguments
from lunggen_diffusers.utility.run import UtilityArguments

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

# Each command's own parsing, keyed by the module its `main` lives in; a command the docs name that is missing here
# fails the test, so a new command is taught to it rather than skipped.
PARSERS = {
    "lunggen_diffusers.training.cli": parse_config,
    "lunggen_diffusers.generation.cli": lambda argv: parse_args(SamplingArguments, argv),
    "lunggen_diffusers.generation.edit": lambda argv: parse_args(EditArguments, argv),
    "lunggen_diffusers.evaluation.cli": lambda argv: parse_args(EvaluationArguments, argv),
    "lunggen_diffusers.utility.cli": lambda argv: parse_args(UtilityArguments, argv),
    "lunggen_diffusers.data.prepare": prepare.parse_command_line,
    "lunggen_diffusers.hub.cli": hub_cli.parse_command_line,
    "lunggen_diffusers.reader_study.cli": reader_study_cli.parse_command_line,
    "lunggen_diffusers.training.autoencoder_report": lambda argv: parse_args(AutoencoderReportArguments, argv),
}
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(page.read_text()) if lang == language]


def _commands(page: Path) -> list[list[str]]:
    """Each shell command of the page's bash blocks as tokens (continuations joined, comments and `...` dropped,
    `a && b` split)."""
    commands = []
    for body in _blocks(page, "bash"):
        for line in body.replace("\\\n", " ").splitlines():
            tokens = [t for t in shlex.split(line, comments=True) if t != "..."]
            while tokens:
                end = tokens.index("&&") if "&&" in tokens else len(tokens)
                commands.append(tokens[:end])
                tokens = tokens[end + 1:]
    return commands


def _main_of_door(path: Path, package: str) -> str:
    """The module a door file (`from .training.cli import main`) takes its `main` from."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and any(a.name == "main" for a in node.names):
            return importlib.util.resolve_name("." * node.level + (node.module or ""), package)
    raise AssertionError(f"{path} imports no main")


def _module_of(tokens: list[str]) -> tuple[str, list[str]]:
    """(the module holding the command's main, its arguments) for `python X.py`, `python -m X`, a console script
    or `accelerate launch [launcher flags] X.py|-m X`."""
    if tokens[0] == "accelerate" and tokens[1] == "launch":
        args = launch_command_parser().parse_args(tokens[2:])  # the launcher's own flags, checked by Accelerate
        target = ["-m", args.training_script] if args.module else [args.training_script]
        return _module_of(["python", *target, *args.training_script_args])
    if tokens[0] in SCRIPTS:
        module = SCRIPTS[tokens[0]].split(":")[0]
        return importlib.import_module(module).main.__module__, tokens[1:]
    assert tokens[0] == "python", f"not a command the docs test knows: {shlex.join(tokens)}"
    if tokens[1] == "-m":
        spec = importlib.util.find_spec(tokens[2])
        path = Path(spec.origin)
        if spec.submodule_search_locations:  # a package: `python -m` runs its __main__
            path, package = path.with_name("__main__.py"), tokens[2]
        else:
            package = tokens[2].rpartition(".")[0]
        return _main_of_door(path, package), tokens[3:]
    return _main_of_door(REPO / tokens[1], ""), tokens[2:]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_command_parses(page):
    for tokens in _commands(page):
        if tokens[:2] == ["pip", "install"]:  # the setup: the files it installs from exist
            assert all((REPO / tokens[i + 1]).is_file() for i, a in enumerate(tokens) if a == "-r"), tokens
            continue
        if tokens[0] == "ruff":  # the linter, as CI runs it
            assert tokens == ["ruff", "check", "."], tokens
            continue
        if tokens[:2] == ["accelerate", "config"] or tokens[:3] == ["python", "-m", "pytest"]:
            assert tokens[2:] == ["default"] or tokens[2] == "pytest", tokens
            continue
        module, argv = _module_of(tokens)
        assert module in PARSERS, f"{page.name}: {shlex.join(tokens)} runs {module}, which no parser here covers"
        try:
            PARSERS[module](argv)
        except SystemExit as exc:
            pytest.fail(f"{page.name}: `{shlex.join(tokens)}` does not parse (exit {exc.code})")


def test_the_readme_shows_every_job_and_stays_short():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    first = _commands(REPO / "README.md")[:4]
    assert first[0][:3] == ["pip", "install", "-r"] and first[1] == ["accelerate", "config", "default"]
    assert first[2] == ["accelerate", "launch", "train.py"] and first[3] == ["python", "-m", "pytest"]
    for page in ("training", "generation", "conditioning", "evaluation", "utility", "publishing", "sources"):
        assert f"](docs/{page}.md)" in readme, f"the README links no docs/{page}.md"


def test_every_link_to_a_file_of_the_repo_resolves():
    for page in [*PAGES, REPO / "CHANGELOG.md", REPO / "benchmarks" / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Tiny models made by the project's own training: one unconditional, one conditioned on findings and the
    three demographics (what the docs' conditional blocks ask of `lunggen-output`), one on reports (prompts)."""
    from lunggen_diffusers.config import from_dict
    from lunggen_diffusers.training.diffusion import train

    from fixtures import TINY

    root = tmp_path_factory.mktemp("stand-ins")
    models = {}
    everything = {"condition_on": ["findings", "patient_sex", "patient_age", "view_position"]}
    text = {"condition_on": ["report"], "text_encoder_hidden_size": 32, "text_encoder_layers": 1,
            "tokenizer_vocab_size": 200}
    for name, extra in (("plain", {}), ("conditional", everything), ("text", text)):
        config = from_dict({**TINY, "max_train_steps": 1, "checkpointing_steps": 1, "output_dir": str(root / name), **extra})
        models[name] = train(config).output_dir
    return models


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p, "python")],
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_python_block_runs_on_a_tiny_stand_in(page, stand_ins, tmp_path, monkeypatch, one_thread):
    blocks = _blocks(page, "python")
    namespace: dict = {}
    monkeypatch.chdir(tmp_path)
    for body in blocks:
        model = stand_ins["text" if "prompt=" in body else
                          "conditional" if "findings=" in body or "edit(" in body else "plain"]
        link = tmp_path / "lunggen-output"
        if link.is_symlink():
            link.unlink()
        link.symlink_to(model)
        exec(compile(body, f"{page.name} block", "exec"), namespace)
        images = namespace.get("images")
        assert images and all(image.mode == "L" for image in images), f"{page.name}: a block made no images"


def test_every_module_path_and_dotted_name_the_docs_mention_exists():
    for page in PAGES:
        text = page.read_text()
        for path in re.findall(r"`((?:lunggen_diffusers|benchmarks|tests)/[\w/.-]*)`", text):
            assert (REPO / path).exists(), f"{page.name} names {path}, which does not exist"
        for dotted in re.findall(r"\blunggen_diffusers(?:\.\w+)+", text):
            parts, obj = dotted.split("."), None
            for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    continue
                for name in parts[i:]:
                    assert hasattr(obj, name), f"{page.name} names {dotted}: {name} is not in {obj.__name__}"
                    obj = getattr(obj, name)
                break
            assert obj is not None, f"{page.name} names {dotted}, which does not import"


def test_the_readmes_generation_commands_run_on_a_tiny_stand_in(stand_ins, tmp_path, monkeypatch, one_thread):
    """The README's sampling commands small enough to run here (at most 100 images) make what they say."""
    from lunggen_diffusers.generation import cli as generation_cli

    monkeypatch.chdir(tmp_path)
    ran = 0
    for tokens in _commands(REPO / "README.md"):
        if tokens[:2] != ["python", "pipeline.py"]:
            continue
        argv = tokens[2:]
        (args,) = parse_args(SamplingArguments, argv)
        if args.model != "lunggen-output" or args.num_images > 100:
            continue
        link = tmp_path / "lunggen-output"
        if link.is_symlink():
            link.unlink()
        conditioned = any(a in argv for a in ("--findings", "--labels_from", "--sex", "--age", "--view"))
        link.symlink_to(stand_ins["conditional" if conditioned else "plain"])
        steps = [] if "--num_inference_steps" in argv else ["--num_inference_steps", "2"]  # what runs, not how well
        generation_cli.main([*argv, *steps])
        assert len(list((tmp_path / args.output_dir).glob("*.png"))) == args.num_images + 1, argv  # + grid.png
        ran += 1
    assert ran == 2  # the plain and the conditional example


@pytest.mark.parametrize("name", ["demo", "lunggen-256"])
def test_the_presets_table_says_what_the_presets_set(name):
    """The figures of docs/configuration.md's table, read from its row and held against the preset and the UNet it
    builds: a preset changed without the page (the demo's steps were once left at 800) turns this red."""
    from lunggen_diffusers.training.model import build_unet

    row = next(line for line in (REPO / "docs" / "configuration.md").read_text().splitlines()
               if line.startswith(f"| `{name}`"))
    config = parse_config(["--preset", name])
    d, m, t = config.data, config.model, config.training
    assert f"{d.resolution} px" in row
    assert f"UNet ({', '.join(map(str, m.block_out_channels))})" in row
    params = sum(p.numel() for p in build_unet(config).parameters()) / 1e6
    assert f"{params:.1f} M params" in row, params
    if name == "demo":
        assert f"{d.num_phantom_images:,} images" in row
        assert f"{t.max_train_steps:,} steps, batch {t.train_batch_size}" in row
