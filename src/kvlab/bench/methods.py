"""The kinds of suite method beside a plain attention structure, and their [source] / method tables:
`Retrofit` (with a pretrained [source]: kvlab uptrain's --to and recipe) and `AttentionFile` (a seed-000
attention file, trained contained: kvlab.bench.files). Parsers report one `SuiteError` line naming the
field and the fix."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlab.config import ConfigError
from kvlab.errors import KvlabError

SUITES_DIR = Path(__file__).resolve().parent / "suites"
SOURCE_KEYS = {"from", "calibration"}  # [source]: a pretrained model the methods are converted from
RETROFIT_KEYS = {"to", "recipe", "phase1_iters", "search_after"}  # a method of a [source] suite
FILE_KEYS = {"attention_file", "config", "time_limit", "memory_limit_gb"}  # a method given by a file


class SuiteError(KvlabError):
    """A suite file that cannot be used; the message names the file, the field and the fix."""


def retrofit_kind(spec: dict[str, Any]) -> str:
    """The kind column of an uptrained method: its `--to`, "... after training" when its search ran after
    uptraining (`spec`: Retrofit.to_dict(), as a cell's model dict holds it)."""
    return spec["to"] + (" after training" if spec.get("search_after") else "")


@dataclass(frozen=True)
class Retrofit:
    """A method of a suite with a [source]: `kvlab uptrain --to TO --recipe RECIPE` from that model."""

    to: str  # converter steps (kvlab.retrofit.structures): "mqa", "mla:144:16", "matryoshka+search:0.5"
    recipe: str = "ce"  # ce | distill | oacd (kvlab.retrofit.uptrain.RECIPES)
    phase1_iters: int | None = None  # oacd: ContextBlock-only steps (default max_iters / 4)
    search_after: bool = False  # `to` ends in search:B, run after training (MatryoshkaKV's order)

    @property
    def kind(self) -> str:
        return retrofit_kind(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        d = {"to": self.to, "recipe": self.recipe, "phase1_iters": self.phase1_iters}
        if self.search_after:  # only when set: the other methods' cell keys stay as they were
            d["search_after"] = True
        return d


@dataclass(frozen=True)
class AttentionFile:
    """A method given by a seed-000 attention file (kvlab init-attention): seed 000's nanoGPT substrate
    around the file's CausalSelfAttention, trained and evaluated in a contained child (kvlab.bench.files).
    The file is untrusted: the bench never imports it."""

    path: Path  # absolute (a relative attention_file is relative to the suite file)
    config: dict[str, Any] = field(default_factory=dict)  # attributes the file's code reads: kv_lora_rank
    time_limit: float = 24 * 3600.0  # wall seconds of each contained run (training, then evaluation)
    memory_limit_gb: float = 32.0  # address-space limit of a CPU child (0: none)

    def sha256(self) -> str:
        """Of the whole file's bytes, read now: a cell's key covers it, so an edited file retrains."""
        from kvlab.harness.template import read_text

        return hashlib.sha256(read_text(self.path).encode("utf-8")).hexdigest()

    @property
    def kind(self) -> str:
        return f"file {self.path.name}"


def parse_source(raw: dict, table, fail) -> dict[str, Any]:
    src = table(raw, "source", "")
    reject_unknown(src, SOURCE_KEYS, "source.", fail)
    name = src.get("from")
    if not isinstance(name, str) or not name:
        raise fail(
            'source.from must name the pretrained model: a kvlab run directory, "hf:DIR" or a model name '
            'from `kvlab models list` (from = "smollm2-135m")'
        )
    n = src.get("calibration", 4)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise fail(f"source.calibration={n!r} must be a positive number of calibration batches")
    return {"from": name, "calibration": n}


def parse_retrofit(mname: str, spec: Any, fail) -> Retrofit:
    """A [source] suite's method: a `--to` string, or { to = "...", recipe = "...", phase1_iters = N,
    search_after = true }."""
    from kvlab.retrofit.structures import USAGE, parse_structure, split_final_search
    from kvlab.retrofit.uptrain import RECIPES

    if isinstance(spec, str):
        spec = {"to": spec}
    if not isinstance(spec, dict):
        raise fail(
            f'methods.{mname}={spec!r} must be a structure ("mqa") or a table '
            '({ to = "matryoshka:32", recipe = "distill" })'
        )
    reject_unknown(spec, RETROFIT_KEYS, f"methods.{mname}.", fail)
    to, recipe, p1 = spec.get("to"), spec.get("recipe", "ce"), spec.get("phase1_iters")
    if not isinstance(to, str) or not to:
        raise fail(f"methods.{mname}.to must be a structure: {USAGE}")
    try:
        steps = [name for name, _ in parse_structure(to)]
    except ConfigError as e:
        raise fail(f"methods.{mname}: {e}") from e
    if recipe not in RECIPES:
        raise fail(f"methods.{mname}.recipe={recipe!r} must be one of {', '.join(RECIPES)}")
    if recipe == "oacd" and "context" not in steps:
        raise fail(f"methods.{mname}: recipe oacd trains a ContextBlock; its structure needs a context step")
    if p1 is not None and (isinstance(p1, bool) or not isinstance(p1, int) or p1 < 1):
        raise fail(f"methods.{mname}.phase1_iters={p1!r} must be a positive integer")
    after = spec.get("search_after", False)
    if not isinstance(after, bool):
        raise fail(f"methods.{mname}.search_after={after!r} must be true or false")
    if after:
        try:
            split_final_search(to)
        except ConfigError as e:
            raise fail(f"methods.{mname}.search_after: {e}") from e
    return Retrofit(to=to, recipe=recipe, phase1_iters=p1, search_after=after)


def parse_attention_file(mname: str, spec: dict, source: str, fail) -> AttentionFile:
    """{ attention_file = "my_attn.py", config = { kv_lora_rank = 256 }, time_limit = 3600 }."""
    from kvlab.harness.template import read_text

    reject_unknown(spec, FILE_KEYS, f"methods.{mname}.", fail)
    name = spec["attention_file"]
    if not isinstance(name, str) or not name:
        raise fail(f'methods.{mname}.attention_file={name!r} must be a path ("my_attn.py")')
    path = Path(name).expanduser()
    if not path.is_absolute():  # relative to the suite file, wherever bench is started from
        base = SUITES_DIR if source == "<suite>" else Path(source).resolve().parent
        path = base / path
    path = path.resolve()
    try:
        read_text(path)  # missing, a directory, binary: caught now (validation happens contained, later)
    except KvlabError as e:
        raise fail(f"methods.{mname}.attention_file: {e}") from e
    config = spec.get("config", {})
    if not isinstance(config, dict) or not all(
        isinstance(k, str) and k.isidentifier() and isinstance(v, (int, float, str, bool))
        for k, v in config.items()
    ):
        raise fail(
            f"methods.{mname}.config={config!r} must be a table of names to numbers, strings or booleans "
            "(config = { kv_lora_rank = 256 }): the attributes the file's code reads from config"
        )
    limits = {}
    for key in ("time_limit", "memory_limit_gb"):
        value = spec.get(key)
        if value is None:
            continue
        low = 0 if key == "memory_limit_gb" else 1e-9  # memory 0: no limit; a time limit must be positive
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
            what = "a non-negative number (0: no limit)" if low == 0 else "a positive number of seconds"
            raise fail(f"methods.{mname}.{key}={value!r} must be {what}")
        limits[key] = float(value)
    return AttentionFile(path=path, config=dict(config), **limits)


def reject_unknown(d: dict, known: set[str], where: str, fail) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise fail(
            f"unknown field(s) {', '.join(where + k for k in unknown)}; known: {', '.join(sorted(known))}"
        )
