"""`kvlab bench`: run a suite (or print its plan with --dry-run) and write results.json/.md + pareto.png."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from kvlab.bench.plan import format_plan, plan_cells
from kvlab.bench.runner import run_bench
from kvlab.bench.suites import DEFAULT_SUITE, builtin_suites, load_suite

DEFAULT_OUT = "bench_out"


def bench(suite_name: str, out: str | Path, seeds: int | None = None, dry_run: bool = False) -> int:
    """Shared by `kvlab bench` and `kvlab demo`: plan or run a suite, then print the results table."""
    suite = load_suite(suite_name)
    if seeds is not None:
        suite = suite.with_seeds(seeds)
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone prints (and writes)
    if dry_run:
        if rank0:
            print(format_plan(suite, plan_cells(suite), out_dir=out if Path(out).is_dir() else None))
        return 0
    result = run_bench(suite, out)
    if not rank0:
        return 1 if result.failed else 0
    out = Path(out)
    print()
    # The terminal gets the main table; results.md also holds every other metric, per regime.
    main_table = (out / "results.md").read_text().split("\n## Other metrics")[0].rstrip()
    print(main_table)
    print(f"\n(perplexities, cloze accuracy, ratios and memory per regime: {out / 'results.md'})")
    for name in ("results.json", "results.md", "pareto.png"):
        if (out / name).is_file():
            print(f"wrote {out / name}")
    if result.failed:
        print(
            f"{len(result.failed)} cell(s) failed: "
            + "; ".join(f"{f['cell']}: {f['error']}" for f in result.failed)
        )
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    return bench(args.suite, args.out, seeds=args.seeds, dry_run=args.dry_run)


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="train and evaluate KV structures x regimes x seeds; results table + Pareto plot",
        description=(
            "Run a benchmark suite: every method x regime x seed is a cell keyed by a hash of its resolved "
            "config under OUT/cells/; finished cells are reused, so an interrupted bench resumes. Writes "
            "OUT/results.json, OUT/results.md and OUT/pareto.png. "
            f"Built-in suites: {', '.join(builtin_suites())}."
        ),
        epilog=(
            "examples:\n  kvlab bench                                  # cpu-demo, ~10 min on 2 cores\n"
            "  kvlab bench --suite seed-124m --dry-run      # the plan and KV bytes, no training\n"
            "  kvlab bench --suite my_suite.toml --out bench/mine --seeds 3\n"
            "  torchrun --nproc_per_node 2 -m kvlab bench --suite my.toml   # DDP training; rank 0 evaluates"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--suite", default=DEFAULT_SUITE, help=f"built-in suite name or a TOML file (default {DEFAULT_SUITE})"
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default ./{DEFAULT_OUT})")
    p.add_argument("--dry-run", action="store_true", help="print the plan (runs, budgets, KV bytes) and exit")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (overrides the suite's)")
    p.set_defaults(func=run)
