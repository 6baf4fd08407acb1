"""`kvlab` command line: a thin argparse front over the library.

Each subcommand lives next to the code it drives and exposes `register(subparsers)`; this module only
collects them and turns user errors (`KvlabError`) into one clear line instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kvlab.errors import KvlabError

# subcommand modules, in the order `kvlab --help` lists them
COMMAND_MODULES = (
    "kvlab.commands.demo",
    "kvlab.data.cli",
    "kvlab.models.cli",
    "kvlab.train.cli",
    "kvlab.eval.cli",
    "kvlab.commands.generate",
    "kvlab.commands.export",
    "kvlab.bench.cli",
    "kvlab.harness.cli",
    "kvlab.commands.search_ranks",
    "kvlab.retrofit.cli",
    "kvlab.commands.info",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvlab",
        description="Design, train and evaluate KV-cache-efficient attention in GPT-style models.",
        epilog="Run `kvlab COMMAND --help` for a command's options and examples.",
    )
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
        print(f"kvlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
