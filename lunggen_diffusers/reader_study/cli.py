"""`lunggen-reader-study create|serve|analyze` (also `python -m lunggen_diffusers.reader_study`):

    lunggen-reader-study create --real data/nih-256 --synthetic synth/ --num_images 200 --readers alice:12 bob:3
        [--repeat_fraction 0.1] [--practice 4] --output_dir study/
    lunggen-reader-study serve study/ [--host 127.0.0.1] [--port 8000]
    lunggen-reader-study analyze study/ [--output_dir study/analysis]
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..cli import fail, parse, run
from . import store

# `serve` answers within 2 s of its start (benchmarks/reader_study_benchmark.py): the command imports what `create`
# and `analyze` need (numpy, the image sources, hence torch and diffusers) only when they run.

PROG = "lunggen-reader-study"


@dataclass
class CreateArguments:
    real: str = field(metadata={"help": "Real images: 'phantom' (held-out phantoms of the demo), a prepared dataset "
                                        "(its test split unless PATH:SPLIT), an image folder or a DICOM folder."})
    synthetic: list[str] = field(metadata={"help": "One or more folders of generated images (pipeline.py "
                                                   "--output_dir), each an arm."})
    num_images: int = field(metadata={"help": "Images each reader judges: half real, half synthetic split evenly "
                                              "over the arms (a multiple of 2 x arms)."})
    readers: list[str] = field(metadata={"help": "NAME or NAME:YEARS (years of experience), one per reader."})
    output_dir: str = field(metadata={"help": "The study folder to write (study.sqlite, images/)."})
    repeat_fraction: float = field(default=0.0, metadata={
        "help": "Share of the images shown a second time later in the reading (agreement with oneself)."})
    practice: int = field(default=0, metadata={"help": "Practice images first, with feedback, not scored (even)."})
    size: int | None = field(default=None, metadata={"help": "Side in pixels of every image shown; default: the "
                                                             "generated images'."})
    seed: int = field(default=0, metadata={"help": "Seed of the draw and of every reader's order."})
    ask_findings: bool = field(default=True, metadata={"help": "Ask which findings are seen."})


@dataclass
class ServeArguments:
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind; anything but loopback is warned."})
    port: int = field(default=8000)


@dataclass
class AnalyzeArguments:
    output_dir: str | None = field(default=None, metadata={"help": "Default: STUDY/analysis."})
    experience_groups: list[float] = field(default_factory=lambda: [5.0, 10.0], metadata={
        "help": "Cut points in years of experience for the per-group figures."})
    num_resamples: int = field(default=1000, metadata={"help": "Bootstrap resamples for the AUROC interval."})


COMMANDS = {"create": CreateArguments, "serve": ServeArguments, "analyze": AnalyzeArguments}
USAGE = f"usage: {PROG} {{create,serve,analyze}} ... (--help for options)"


def parse_command_line(argv: list[str] | None = None) -> tuple[str, object, str | None]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\n{__doc__}")
        raise SystemExit(0)
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        fail(f"choose a command: {', '.join(COMMANDS)}" + (f" (got {argv[0]!r})" if argv else ""))
    command = argv[0]
    from transformers import HfArgumentParser

    parser = HfArgumentParser(COMMANDS[command], prog=f"{PROG} {command}")
    if command != "create":
        parser.add_argument("study", help="The study folder `create` wrote.")
    args, *extra = parse(parser, argv[1:])
    return command, args, extra[0].study if extra else None


def links(host: str, port: int, tokens: dict[str, str], organiser: str) -> str:
    base = f"http://{host}:{port}"
    lines = [f"  {name}: {base}/r/{token}" for name, token in tokens.items()]
    return "\n".join(["Personal links (send each reader their own; anyone with a link can answer as that reader):",
                      *lines, f"Organiser (progress, no answers): {base}/organiser/{organiser}"])


def serve(study: str, host: str, port: int) -> None:
    import uvicorn

    from .app import build_app

    app = build_app(study)
    if not _is_loopback(host):
        print(f"warning: serving on {host}: anyone who can reach this machine can try the links; use https or an SSH "
              "tunnel on an untrusted network", file=sys.stderr)
    with store.opened(study) as db:
        tokens = store.reader_tokens(db)
        organiser = store.meta(db)["organiser_token"]
    print(links(host, port, tokens, organiser), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> None:
    command, args, study = parse_command_line(argv)
    if command == "create":
        from .study import create_study

        made = run(lambda: create_study(args.output_dir, args.real, args.synthetic, args.num_images, args.readers,
                                        args.repeat_fraction, args.practice, args.size, args.seed, args.ask_findings))
        print(f"wrote the study to {args.output_dir}: {made['num_images']} images per reader at {made['size']} px; "
              f"serve it with `{PROG} serve {args.output_dir}`")
        print(links("127.0.0.1", 8000, made["readers"], made["organiser"]))
    elif command == "serve":
        run(lambda: serve(study, args.host, args.port))
    else:
        from .analysis import analyze, write_report

        output = args.output_dir or str(Path(study) / "analysis")
        result = run(lambda: analyze(study, args.experience_groups, args.num_resamples))
        write_report(result, output)
        pooled = result["pooled"]
        print(f"wrote {output}/report.md: {pooled.get('readings', 0)} readings, accuracy "
              f"{pooled.get('accuracy', float('nan')):.3f}")


if __name__ == "__main__":
    main()
