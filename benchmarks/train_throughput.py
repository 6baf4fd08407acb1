"""Training throughput (tokens/s) of the cpu-tiny model for each KV structure, next to nanoGPT and HF GPT-2.

Every structure and a `transformers` GPT2LMHeadModel of the same shape (layers, heads, width, context,
vocabulary; SDPA attention, no dropout) and nanoGPT's model of the same shape (`NanoGPT` below, written
here from the structure of karpathy/nanoGPT's model.py: fused c_attn, flash SDPA, GELU MLP, tied head)
run a training step (forward, CE loss, backward, clip, AdamW with kvlab's decay groups) on the same
random tokens, in the same process, all in eager mode. kvlab's models take the step kvlab.train takes
(`micro_batch_loss`: on CPU float32 the fused LM-head cross-entropy of kvlab.train.linear_ce); nanoGPT
and HF GPT-2 compute logits and F.cross_entropy, as their own training scripts do. Rounds interleave the
models so that load from other processes on a shared machine hits them all alike; the median round
counts. With `--clock cpu` (the default at 1 CPU thread) each step is timed in process CPU seconds, which
time spent descheduled by other jobs does not inflate. Prints a table and the issue-11 targets (kvlab mha
>= 1.2x nanoGPT and >= HF GPT-2) and writes JSON with the machine, versions and git commit.

    python benchmarks/train_throughput.py                          # cpu-tiny, every structure, 1 thread
    python benchmarks/train_throughput.py --structures mha --batch-size 8 --rounds 5 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from _setup import allow_many_compiled_models

from kvlab import GPT, ModelConfig
from kvlab.checkpoint import environment_info
from kvlab.config import TrainConfig
from kvlab.errors import KvlabError
from kvlab.train.optim import configure_optimizer
from kvlab.train.terms import default_terms, fused_cross_entropy_applies, micro_batch_loss

STRUCTURES = ("mha", "gqa", "mqa", "mla", "cla2", "mlkv-2", "matryoshka-8", "context-32")


def hf_gpt2(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.block_size,
        vocab_size=cfg.vocab_size, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    hf_cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(hf_cfg)


class _NanoBlock(nn.Module):
    """nanoGPT's Block: x + attn(ln_1(x)), x + mlp(ln_2(x)); attention with one fused c_attn."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, b = cfg.n_embd, cfg.bias
        self.n_head = cfg.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(C, bias=b), nn.LayerNorm(C, bias=b)
        self.c_attn, self.attn_proj = nn.Linear(C, 3 * C, bias=b), nn.Linear(C, C, bias=b)
        self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C, bias=b), nn.Linear(4 * C, C, bias=b)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(self.ln_1(x)).split(C, dim=2))  # fmt: skip
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's GPT (karpathy/nanoGPT model.py) at kvlab's shape: wte + wpe, blocks, ln_f, tied lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(_NanoBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def make_step(
    model: torch.nn.Module, kind: str, device: torch.device, autocast, amp_dtype: str, compile: bool = False
):
    """One training step of `model`: kind "kvlab" (kvlab.train's loss), "kvlab-logits" (kvlab's model
    through logits + F.cross_entropy, its step before the fused loss), "hf" or "nanogpt" (logits + CE).
    compile: the forward runs through torch.compile(model), as kvlab's train.compile and nanoGPT's
    compile=True do (the loss, backward and optimizer stay eager)."""
    optimizer = configure_optimizer(model, TrainConfig(), device.type)
    forward = torch.compile(model) if compile else model
    terms = default_terms()
    fused = kind == "kvlab" and fused_cross_entropy_applies(terms, model, device, amp_dtype)

    def step(x, y):
        with autocast():
            if kind.startswith("kvlab"):
                loss = micro_batch_loss(forward, model, terms, x, y, fused)
            else:
                logits = forward(x).logits if kind == "hf" else forward(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu-tiny")
    p.add_argument("--structures", nargs="+", default=list(STRUCTURES))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=8192, help="the bpe-8k tokenizer's vocabulary")
    p.add_argument("--steps", type=int, default=4, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadiest on shared cores)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers GPT-2 reference")
    p.add_argument("--no-nanogpt", action="store_true", help="skip the nanoGPT reference")
    p.add_argument("--n-embd", type=int, default=None, help="override the preset's width (e.g. 256)")
    p.add_argument(
        "--no-logits-row", dest="logits_row", action="store_false",
        help="skip kvlab mha through logits + F.cross_entropy (its training step before the fused loss)",
    )  # fmt: skip
    p.add_argument(
        "--clock", choices=["auto", "wall", "cpu"], default="auto",
        help="cpu: process CPU seconds (needs 1 CPU thread); auto: cpu at 1 CPU thread, else wall",
    )  # fmt: skip
    p.add_argument(
        "--compile", action="store_true",
        help="every model's forward through torch.compile (the issue's GPU target: bf16 + compile)",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="JSON path (default results/train_throughput_<dev>_<commit>)")
    args = p.parse_args()
    if args.compile:
        allow_many_compiled_models()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    one_cpu_thread = device.type == "cpu" and torch.get_num_threads() == 1
    if args.clock == "cpu" and not one_cpu_thread:
        p.error("--clock cpu measures one CPU thread: add --threads 1 (and run on the CPU)")
    clock = time.process_time if args.clock == "cpu" or (args.clock == "auto" and one_cpu_thread) else None
    clock_name = "cpu" if clock is not None else "wall"
    clock = clock or time.perf_counter
    amp_dtype = "bfloat16" if device.type == "cuda" else "float32"
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if device.type == "cuda"
        else (lambda: torch.autocast("cpu", enabled=False))
    )
    overrides = {"vocab_size": args.vocab_size} | ({"n_embd": args.n_embd} if args.n_embd else {})
    torch.manual_seed(0)
    models: dict[str, tuple] = {}
    for name in args.structures:
        try:
            cfg = ModelConfig.preset(args.preset, attention=name, **overrides)
        except KvlabError as e:  # a structure not built in this checkout
            print(f"skip {name}: {e}")
            continue
        model = GPT(cfg).to(device).train()
        models[name] = (
            model,
            make_step(model, "kvlab", device, autocast, amp_dtype, args.compile),
            model.kv_metrics(),
        )
        if name == "mha" and args.logits_row:
            twin = GPT(cfg).to(device).train()
            twin_step = make_step(twin, "kvlab-logits", device, autocast, amp_dtype, args.compile)
            models["mha, logits + CE"] = (twin, twin_step, twin.kv_metrics())
    cfg = ModelConfig.preset(args.preset, attention="mha", **overrides)
    if not args.no_nanogpt:
        nano = NanoGPT(cfg).to(device).train()
        models["nanoGPT"] = (
            nano,
            make_step(nano, "nanogpt", device, autocast, amp_dtype, args.compile),
            None,
        )
    if not args.no_hf:
        hf = hf_gpt2(cfg).to(device).train()
        models["HF GPT2LMHeadModel"] = (
            hf,
            make_step(hf, "hf", device, autocast, amp_dtype, args.compile),
            None,
        )

    T = cfg.block_size
    xy = torch.randint(0, args.vocab_size, (args.batch_size, T + 1), device=device)
    x, y = xy[:, :-1], xy[:, 1:]
    for _, step, _ in models.values():  # warm-up: allocator, kernels, optimizer state
        step(x, y)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, (_, step, _) in models.items():
            sync(device)
            t0 = clock()
            for _ in range(args.steps):
                step(x, y)
            sync(device)
            times[name].append((clock() - t0) / args.steps)

    tokens_per_step = args.batch_size * T
    rows = []
    for name, (model, _, kv) in models.items():
        sec = statistics.median(times[name])
        rows.append({
            "model": name,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "kv_bytes_per_token": kv["kv_bytes_per_token"] if kv else None,
            "ms_per_step": sec * 1e3,
            "tokens_per_s": tokens_per_step / sec,
            "step_times_ms": [t * 1e3 for t in times[name]],
        })  # fmt: skip
    ref = next((r["tokens_per_s"] for r in rows if r["model"] == "mha"), None)
    nano = next((r["tokens_per_s"] for r in rows if r["model"] == "nanoGPT"), None)
    hf = next((r["tokens_per_s"] for r in rows if r["model"] == "HF GPT2LMHeadModel"), None)
    for r in rows:
        r["vs_nanogpt"] = r["tokens_per_s"] / nano if nano else None
        r["vs_hf_gpt2"] = r["tokens_per_s"] / hf if hf else None
    print(
        f"\ntraining throughput, {args.preset} shape (n_embd {cfg.n_embd}), batch {args.batch_size} x {T} "
        f"tokens, vocab {args.vocab_size}, {device.type}"
        + (f", {args.threads} thread(s)" if device.type == "cpu" else "")
        + f", {clock_name} clock, median of {args.rounds} rounds x {args.steps} steps"
        + (", compiled" if args.compile else ", eager")
    )
    print(f"{'model':<20} {'params (M)':>10} {'KV B/tok':>9} {'ms/step':>9} {'tokens/s':>9} {'vs mha':>7} "
          f"{'vs nanoGPT':>10} {'vs HF':>6}")  # fmt: skip
    for r in rows:
        kvb = f"{r['kv_bytes_per_token']:.0f}" if r["kv_bytes_per_token"] is not None else "-"
        rel = f"{r['tokens_per_s'] / ref:.2f}" if ref else "-"
        vs_nano, vs_hf = (f"{v:.2f}" if v else "-" for v in (r["vs_nanogpt"], r["vs_hf_gpt2"]))
        print(f"{r['model']:<20} {r['params_M']:>10.2f} {kvb:>9} {r['ms_per_step']:>9.1f} "
              f"{r['tokens_per_s']:>9.0f} {rel:>7} {vs_nano:>10} {vs_hf:>6}")  # fmt: skip
    targets = {}
    if ref and nano:
        targets["mha_vs_nanogpt"] = {"ratio": ref / nano, "target": 1.2, "met": ref / nano >= 1.2}
    if ref and hf:
        targets["mha_vs_hf_gpt2"] = {"ratio": ref / hf, "target": 1.0, "met": ref / hf >= 1.0}
    for name, t in targets.items():
        verdict = "met" if t["met"] else "NOT met"
        print(f"target (issue 11) {name}: {t['ratio']:.2f}x (>= {t['target']}): {verdict}")
    env = environment_info() | {"transformers": _version("transformers")}
    commit = (env["git_commit"] or "nocommit")[:7]
    out = Path(
        args.out or Path(__file__).parent / "results" / f"train_throughput_{device.type}_{commit}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "train_throughput",
        "settings": vars(args)
        | {"device": str(device), "block_size": T, "n_embd": cfg.n_embd, "clock": clock_name},
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "load_avg_1m": os.getloadavg()[0],  # other processes on a shared machine slow every row
        },
        "environment": env,
        "rows": rows,
        "targets": targets,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


if __name__ == "__main__":
    main()
