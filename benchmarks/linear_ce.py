"""The fused LM-head cross-entropy (kvlab.train.linear_ce, what CPU float32 training runs) against logits +
F.cross_entropy, forward + backward, per (hidden width, vocabulary): with kvlab's chunk rule
(`chunk_rows`: about 2 x the hidden width in rows) and with a fixed number of MiB of logits per chunk
(`--fixed-mib`, the rule before: 4 MiB). Rounds interleave the variants; the best round counts, in
process CPU seconds at 1 thread (`--clock cpu`, other jobs on shared cores do not inflate it). Prints a
table, writes JSON with the machine, versions and git commit.

    python benchmarks/linear_ce.py                      # cpu-tiny .. GPT-2 vocabularies, 2048 rows
    python benchmarks/linear_ce.py --shapes 256x8192 --rows 2048 --rounds 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from _setup import threads_and_clock

import kvlab.train.linear_ce as linear_ce
from kvlab.checkpoint import environment_info

# hidden width x vocabulary: cpu-tiny, the issue-11 4 x 256 shape, 512 wide, SmolLM2-135M, GPT-2 124M
SHAPES = ("128x8192", "256x8192", "512x8192", "576x49152", "768x50304")


def _variants(C: int, V: int, fixed_mib: int) -> dict:
    rule = linear_ce.chunk_rows(C, V)
    fixed = max(1, (fixed_mib << 20) // (4 * V))
    return {"unfused": None, f"chunks of {fixed} rows ({fixed_mib} MiB)": fixed, f"rule: {rule} rows": rule}


def _step(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int | None) -> None:
    """Forward + backward of the loss: logits + F.cross_entropy (chunk None) or fused in `chunk` rows."""
    h.grad = w.grad = None
    if chunk is None:
        F.cross_entropy(h @ w.t(), y).backward()
    else:
        linear_ce.linear_cross_entropy(h, w, y, rows=chunk).backward()


def run(args, clock) -> list[dict]:
    rows_out = []
    print(f"{'C x V':>10} {'variant':<28} {'rows/chunk':>10} {'ms':>8} {'vs unfused':>10}")
    for shape in args.shapes:
        C, V = (int(x) for x in shape.split("x"))
        torch.manual_seed(0)
        h = torch.randn(args.rows, C, requires_grad=True)
        w = (torch.randn(V, C) * 0.02).requires_grad_()
        y = torch.randint(0, V, (args.rows,))
        variants = _variants(C, V, args.fixed_mib)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for chunk in variants.values():  # warm-up
            _step(h, w, y, chunk)
        for _ in range(args.rounds):
            for name, chunk in variants.items():
                t0 = clock()
                _step(h, w, y, chunk)
                times[name].append(clock() - t0)
        base = min(times["unfused"])
        for name, chunk in variants.items():
            best = min(times[name])
            row = {"n_embd": C, "vocab_size": V, "rows": args.rows, "variant": name, "chunk_rows": chunk,
                   "best_s": best, "round_s": times[name], "unfused_over_this": base / best}  # fmt: skip
            rows_out.append(row)
            print(f"{shape:>10} {name:<28} {chunk or '-':>10} {best * 1e3:>8.0f} {base / best:>9.2f}x",
                  flush=True)  # fmt: skip
    return rows_out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), help="width x vocabulary, e.g. 256x8192")
    p.add_argument("--rows", type=int, default=2048, help="tokens per micro-batch (batch x context)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fixed-mib", type=int, default=4, help="the fixed-size chunk to compare against")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["wall", "cpu"], default="cpu", help="cpu: process CPU seconds")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.device = "cpu"  # the fused loss is the CPU float32 path
    clock = threads_and_clock(p, args)
    env = environment_info()
    print(f"linear_ce: {args.rows} rows, {torch.get_num_threads()} thread(s), {args.clock} clock, best of "
          f"{args.rounds}, commit {(env['git_commit'] or '?')[:7]}")  # fmt: skip
    rows = run(args, clock)
    commit = (env["git_commit"] or "nogit")[:7]
    out = args.out or Path(__file__).parent / "results" / f"linear_ce_cpu_{commit}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"benchmark": "linear_ce", "settings": settings, "environment": env, "rows": rows}
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
