"""`kvlab` command line: a thin argparse front over the library.

Each subcommand lives next to the code it drives and exposes `register(subparsers)`; this module only
collects them and turns user errors (`KvlabError`, argparse mistakes, an OSError on a path the user
named) into one clear line and exit code 2 instead of a traceback; `kvlab --debug ...` shows it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kvlab.errors import KvlabError, is_disk_full, output_problem

# subcommand modules, in the order `kvlab --help` lists them
COMMAND_MODULES = (
    "kvlab.commands.demo",
    "kvlab.data.cli",
    "kvlab.models.cli",
    "kvlab.train.cli",
    "kvlab.eval.cli",
    "kvlab.eval.lm_eval_cli",
    "kvlab.commands.generate",
    "kvlab.commands.export",
    "kvlab.bench.cli",
    "kvlab.harness.cli",
    "kvlab.commands.search_ranks",
    "kvlab.retrofit.cli",
    "kvlab.commands.info",
)


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + error on two or more lines; one line, naming the --help to read, is enough."""

    def error(self, message: str):
        self.exit(2, f"kvlab: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="kvlab",
        description="Design, train and evaluate KV-cache-efficient attention in GPT-style models.",
        epilog="Run `kvlab COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:  # a missing module is a real error, never skipped
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except KvlabError as e:
        if args.debug:
            raise
        print(f"kvlab: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if args.debug or not e.filename:  # not about a path the user gave: a bug, keep the traceback
            raise
        what = output_problem(e.filename, e) if is_disk_full(e) else f"{e.filename}: {e.strerror or e}"
        print(f"kvlab: error: {what} (check the path and run again)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
