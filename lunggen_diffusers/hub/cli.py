"""`python -m lunggen_diffusers.hub card|push OUTPUT_DIR [options]` and `push-dataset SYNTH_DIR [options]` (the
contract is in the package docstring)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from ..cli import fail, parse, run
from .dataset import push_dataset
from .export import write_model_card
from .privacy import CARD
from .push import push_to_hub


@dataclass
class PushArguments:
    repo_id: str = field(metadata={"aliases": ["--hub_model_id"], "help": "Hub repo, e.g. my-org/lunggen-256."})
    private: bool = field(default=True, metadata={"aliases": ["--hub_private_repo"],
                                                  "help": "Create the repo private (default); false: public."})
    token: str | None = field(default=None, metadata={"aliases": ["--hub_token"],
                                                      "help": "Else HF_TOKEN or the cached login."})
    commit_message: str = field(default="Upload LungGen DDPM pipeline, model card and manifest")


@dataclass
class SectionArguments:
    eval_dir: str | None = field(default=None, metadata={"help": "Evaluation folder holding metrics.json."})
    fidelity_dir: str | None = field(
        default=None, metadata={"help": "benchmarks/fidelity_benchmark.py output folder (its card_section.md)."})
    utility_dir: str | None = field(
        default=None, metadata={"help": "python -m lunggen_diffusers.utility output folder (its card_section.md)."})
    reader_study_dir: str | None = field(
        default=None, metadata={"help": "lunggen-reader-study analyze output folder (its card_section.md)."})


@dataclass
class DatasetPushArguments:
    repo_id: str = field(metadata={"help": "Hub dataset repo, e.g. my-org/lunggen-synthetic-10k."})
    eval_dir: str | None = field(default=None, metadata={
        "help": "The folder's evaluation (metrics.json with the memorization audit and --reid); default "
                "SYNTH_DIR/eval."})
    allow_flagged: bool = field(default=False, metadata={
        "help": "Publish although the audit or the re-identification check flags the images (the card says so)."})
    private: bool = field(default=True, metadata={"help": "Create the repo private (default); false: public."})
    token: str | None = field(default=None, metadata={"help": "Else HF_TOKEN or the cached login."})
    commit_message: str = field(default="Upload synthetic chest X-rays (LungGen)")


@dataclass
class CardArguments:
    repo_id: str | None = field(default=None, metadata={"help": "Hub id to show in the usage snippet."})


COMMANDS = {"push": (PushArguments, SectionArguments), "card": (CardArguments, SectionArguments),
            "push-dataset": (DatasetPushArguments,)}
USAGE = ("usage: python -m lunggen_diffusers.hub {push,card} OUTPUT_DIR [options] | push-dataset SYNTH_DIR [options] "
         "(--help for options)")


def parse_command_line(argv: list[str] | None = None) -> tuple:
    """(the command's arguments, the card sections, the output folder)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        *others, last = COMMANDS
        fail(f"choose a command: {', '.join(others)} or {last}" + (f" (got {argv[0]!r})" if argv else ""))
    parser = HfArgumentParser(COMMANDS[argv[0]], prog=f"python -m lunggen_diffusers.hub {argv[0]}")
    if argv[0] == "push-dataset":
        parser.add_argument("output_dir", help="A pipeline.py output folder of generated images.")
        args, extra = parse(parser, argv[1:])
        return args, None, extra.output_dir
    parser.add_argument("output_dir", help="The exported training output folder.")
    args, sections, extra = parse(parser, argv[1:])
    return args, sections, extra.output_dir


def main(argv: list[str] | None = None) -> None:
    args, sections, output_dir = parse_command_line(argv)
    run(lambda: _command(args, sections, output_dir))


def _command(args, sections: SectionArguments | None, output_dir: str) -> None:
    if isinstance(args, DatasetPushArguments):
        url = push_dataset(output_dir, args.repo_id, args.private, args.token, args.eval_dir, args.allow_flagged,
                           args.commit_message)
        print(f"pushed {output_dir} as a dataset to {url} ({'private' if args.private else 'public'})")
    elif isinstance(args, PushArguments):
        url = push_to_hub(output_dir, args.repo_id, args.private, args.token, args.commit_message, **vars(sections))
        print(f"pushed {output_dir} to {url} ({'private' if args.private else 'public'})")
    else:
        write_model_card(output_dir, repo_id=args.repo_id, **vars(sections))
        print(f"wrote {Path(output_dir) / CARD}")
