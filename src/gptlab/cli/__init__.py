"""The `gptlab` command line. Thin: parse arguments, build configs, call the library.

Commands are grouped by what they do (one module each: pretrain, finetune, align, evals, generate, compress, interop, serve);
each module registers its subcommands. Handlers import their library modules lazily, so
`gptlab --help` never loads torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gptlab.cli import align, compress, evals, finetune, generate, interop, pretrain, serve
from gptlab.cli.common import duration

__all__ = ["build_parser", "duration", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptlab", description="Build GPT models end to end: tokenizer, data, training, sampling, evaluation.")
    p.add_argument("--version", action="version", version="gptlab 0.1.0")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help: str, parent=sub) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(handler=handler)
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        return sp

    for group in (pretrain, finetune, align, evals, generate, compress, interop, serve):
        group.register(sub, command)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import time

    started = time.perf_counter()  # a time budget counts from here, torch's import included
    args = build_parser().parse_args(argv)
    args.started = started
    from gptlab.errors import GptlabError

    try:
        return args.handler(args)
    except GptlabError as err:
        print(f"gptlab: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file-system problem no command anticipated: still one line, not a traceback
        where = f"{err.filename}: " if err.filename else ""
        print(f"gptlab: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptlab: interrupted", file=sys.stderr)
        return 130
