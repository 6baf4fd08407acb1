"""`kvlab info`: KV metrics of attention presets on a model preset, as a table (no training)."""

from __future__ import annotations

import argparse

import torch

from kvlab.config import MODEL_PRESETS, ModelConfig
from kvlab.model import GPT

DEFAULT_ATTENTION = ("mha", "gqa", "mqa", "cla2", "mlkv-2")


def kv_table(preset: str, attentions: list[str]) -> list[dict]:
    rows = []
    for name in attentions:
        cfg = ModelConfig.preset(preset, attention=name)
        with torch.device("meta"):  # structure only: no memory, no init cost
            model = GPT(cfg)
        rows.append({"attention": name, "params_M": model.num_params() / 1e6, **model.kv_metrics()})
    return rows


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec). A plain aligned text table."""
    cells = [[h for _, h, _ in columns]] + [[format(r[k], f) for k, _, f in columns] for r in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(columns))]
    lines = [
        "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


KV_COLUMNS = [
    ("attention", "attention", ""),
    ("params_M", "params (M)", ".1f"),
    ("kv_bytes_per_token", "KV B/token/layer", ".0f"),
    ("kv_bytes_per_token_total", "KV B/token", ".0f"),
    ("head_sharing_ratio", "head share", ".2f"),
    ("layer_sharing_ratio", "layer share", ".2f"),
    ("latent_rank_ratio", "latent ratio", ".2f"),
]


def run(args: argparse.Namespace) -> int:
    table = format_table(kv_table(args.preset, args.attention), KV_COLUMNS)
    print(f"KV metrics on {args.preset} (bf16, per token):\n{table}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "info",
        help="KV metrics of attention presets on a model preset (no training)",
        description="Print the analytic KV footprint and sharing ratios of attention presets.",
        epilog="example: kvlab info --preset gpt2-124m --attention mha gqa mqa mla cla2 mlkv-4",
    )
    p.add_argument("--preset", default="gpt2-124m", choices=sorted(MODEL_PRESETS))
    p.add_argument("--attention", nargs="+", default=list(DEFAULT_ATTENTION), help="attention preset names")
    p.set_defaults(func=run)
