"""Every `kvlab ...` command in the README's bash blocks parses with kvlab's own command line, names only
presets, structures, suites and models that exist, and uses a run directory only after a command in the
command above it has made it (`--out`) -- so the README's commands stay runnable as written, in order."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from kvlab.cli import build_parser
from kvlab.config import MODEL_PRESETS, attention_preset

README = Path(__file__).resolve().parents[1] / "README.md"
RUN_COMMANDS = {"eval", "generate", "search-ranks", "export"}  # their first positional is a run


def _blocks() -> list[list[str]]:
    """The kvlab command lines of each ```bash block, in README order, comments and optional [...] parts
    removed."""
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        lines, joined = [], ""
        for raw in block.splitlines():
            line = joined + re.sub(r"\s+#.*$", "", raw).strip()
            if line.endswith("\\"):
                joined = line[:-1] + " "
                continue
            joined = ""
            for part in line.split("; "):
                while re.search(r"\[[^\[\]]*\]", part):
                    part = re.sub(r"\s*\[[^\[\]]*\]", "", part)
                if part.startswith("kvlab "):
                    lines.append(part.strip())
        blocks.append(lines)
    return [b for b in blocks if b]


COMMANDS = [line for block in _blocks() for line in block]


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 25 and any(line.startswith("kvlab train") for line in COMMANDS)


def _option(argv: list[str], flag: str) -> list[str]:
    """The values after `flag` up to the next option."""
    if flag not in argv:
        return []
    rest = argv[argv.index(flag) + 1 :]
    return rest[: next((k for k, a in enumerate(rest) if a.startswith("--")), len(rest))]


@pytest.mark.parametrize("line", COMMANDS, ids=[line[:60] for line in COMMANDS])
def test_readme_command_parses_and_names_what_exists(line):
    from kvlab.bench.suites import load_suite
    from kvlab.models import MODELS
    from kvlab.retrofit.structures import parse_structure

    argv = shlex.split(line)[1:]
    assert not any("|" in a for a in argv), f"choices outside [...]: {line}"
    args = build_parser().parse_args(argv)  # a renamed flag or a bad choice exits here
    assert getattr(args, "func", None), line
    for name in _option(argv, "--preset"):
        assert name in MODEL_PRESETS, f"{line}: no model preset {name!r}"
    if argv[0] in ("train", "info"):
        for name in _option(argv, "--attention"):
            attention_preset(name, 12, 12, 768)  # ConfigError for a name that is not a preset
    for name in _option(argv, "--suite"):
        if not name.endswith(".toml"):
            load_suite(name)
    for spec in _option(argv, "--to"):
        parse_structure(spec)
    if argv[:2] == ["models", "fetch"]:
        assert argv[2] in MODELS


def test_readme_uses_each_run_directory_after_making_it():
    """`kvlab eval runs/gqa` must come after a command with `--out runs/gqa`, reading the README from the
    top; placeholders (upper case), hf:DIR and fetchable models are not runs the README makes."""
    from kvlab.models import MODELS

    made: set[str] = set()
    for line in COMMANDS:
        argv = shlex.split(line)[1:]
        runs = [next(a for a in argv[1:] if not a.startswith("-"))] if argv[0] in RUN_COMMANDS else []
        for run in runs + (_option(argv, "--from") if argv[0] == "uptrain" else []):
            if not (run.isupper() or run.startswith("hf:") or run in MODELS or "RUN" in run):
                assert run in made, f"{line}: {run} is used before a command above it makes it"
        made.update(_option(argv, "--out"))
