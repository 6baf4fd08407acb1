"""`kvlab init-attention`, `kvlab validate`, and the contained run behind `kvlab train --attention-file`."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvlab.harness.template import FILLS, init_attention
from kvlab.harness.validate import validate_file

INIT_EXAMPLES = """examples:
  kvlab init-attention my_attn.py --from gqa     # seed 000's GQA baseline (n_head // 4 KV heads)
  kvlab init-attention my_mla.py --from mla      # latent KV: kv_lora_rank max(16, head_dim/2), RoPE key
  kvlab validate my_attn.py
  kvlab train --attention-file my_attn.py --preset cpu-tiny --out runs/mine --set train.max_iters=200"""

VALIDATE_EXAMPLES = """Prints every violation as FILE:LINE:COL rule: message and exits 1; exits 0 when the
region passes.
The check is a boundary, not a sandbox: `kvlab train --attention-file` also runs the file contained.

examples:
  kvlab validate my_attn.py"""


def run_init(args: argparse.Namespace) -> int:
    path = init_attention(args.file, args.fill, force=args.force)
    print(
        f"{path}: seed 000's {args.fill} fill; edit between the region markers, then `kvlab validate {path}`"
    )
    return 0


def run_validate(args: argparse.Namespace) -> int:
    violations = validate_file(args.file)
    for v in violations:
        print(v.format(args.file))
    if violations:
        return 1
    print(f"{args.file}: OK (the region passes the boundary)")
    return 0


def train_attention_file(args, model_cfg, train_cfg, data_dir, extra) -> int:
    """`kvlab train --attention-file`: validate, then train + evaluate contained; print the verdict."""
    from kvlab.harness.contain import Limits, run_contained
    from kvlab.harness.template import read_text

    read_text(args.attention_file)  # a missing or binary file: one `kvlab: error:` line, exit 2
    from kvlab.train.batches import read_meta
    from kvlab.train.rundir import resolve_vocab

    model_cfg = resolve_vocab(model_cfg, read_meta(data_dir), fixed=False)
    limits = Limits(
        cpu_s=int(args.time_limit) * max(1, args.threads),
        wall_s=float(args.time_limit),
        memory_bytes=None if args.memory_limit_gb <= 0 else int(args.memory_limit_gb * (1 << 30)),
        threads=args.threads,
    )
    device = train_cfg.device if train_cfg.device != "auto" else _auto_device()
    outcome = run_contained(
        args.attention_file,
        args.out,
        model_cfg,
        limits,
        train={**train_cfg.to_dict(), "device": device},
        data_dir=data_dir,
        extra=extra,
        generate=True,
        device=device,
    )
    print(f"{outcome.run_dir}: {outcome.line}")
    r = outcome.result
    declared, measured = r.get("declared"), r.get("measured") or {}
    if declared:
        got = f"{measured['kv_bytes_per_token']:g}" if measured.get("measured") else "not measured"
        print(f"  kv_bytes_per_token {declared['kv_bytes_per_token']:g} (seed-000 formula), measured {got}")
        print(
            f"  head_sharing_ratio {declared['head_sharing_ratio']:g}, "
            f"latent_rank_ratio {declared['latent_rank_ratio']:g}"
        )
        if r.get("cache"):
            print(f"  cache: {_cache_line(r['cache'])}")
        for flag in r.get("kv_flags", []):
            print(f"  {flag}")
    if r.get("train"):
        print(f"  val_loss {r['train']['val_loss']:.4f} at step {r['train']['step']}")
    if r.get("generation"):
        g = r["generation"]
        print(f"  generation_toks_per_s {g['generation_toks_per_s']:.1f} ({g['method']})")
        if "nocache_toks_per_s" in g:
            print(f"  nocache_toks_per_s {g['nocache_toks_per_s']:.1f} ({g['nocache_method']})")
    if outcome.verdict != "ok" and outcome.output:
        print(outcome.output.rstrip()[-1500:])
    return 0 if outcome.verdict == "ok" else 1


def _cache_line(cache: dict) -> str:
    if not cache.get("interface"):
        return f"none ({cache['reason']}); generation timed cache-free, seed 000's method"
    if cache.get("error"):
        return cache["error"]
    same = "equals" if cache["decode_matches_full"] else "DIFFERS from"
    return (
        f"{cache['kv_bytes_per_token']:g} B/token held by the file's cache after a real prefill; "
        f"cached decoding {same} the full forward"
    )


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def register(sub) -> None:
    p = sub.add_parser(
        "init-attention",
        help="write a seed-000 attention file (editable region + baseline fill)",
        description="Write an attention file with seed 000's region markers and its four definitions "
        "(build_kv_heads, cross_layer_share, latent_kv_project, CausalSelfAttention).",
        epilog=INIT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", type=Path, help="the file to write")
    p.add_argument(
        "--from", dest="fill", default="mha", choices=list(FILLS), help="baseline fill (default mha)"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=run_init)

    v = sub.add_parser(
        "validate",
        help="check an attention file's region against the AST boundary",
        description="Check the region of an attention file: only def/class at its top level, the four "
        "required names, nothing that reaches outside the attention block.",
        epilog=VALIDATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument("file", type=Path, help="the attention file")
    v.set_defaults(func=run_validate)
