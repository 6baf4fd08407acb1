"""One decode step's attention over a bfloat16 cache under float32 queries: widened against attended in bf16.

A cache narrower than the compute (a bf16 cache under a float32 model, or autocast's float32 residual
stream) can be read two ways: convert every held key and value to float32 each step, or convert the one
query down and attend in the cache's dtype (kvlab.attention.step.attend_dtype; the devices in
WIDENING_DEVICES widen). This times `decode_attention`, the op every structure's decode step reads its
cache through, in the cache layout of the device (`kv_buffer`: (D, S)-major on the CPU), for one
query token per sequence, n_head query heads over H_kv KV heads of head_dim D:

- float32 cache: the reference, no conversion;
- bf16, widened: the cache converted to float32 each step, then attended;
- bf16, in bf16: the query converted to bf16, attended in bf16 (oneDNN on, torch's default);
- CPU only, bf16 in bf16 with oneDNN off: what the decode step of a float32 CPU model runs under
  (kvlab.decode turns oneDNN off for GELU's sake).

Prints a table and writes JSON (machine, versions, git commit).

    python benchmarks/narrow_cache.py --threads 1 --clock cpu           # the CPU figures in the README
    python benchmarks/narrow_cache.py --batch-size 64 --contexts 1024   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import torch
from _setup import threads_and_clock

import kvlab.attention.step as step
from kvlab.attention.base import kv_buffer
from kvlab.checkpoint import environment_info

CLOCK = [time.perf_counter]
# torch.backends.mkldnn.flags() warns about oneDNN TF32 on Intel GPUs every time it is entered
warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_ms(fn, device: torch.device, steps: int, rounds: int) -> float:
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(rounds):
        _sync(device)
        t0 = CLOCK[0]()
        for _ in range(steps):
            fn()
        _sync(device)
        best = min(best, (CLOCK[0]() - t0) / steps)
    return best * 1e3


def modes(device: torch.device):
    """(name, WIDENING_DEVICES, oneDNN enabled, cache dtype) for each way of reading the cache."""
    out = [
        ("float32 cache", frozenset(), True, torch.float32),
        ("bf16, widened", frozenset({device.type}), True, torch.bfloat16),
        ("bf16, in bf16", frozenset(), True, torch.bfloat16),
    ]
    if device.type == "cpu":
        out.append(("bf16 in bf16, oneDNN off", frozenset(), False, torch.bfloat16))
    return out


@torch.inference_mode()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096])
    p.add_argument("--kv-heads", nargs="+", type=int, default=[8, 2, 1])
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--out", default=None, help="JSON path (default: results/narrow_cache_<dev>_<commit>.json)"
    )
    args = p.parse_args(argv)
    CLOCK[0] = threads_and_clock(p, args)
    device = torch.device(args.device)
    env = environment_info() | {"threads": torch.get_num_threads()}
    # glibc's malloc tunables: a widened cache is a fresh (B H_kv S D) float32 buffer per step, and whether
    # malloc maps new pages for it (page faults every step) or reuses freed ones depends on these
    env["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    B, H, D = args.batch_size, args.n_head, args.head_dim
    print(f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads, commit "
          f"{(env['git_commit'] or '?')[:7]}; batch {B}, {H} query heads, head_dim {D}; ms/step")  # fmt: skip
    names = [m[0] for m in modes(device)]
    print(f"{'H_kv':>4} {'context':>7} " + " ".join(f"{n:>24}" for n in names))
    rows = []
    saved = step.WIDENING_DEVICES
    try:
        for h_kv in args.kv_heads:
            for S in args.contexts:
                q = torch.randn(B, h_kv, H // h_kv, D, device=device)
                caches = {}
                for dt in (torch.float32, torch.bfloat16):
                    k = kv_buffer((B, h_kv, S, D), device, dt)
                    v = kv_buffer((B, h_kv, S, D), device, dt)
                    caches[dt] = (k.normal_(), v.normal_())
                row = {"kv_heads": h_kv, "context": S, "ms": {}}
                for name, widening, onednn, dt in modes(device):
                    step.WIDENING_DEVICES = widening
                    k, v = caches[dt]
                    with torch.backends.mkldnn.flags(enabled=onednn):
                        row["ms"][name] = best_ms(
                            lambda q=q, k=k, v=v: step.decode_attention(q, k, v),
                            device,
                            args.steps,
                            args.rounds,
                        )
                rows.append(row)
                print(f"{h_kv:>4} {S:>7} " + " ".join(f"{row['ms'][n]:>24.3f}" for n in names), flush=True)
    finally:
        step.WIDENING_DEVICES = saved
    commit = (env["git_commit"] or "nocommit")[:7]
    out = Path(args.out or Path(__file__).parent / "results" / f"narrow_cache_{device.type}_{commit}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "narrow_cache", "settings": vars(args), "environment": env, "results": rows}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
