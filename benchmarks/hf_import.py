"""Importing a pretrained HF model into kvlab, and its forward speed next to transformers', in one run.

1. import time: `kvlab.checkpoint.load_model(NAME)` (transformers loads the directory, kvlab maps the
   tensors onto a meta-built GPT) in a fresh process, against `AutoModelForCausalLM.from_pretrained` alone;
2. forward tokens/s of the two models on the same inputs (fp32, interleaved repeats, median), and the
   largest logit difference.
Prints a table and writes JSON with the machine, versions and git commit.

    python benchmarks/hf_import.py                      # smollm2-135m (kvlab models fetch smollm2-135m first)
    python benchmarks/hf_import.py --shapes 1x128 4x256 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvlab.checkpoint import environment_info, resolve_source

CHILD = """
import json, sys, time
t = time.perf_counter()
if sys.argv[1] == "kvlab":
    from kvlab.checkpoint import load_model
    model = load_model(sys.argv[2])
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[2])
print(json.dumps({"load_s": time.perf_counter() - t}))
"""


def load_seconds(which: str, source: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, which, source], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["load_s"]


@torch.inference_mode()
def forward_seconds(fn, idx, repeats: int) -> list[float]:
    fn(idx)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(idx)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shapes", nargs="+", default=["1x256", "4x256"], help="BATCHxTOKENS")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/hf_import.json")
    args = ap.parse_args()
    _, hf_dir = resolve_source(args.model)
    sources = {"kvlab": args.model, "transformers": str(hf_dir)}
    loads = {w: [load_seconds(w, src) for _ in range(args.loads)] for w, src in sources.items()}

    from transformers import AutoModelForCausalLM

    from kvlab.checkpoint import load_model

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours = load_model(args.model).eval()
    rows = []
    for shape in args.shapes:
        B, T = map(int, shape.split("x"))
        idx = torch.randint(0, ours.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
        t_kv, t_hf = [], []
        for _ in range(args.repeats):  # interleaved, so load changes hit both alike
            t_kv += forward_seconds(ours, idx, 1)
            t_hf += forward_seconds(lambda x: hf(x).logits, idx, 1)
        with torch.inference_mode():
            diff = float((ours(idx) - hf(idx).logits).abs().max())
        kv, ht = statistics.median(t_kv), statistics.median(t_hf)
        rows.append({"shape": shape, "kvlab_tok_s": B * T / kv, "hf_tok_s": B * T / ht, "ratio": ht / kv,
                     "max_logit_diff": diff})  # fmt: skip
    print(f"import {args.model}: kvlab {min(loads['kvlab']):.1f} s, transformers alone "
          f"{min(loads['transformers']):.1f} s (best of {args.loads}, fresh processes)")  # fmt: skip
    print(f"{'shape':>8} {'kvlab tok/s':>12} {'HF tok/s':>10} {'kvlab/HF':>9} {'max |dlogit|':>13}")
    for r in rows:
        print(f"{r['shape']:>8} {r['kvlab_tok_s']:>12.0f} {r['hf_tok_s']:>10.0f} {r['ratio']:>9.2f} "
              f"{r['max_logit_diff']:>13.2e}")  # fmt: skip
    result = {"model": args.model, "load_s": loads, "forward": rows, "threads": torch.get_num_threads(),
              "loadavg": os.getloadavg(), "environment": environment_info()}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
