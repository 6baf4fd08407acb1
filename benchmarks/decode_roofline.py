"""Cached decode speed against the memory roofline, per KV structure and context length.

A batch-1 decode step must read every weight once and every cached byte once, so its floor is
(weight bytes + KV bytes read) / memory bandwidth. For each structure this prefills a random prompt into
one cache and, at each context length in turn, times `--rounds` x `--steps` greedy decode steps (the
best round counts: load from other processes only slows a round); the fraction of the
roofline is (roofline step time) / (measured step time), 1.0 meaning the step runs at copy bandwidth.

- weight bytes: every distinct parameter tensor a step reads (the tied embedding counts once, as the LM
  head reads it whole), less the learned-position table, of which a step reads one row;
- KV bytes read: every layer reads the cache it attends over, its own or its owner's (CLA / MLKV
  borrowers read the owner's again: a layer's queries need the layer before, so the two reads cannot be
  fused), i.e. the sum over layers of the owner's analytic cache bytes at `context` tokens. For
  structures without sharing this is model.kv_cache_bytes(batch, context) (checked equal to the
  measured cache bytes), which is what this script used before 2026-12-01 for every structure,
  undercounting CLA's and MLKV's reads (`kv_bytes_stored` in the JSON keeps that figure);
- bandwidth: best of several `dst.copy_(src)` of a buffer larger than the last-level cache, counted as
  bytes read + bytes written (STREAM's "copy"), in the same process and thread count.

Every structure's model and cache are built first and the timing rounds interleave the structures (each
times `--steps` steps in turn), so load from other jobs on shared cores falls on all of them alike.

Random weights, float32 on CPU (bf16 on CUDA). Prints a table, writes JSON (machine, versions, git commit)
and a plot of tokens/s and roofline fraction against context.

    python benchmarks/decode_roofline.py                              # 6 x 512, contexts 256..4096
    python benchmarks/decode_roofline.py --contexts 128 512 --structures mha mla --steps 8
    python benchmarks/decode_roofline.py --threads 1 --clock cpu --steps 8 --contexts 4096   # the targets

Decode steps run through kvlab's fast path (`kvlab.decode.Decoder`, what `generate` runs). At the longest
context it prints issue 11's targets: every structure >= 0.5 of its roofline, MLA >= 1.0x GQA, MQA and
MLKV faster than GQA faster than MHA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from _setup import allow_many_compiled_models, threads_and_clock

import kvlab
from kvlab import GPT, ModelConfig
from kvlab.checkpoint import environment_info
from kvlab.decode import Decoder

# perf_counter (wall) by default; --clock cpu times this process's CPU seconds instead, which a 1-thread run
# on cores shared with other jobs keeps steady (time spent descheduled is not counted).
CLOCK = [time.perf_counter]

STRUCTURES = ("mha", "gqa", "mqa", "cla2", "mlkv-2", "matryoshka-16", "context-32", "mla")


def copy_bandwidth(device: torch.device, mib: int = 256, repeats: int = 7) -> float:
    """Bytes/s of the best of `repeats` copies of a `mib` MiB float32 buffer (read + write counted)."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = CLOCK[0]()
        dst.copy_(src)
        _sync(device)
        best = min(best, CLOCK[0]() - t0)
    return 2 * n * 4 / best


def gemv_layouts(model: GPT, device: torch.device, mib: int = 128, rounds: int = 5) -> list[dict]:
    """Batch-1 GEMV read speed of each distinct Linear shape of `model`, from memory (not cache): the
    (out, in) parameter as F.linear reads it, against an (in, out) contiguous copy (kvlab.decode's
    layout where out > in). Enough copies of each matrix to exceed `mib` MiB are cycled through."""
    shapes = sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)})
    rows = []
    for n_out, n_in in shapes:
        copies = max(2, mib * 2**20 // (n_out * n_in * 4))
        weights = [torch.randn(n_out, n_in, device=device) for _ in range(copies)]
        transposed = [w.t().contiguous() for w in weights]
        x = torch.randn(1, n_in, device=device)
        best = {}
        for name, mats, fn in (("out_in", weights, torch.nn.functional.linear),
                               ("in_out", transposed, torch.mm)):  # fmt: skip
            for _ in range(rounds):
                _sync(device)
                t0 = CLOCK[0]()
                for w in mats:
                    fn(x, w)
                _sync(device)
                best[name] = min(best.get(name, float("inf")), (CLOCK[0]() - t0) / copies)
        gbs = {k: n_out * n_in * 4 / t / 1e9 for k, t in best.items()}
        rows.append({"out": n_out, "in": n_in, "out_in_GBps": gbs["out_in"], "in_out_GBps": gbs["in_out"]})
        mib_w = n_out * n_in * 4 / 2**20
        ratio = gbs["in_out"] / gbs["out_in"]
        print(f"  W ({n_out:>5}, {n_in:>5}) {mib_w:6.2f} MiB: (out, in) {gbs['out_in']:5.1f} GB/s, (in, out) "
              f"copy {gbs['in_out']:5.1f} GB/s, {ratio:.2f}x", flush=True)  # fmt: skip
        del weights, transposed
    return rows


def weight_bytes(model: GPT) -> int:
    """Bytes of the distinct parameters one decode step reads (all but the learned-position table)."""
    seen, total = set(), 0
    skip = {id(model.wpe.weight)} if model.wpe is not None else set()
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def kv_bytes_read(model: GPT, batch: int, tokens: int, dtype: torch.dtype) -> int:
    """Cache bytes one decode step reads: each layer reads its owner's cache (itself, unless it borrows)."""
    blocks = model.blocks
    return sum(blocks[owner].attn.cache_bytes(batch, tokens, dtype) for owner in model.owners)


def _git_dirty() -> bool | None:
    """True when tracked files differ from the recorded commit (then the numbers are not that commit's)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, timeout=5, cwd=Path(kvlab.__file__).parent)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Run:
    """One structure's model, decoder and cache, grown through the contexts by `advance` and `time`."""

    def __init__(self, model: GPT, max_len: int, batch: int, dtype, device, compile: bool):
        self.model, self.batch, self.dtype, self.device = model, batch, dtype, device
        self.cache = model.new_cache(batch_size=batch, max_len=max_len, dtype=dtype, device=device)
        analytic = model.kv_cache_bytes(batch, max_len, dtype)
        if self.cache.nbytes() != analytic:
            raise AssertionError(f"measured cache bytes {self.cache.nbytes()} != analytic {analytic}")
        self.decoder = Decoder(model, compile=compile)
        self.w_bytes = weight_bytes(model)
        self.token = None
        self.rounds_s: list[float] = []

    @torch.inference_mode()
    def advance(self, context: int) -> None:
        """Prefill up to `context` tokens (earlier decode steps count), then one untimed decode step."""
        cache = self.cache
        if cache.pos < context:
            idx = torch.randint(0, self.model.config.vocab_size, (self.batch, context - cache.pos))
            self.token = self.model(idx.to(self.device), cache=cache)[:, -1:].argmax(-1)
        self.token = self.decoder.step(self.token, cache).argmax(-1, keepdim=True)
        self.held, self.rounds_s = cache.pos, []

    @torch.inference_mode()
    def time(self, steps: int) -> None:
        _sync(self.device)
        t0 = CLOCK[0]()
        for _ in range(steps):
            self.token = self.decoder.step(self.token, self.cache).argmax(-1, keepdim=True)
        _sync(self.device)
        self.rounds_s.append((CLOCK[0]() - t0) / steps)

    def row(self, steps: int, bandwidth: float) -> dict:
        sec = min(self.rounds_s)  # the best round: other processes on shared cores only ever slow a step
        held = self.held + len(self.rounds_s) * steps // 2  # the mean tokens held while timed
        stored = self.model.kv_cache_bytes(self.batch, held, self.dtype)
        kv_read = kv_bytes_read(self.model, self.batch, held, self.dtype)
        roof = (self.w_bytes + kv_read) / bandwidth
        return {
            "context": self.held, "step_ms": sec * 1e3, "tokens_per_s": self.batch / sec,
            "weight_bytes": self.w_bytes, "kv_bytes_read": kv_read, "kv_bytes_stored": stored,
            "roofline_ms": roof * 1e3,
            "roofline_fraction": roof / sec, "round_ms": [t * 1e3 for t in self.rounds_s],
        }  # fmt: skip


def sweep(runs: dict[str, Run], contexts: list[int], steps: int, rounds: int, bandwidth: float):
    """Grow every structure's cache through the contexts; at each, `rounds` rounds in which every
    structure times `steps` decode steps in turn, so load from other jobs falls on all of them alike."""
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for context in contexts:
        for run in runs.values():
            run.advance(context)
        for _ in range(rounds):
            for run in runs.values():
                run.time(steps)
        for name, run in runs.items():
            r = run.row(steps, bandwidth)
            results[name].append(r)
            print(f"{name:<14} {r['context']:>7} {r['step_ms']:>8.2f} {r['tokens_per_s']:>9.1f} "
                  f"{r['roofline_ms']:>8.2f} {r['roofline_fraction']:>7.2f} {r['kv_bytes_read'] / 2**20:>11.1f}",  # noqa: E501
                  flush=True)  # fmt: skip
    return results


def check_targets(longest: dict[str, dict]) -> dict:
    """Issue 11's targets at the longest context: every structure >= 0.5 of its roofline, MLA >= GQA, and
    MQA, MLKV faster than GQA faster than MHA (which read fewer bytes than each other in that order)."""
    targets: dict[str, dict] = {}
    for name, r in longest.items():
        targets[f"{name} >= 0.5 of roofline"] = {
            "value": r["roofline_fraction"],
            "met": r["roofline_fraction"] >= 0.5,
        }
    tps = {name: r["tokens_per_s"] for name, r in longest.items()}
    mlkv = next((n for n in tps if n.startswith("mlkv")), None)
    pairs = [("mla", "gqa", 1.0), ("mqa", "gqa", None), (mlkv, "gqa", None), ("gqa", "mha", None)]
    for fast, slow, at_least in pairs:
        if fast in tps and slow in tps:
            ratio = tps[fast] / tps[slow]
            key = f"{fast} >= 1.0x {slow}" if at_least else f"{fast} faster than {slow}"
            targets[key] = {"value": ratio, "met": ratio >= 1.0 if at_least else ratio > 1.0}
    by_bytes = sorted(longest, key=lambda n: longest[n]["weight_bytes"] + longest[n]["kv_bytes_read"])
    print("fewest bytes read first: " + ", ".join(f"{n} {tps[n]:.1f} t/s" for n in by_bytes))
    for key, t in targets.items():
        print(f"target (issue 11) {key}: {t['value']:.2f}: {'met' if t['met'] else 'NOT met'}")
    return targets


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in results.items():
        ctx = [r["context"] for r in rows]
        a.plot(ctx, [r["tokens_per_s"] for r in rows], marker="o", label=name)
        b.plot(ctx, [r["roofline_fraction"] for r in rows], marker="o", label=name)
    for ax, label in ((a, "tokens/s (batch 1)"), (b, "fraction of the memory roofline")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens held)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    b.axhline(1.0, color="k", lw=0.8)
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--structures", nargs="+", default=list(STRUCTURES), help="attention presets")
    p.add_argument("--contexts", nargs="+", type=int, default=[256, 1024, 4096])
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per context")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds per context; the best counts")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--family", default="gpt2", choices=["gpt2", "neox", "llama"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time (1 thread)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="time the compiled decode step")
    p.add_argument("--gemv", action="store_true", help="also time batch-1 GEMVs of the model's Linear "
                   "shapes in both layouts (why kvlab.decode re-lays out wide-output weights)")  # fmt: skip
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    if args.compile:
        allow_many_compiled_models()
    CLOCK[0] = threads_and_clock(p, args)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device)
    env = environment_info()
    env |= {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    env["load_avg_1m"] = os.getloadavg()[0]
    env["git_dirty"] = _git_dirty()
    print(f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads, commit "
          f"{(env['git_commit'] or '?')[:7]}, copy bandwidth {bandwidth / 1e9:.1f} GB/s")  # fmt: skip
    print(f"{'structure':<14} {'context':>7} {'ms/step':>8} {'tokens/s':>9} {'roof ms':>8} {'of roof':>7} "
          f"{'KV MiB read':>11}")  # fmt: skip
    block = max(args.contexts) + (args.rounds * args.steps + 2) * len(args.contexts) + 2
    shape = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, vocab_size=args.vocab_size)
    gemv = None
    if args.gemv:
        print("batch-1 GEMV from memory, per Linear shape of the mha and mla models:")
        gemv = []
        for name in ("mha", "mla"):
            cfg = ModelConfig.from_dict(dict(shape, family=args.family, block_size=block, attention=name))
            gemv += gemv_layouts(GPT(cfg).to(device=device, dtype=dtype), device)
    runs = {}
    for name in args.structures:
        cfg = ModelConfig.from_dict(dict(shape, family=args.family, block_size=block, attention=name))
        model = GPT(cfg).to(device=device, dtype=dtype).eval()
        runs[name] = Run(model, block, args.batch_size, dtype, device, args.compile)
    results = sweep(runs, sorted(args.contexts), args.steps, args.rounds, bandwidth)
    longest = {name: rows[-1] for name, rows in results.items()}
    if "gqa" in longest:
        base = longest["gqa"]["tokens_per_s"]
        print(f"\nat context {max(args.contexts)}: tokens/s relative to gqa: " + ", ".join(
            f"{n} {r['tokens_per_s'] / base:.2f}" for n, r in longest.items()))  # fmt: skip
    targets = check_targets(longest)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    commit = (env["git_commit"] or "nocommit")[:7]
    stem = f"decode_roofline_{device.type}_{commit}{args.tag}"
    payload = {"benchmark": "decode_roofline", "settings": vars(args), "environment": env,
               "copy_bandwidth_bytes_per_s": bandwidth, "dtype": str(dtype), "results": results,
               "targets": targets, "gemv": gemv}  # fmt: skip
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(results, out_dir / f"{stem}.png")
    print(f"wrote {out_dir / stem}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
