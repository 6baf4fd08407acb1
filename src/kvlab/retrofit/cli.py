"""`kvlab uptrain`: convert a pretrained model (a run directory, hf:DIR or a registry name) to a KV
structure, evaluate it at step 0, uptrain with a seed's recipe, evaluate again; optionally the control."""

from __future__ import annotations

import argparse

from kvlab.errors import KvlabError, check_output_path
from kvlab.retrofit.source import load_source

EXAMPLES = """examples:
  kvlab uptrain --from runs/mha --to gqa:2 --data DATA --out runs/up-gqa --control --set train.max_iters=200
  kvlab uptrain --from runs/mha --to gqa:1+share:groups:2 --data DATA --out runs/up-mlkv
  kvlab uptrain --from runs/mha --to mla:64 --data DATA --out runs/up-mla
  kvlab uptrain --from runs/mha --to matryoshka:8 --recipe distill --data DATA --out runs/up-mat
  kvlab uptrain --from runs/mha --to matryoshka+search:0.5 --recipe distill --search-after --data DATA \
      --out runs/up-mat-search   # MatryoshkaKV's order: train with sampled ranks, then search (OUT/searched)
  kvlab uptrain --from runs/mha --to context:0 --recipe oacd --data DATA --out runs/up-ctx --phase1-iters 50
  kvlab uptrain ... --resume      # continue after a kill (also across the oacd phase boundary)

--to: """


def run(args: argparse.Namespace) -> int:
    from kvlab.retrofit.uptrain import check_block_size, format_table, uptrain
    from kvlab.train.cli import parse_sets

    check_output_path(args.out, "--out")  # "" would silently mean the current directory
    sets = parse_sets(args.set or [])
    if sets["attention"] or set(sets["model"]) - {"block_size"}:
        raise KvlabError(
            "kvlab uptrain takes --set train.* and model.block_size; the structure comes from --to"
        )
    source, desc, source_dir = load_source(args.source)
    source = check_block_size(source, sets["model"].get("block_size"))
    teacher = load_source(args.teacher)[0] if args.teacher else None
    summary = uptrain(
        source, args.to, args.data, args.out, recipe=args.recipe, train_overrides=sets["train"],
        control=args.control, resume=args.resume, source_desc=desc, source_dir=source_dir, teacher=teacher,
        phase1_iters=args.phase1_iters, progress=args.progress, search_after=args.search_after,
    )  # fmt: skip
    print(format_table(summary))
    return 0


def register(sub) -> None:
    from kvlab.retrofit.structures import USAGE

    p = sub.add_parser(
        "uptrain",
        help="convert a pretrained model to a KV structure and uptrain it (seeds 001-003)",
        description="Convert, evaluate at step 0, train with a recipe, evaluate. Writes a run directory "
        "like kvlab train's plus uptrain.json (step-0 and final held-out loss, KV bytes).",
        epilog=EXAMPLES + USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--from", dest="source", required=True, help="run directory, hf:DIR, or a model name")
    p.add_argument(
        "--to", required=True, help="target structure, e.g. gqa:2, mla:64, matryoshka:8, context:0"
    )
    p.add_argument("--recipe", default="ce", choices=("ce", "distill", "oacd"))
    p.add_argument("--data", required=True, help="dataset directory tokenized like the source")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--control", action="store_true", help="also uptrain the unreduced source (OUT/control)")
    p.add_argument("--teacher", help="distill: teacher model (default: the frozen source)")
    p.add_argument(
        "--search-after",
        action="store_true",
        help="--to ends in search:B: train the structure before the search, then search the trained model "
        "from full rank into OUT/searched (MatryoshkaKV's order); step 0 scores the search at conversion",
    )
    p.add_argument("--phase1-iters", type=int, help="oacd: ContextBlock-only steps (default max_iters/4)")
    p.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help="train.* overrides")
    p.add_argument("--resume", action="store_true", help="continue an interrupted uptraining in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)
