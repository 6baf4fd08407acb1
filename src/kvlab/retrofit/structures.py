"""The `--to STRUCTURE` language of `kvlab uptrain`: converter steps joined by '+', applied in order.

    gqa:N            to_gqa(N) (mean-pooled K/V heads)        mqa   = gqa:1
    share:SPEC       to_kv_share(SPEC), e.g. share:every:2 (CLA2), share:groups:4 (MLKV owners)
    mla:R[:ROPE[:M]] to_mla(kv_rank=R, rope_dim=ROPE, method=M)  (default: all RoPE dims, pca)
    matryoshka[:R]   to_matryoshka with PCA init, every head at rank R (default: full)
    search:B[:F[:S]] MatryoshkaKV's greedy rank search (seed 003) down to B x the full-rank KV bytes, lowering
                     the cheapest fraction F (default 0.1) of cuts by S dims (default head_dim / 8) per round;
                     follows a matryoshka step: `matryoshka+search:0.5`. Cuts are scored on the first
                     calibration batch (each candidate is a forward pass).
    context:L[,L..]  replace_layers(L: Context-KV, seed 001's interval 32 capped at block_size / 4)
    none             the source unchanged (what --control trains)

Example: `gqa:1+share:groups:2` is MLKV with one KV head in two owner layers.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch

from kvlab.attention.matryoshka import matryoshka_layers, ranks_config
from kvlab.config import AttentionConfig, ConfigError
from kvlab.convert.grouped import to_gqa, to_kv_share
from kvlab.convert.layers import replace_layers
from kvlab.convert.matryoshka import to_matryoshka
from kvlab.convert.mla import to_mla
from kvlab.model import GPT

USAGE = (
    "gqa:N, mqa, share:SPEC, mla:R[:ROPE[:svd|pca]], matryoshka[:R], search:BUDGET[:FRACTION[:STEP]], "
    "context:L[,L...], none"
)


def _int(text: str, what: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--to {spec!r}: {what} {text!r} must be an integer; structures: {USAGE}") from None


def parse_structure(spec: str) -> list[tuple[str, list[str]]]:
    """'gqa:1+share:every:2' -> [('gqa', ['1']), ('share', ['every:2'])]; unknown names are one line."""
    steps = []
    for part in spec.split("+"):
        name, _, rest = part.strip().partition(":")
        if name not in STEPS:
            raise ConfigError(f"--to {spec!r}: unknown step {name!r}; structures: {USAGE}")
        args = [rest] if name == "share" else ([a for a in rest.split(":") if a] if rest else [])
        if name in ("mqa", "none") and part.strip() != name:
            raise ConfigError(f"--to {spec!r}: {name} takes no options; write {name} (gqa:N sets KV heads)")
        steps.append((name, args))
    return steps


def split_final_search(spec: str) -> tuple[str, str]:
    """'matryoshka+search:0.5' -> ('matryoshka', 'search:0.5'): the structure trained and the search that
    follows training (uptrain's search_after, MatryoshkaKV's order). One line when spec ends otherwise."""
    parts = [p.strip() for p in spec.split("+")]
    steps = parse_structure(spec)
    if len(steps) < 2 or steps[-1][0] != "search" or any(n == "search" for n, _ in steps[:-1]):
        raise ConfigError(
            f"--to {spec!r}: searching after training needs a structure that ends in one search step, "
            "e.g. matryoshka+search:0.5 (trained at the matryoshka step's ranks, then searched)"
        )
    return "+".join(parts[:-1]), parts[-1]


def convert(model: GPT, spec: str, calibration: list[torch.Tensor]) -> GPT:
    """Apply the steps of `spec` to `model` (left untouched) and return the converted model."""
    for name, args in parse_structure(spec):
        model = STEPS[name](model, args, calibration, spec)
    return model


def _gqa(model, args, calib, spec):
    if len(args) != 1:
        raise ConfigError(f"--to {spec!r}: write gqa:N with N the KV heads per layer")
    return to_gqa(model, _int(args[0], "n_kv_heads", spec))


def _share(model, args, calib, spec):
    if not args or not args[0]:
        raise ConfigError(f"--to {spec!r}: write share:every:K or share:groups:N")
    return to_kv_share(model, args[0])


def _mla(model, args, calib, spec):
    if not 1 <= len(args) <= 3:
        raise ConfigError(f"--to {spec!r}: write mla:RANK[:ROPE_DIM[:svd|pca]]")
    rank = _int(args[0], "kv_rank", spec)
    rope = _int(args[1], "rope_dim", spec) if len(args) > 1 else None
    method = args[2] if len(args) > 2 else "pca"
    return to_mla(model, rank, rope_dim=rope, method=method, calibration=calib or None)


def _matryoshka(model, args, calib, spec):
    if len(args) > 1:
        raise ConfigError(f"--to {spec!r}: write matryoshka or matryoshka:RANK")
    rank = _int(args[0], "rank", spec) if args else None
    if rank is not None and not 1 <= rank <= model.config.head_dim:
        raise ConfigError(
            f"--to {spec!r}: rank {rank} must be between 1 and head_dim={model.config.head_dim}"
        )
    return to_matryoshka(model, ranks=rank, calibration=calib or None)


def _float(text: str, what: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--to {spec!r}: {what} {text!r} must be a number; structures: {USAGE}") from None


def _search(model, args, calib, spec):
    from kvlab.search import greedy_rank_search

    if not 1 <= len(args) <= 3:
        raise ConfigError(f"--to {spec!r}: write search:BUDGET[:FRACTION[:STEP]], e.g. matryoshka+search:0.5")
    if not matryoshka_layers(model):
        raise ConfigError(
            f"--to {spec!r}: search lowers Matryoshka ranks; put a matryoshka step first "
            "(matryoshka+search:0.5)"
        )
    if not calib:
        raise ConfigError(f"--to {spec!r}: the rank search needs calibration batches")
    budget = _float(args[0], "budget", spec)
    fraction = _float(args[1], "fraction", spec) if len(args) > 1 else 0.1
    step = _int(args[2], "step", spec) if len(args) > 2 else None
    model = copy.deepcopy(model)  # the search sets ranks in place; the step's input stays as it was
    greedy_rank_search(model, calib[:1], budget, step=step, fraction=fraction)
    model.config = dataclasses.replace(model.config, attention=ranks_config(model))
    return model


def _context(model, args, calib, spec):
    if len(args) != 1:
        raise ConfigError(f"--to {spec!r}: write context:LAYER[,LAYER...] (seed 001: context:0)")
    layers = [_int(x, "layer index", spec) for x in args[0].split(",")]
    interval = min(32, max(1, model.config.block_size // 4))
    ctx = AttentionConfig(kind="context", interval=interval, n_kv_heads=model.config.attention.n_kv_heads)
    return replace_layers(model, dict.fromkeys(layers, ctx))


def _none(model, args, calib, spec):
    return model


STEPS: dict[str, Callable] = {
    "gqa": _gqa,
    "mqa": lambda m, a, c, s: _gqa(m, ["1"], c, s),
    "share": _share,
    "mla": _mla,
    "matryoshka": _matryoshka,
    "search": _search,
    "context": _context,
    "none": _none,
}
