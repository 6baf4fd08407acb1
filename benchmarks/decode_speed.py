"""Decode speed and cache bytes per KV structure, sweeping batch size and context length.

For each model shape, attention preset, batch size and context length: prefill `context` tokens into a
fresh cache, then time `--new-tokens` cached greedy decode steps (tokens/s = batch x steps / seconds);
the cache's measured bytes are checked against the analytic figure. Cache-free generation (seed 000:
each step reruns the whole cropped context) is timed at batch 1 for comparison. Weights are random:
speed does not depend on them. Runs on CUDA in bf16 when available, else CPU float32.

    python benchmarks/decode_speed.py                       # cpu-tiny + gpt2-124m, default sweep
    python benchmarks/decode_speed.py --shapes cpu-tiny --batch-sizes 1 --contexts 64 --quick
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from kvlab import GPT, ModelConfig
from kvlab.checkpoint import environment_info
from kvlab.errors import KvlabError
from kvlab.generate import decode_one_token

STRUCTURES = ("mha", "gqa", "mqa", "mla", "cla2", "mlkv-2", "matryoshka-8", "context-32")
# per shape: (batch sizes, context lengths) that fit its block_size and a 2-core CPU's patience
DEFAULT_SWEEP = {
    "cpu-tiny": ([1, 8], [64, 192]),
    "gpt2-124m": ([1, 4], [128, 768]),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def cached_decode(model: GPT, batch: int, context: int, steps: int, dtype, device, step_fn=None) -> dict:
    """Prefill `context` random tokens, then time `steps` single-token decode steps over the cache.

    step_fn: the decode step (default: eager `decode_one_token`; pass a compiled one to time that). A
    compiled step gets 3 untimed warm-up steps first, so compilation is not counted.
    """
    step_fn = step_fn or decode_one_token
    warm = 3 if step_fn is not decode_one_token else 0
    vocab = model.config.vocab_size
    idx = torch.randint(0, vocab, (batch, context), device=device)
    max_len = context + warm + steps + 1
    cache = model.new_cache(batch_size=batch, max_len=max_len, dtype=dtype)
    _sync(device)
    t0 = time.perf_counter()
    token = model(idx, cache=cache)[:, -1:].argmax(-1)  # (B, 1)
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(warm):
        token = step_fn(model, token, cache).argmax(-1, keepdim=True)  # (B, 1)
    _sync(device)
    t1w = time.perf_counter()
    for _ in range(steps):
        token = step_fn(model, token, cache).argmax(-1, keepdim=True)  # (B, 1)
    _sync(device)
    t2 = time.perf_counter()
    t1 = t1w if warm else t1
    analytic = model.kv_cache_bytes(batch_size=batch, max_len=max_len, dtype=dtype)
    if cache.nbytes() != analytic:
        raise AssertionError(f"measured cache bytes {cache.nbytes()} != analytic {analytic}")
    return {
        "prefill_s": t1 - t0,
        "decode_toks_per_s": batch * steps / (t2 - t1),
        "cache_bytes": cache.nbytes(),
        "cache_bytes_per_token": cache.nbytes() / (batch * max_len),
    }


@torch.inference_mode()
def nocache_decode(model: GPT, context: int, steps: int, device) -> float:
    """Seed 000's generation at batch 1: every step reruns the last block_size tokens (eager)."""
    idx = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    block = model.config.block_size
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.cat([idx, model(idx[:, -block:])[:, -1:].argmax(-1)], dim=1)
    _sync(device)
    return steps / (time.perf_counter() - t0)


def build(shape: str, structure: str, device, dtype) -> GPT | None:
    try:
        cfg = ModelConfig.preset(shape, attention=structure)
    except KvlabError as e:  # a structure not built yet, or not valid on this shape
        print(f"  skip {shape}/{structure}: {e}")
        return None
    return GPT(cfg).to(device=device, dtype=dtype).eval()


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for shape in args.shapes:
        batches, contexts = DEFAULT_SWEEP.get(shape, ([1], [128]))
        batches, contexts = args.batch_sizes or batches, args.contexts or contexts
        for structure in args.structures:
            model = build(shape, structure, device, dtype)
            if model is None:
                continue
            kv = model.kv_metrics()
            step_fn = torch.compile(decode_one_token, dynamic=True) if args.compile else None
            cached_decode(model, 1, min(contexts), 2, dtype, device, step_fn)  # warm-up (allocator, kernels)
            for context in contexts:
                for batch in batches:
                    r = cached_decode(model, batch, context, args.new_tokens, dtype, device, step_fn)
                    row = {"shape": shape, "structure": structure, "batch": batch, "context": context, **r}
                    row["kv_bytes_per_token"] = kv["kv_bytes_per_token"]
                    if args.nocache and batch == 1:
                        row["nocache_toks_per_s"] = nocache_decode(model, context, args.new_tokens, device)
                    rows.append(row)
                    print(_line(row), flush=True)
            del model
    return rows


def _line(r: dict) -> str:
    nocache = f"{r['nocache_toks_per_s']:10.1f}" if "nocache_toks_per_s" in r else f"{'-':>10}"
    return (
        f"{r['shape']:<10} {r['structure']:<13} {r['batch']:>5} {r['context']:>7} "
        f"{r['decode_toks_per_s']:>10.1f} {nocache} {r['cache_bytes'] / 1024:>10.1f} "
        f"{r['kv_bytes_per_token']:>8.0f}"
    )


HEADER = (
    f"{'shape':<10} {'structure':<13} {'batch':>5} {'context':>7} {'cached t/s':>10} {'nocache t/s':>10} "
    f"{'cache KiB':>10} {'KV B/tok':>8}"
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SWEEP), help="model presets")
    p.add_argument("--structures", nargs="+", default=list(STRUCTURES), help="attention presets")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    p.add_argument("--contexts", nargs="+", type=int, default=None, help="prompt tokens already cached")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per cell")
    p.add_argument("--no-nocache", dest="nocache", action="store_false", help="skip cache-free generation")
    p.add_argument("--quick", action="store_true", help="8 decode steps per cell (smoke test)")
    p.add_argument("--compile", action="store_true", help="time a compiled decode step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/decode_speed_<device>.json)"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens = 8
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(HEADER)
    rows = run(args)
    out = Path(
        args.out or Path(__file__).parent / "results" / f"decode_speed_{torch.device(args.device).type}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment_info()
    env["processor"] = platform.processor() or platform.machine()
    env["threads"] = torch.get_num_threads()
    out.write_text(
        json.dumps({"environment": env, "new_tokens": args.new_tokens, "rows": rows}, indent=2) + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
