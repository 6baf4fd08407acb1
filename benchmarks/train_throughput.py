"""Training throughput (tokens/s) of the cpu-tiny model for each KV structure, next to HF GPT-2.

Every structure and a `transformers` GPT2LMHeadModel of the same shape (layers, heads, width, context,
vocabulary; SDPA attention, no dropout) run the same training step (forward, CE loss, backward, clip,
AdamW with kvlab's decay groups) on the same random tokens, in the same process. Rounds interleave the
models so that load from other processes on a shared machine hits them all alike; the median round
counts. Prints a table and writes JSON with the machine, versions and git commit.

    python benchmarks/train_throughput.py                          # cpu-tiny, every structure, 1 thread
    python benchmarks/train_throughput.py --structures mha gqa --rounds 3 --steps 3
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
import torch.nn.functional as F

from kvlab import GPT, ModelConfig
from kvlab.checkpoint import environment_info
from kvlab.config import TrainConfig
from kvlab.errors import KvlabError
from kvlab.train.optim import configure_optimizer

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


def make_step(model: torch.nn.Module, is_hf: bool, device: torch.device, autocast):
    optimizer = configure_optimizer(model, TrainConfig(), device.type)

    def step(x, y):
        with autocast():
            logits = model(x).logits if is_hf else model(x)
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
    p.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if device.type == "cuda"
        else (lambda: torch.autocast("cpu", enabled=False))
    )
    torch.manual_seed(0)
    models: dict[str, tuple] = {}
    for name in args.structures:
        try:
            cfg = ModelConfig.preset(args.preset, attention=name, vocab_size=args.vocab_size)
        except KvlabError as e:  # a structure not built in this checkout
            print(f"skip {name}: {e}")
            continue
        model = GPT(cfg).to(device).train()
        models[name] = (model, make_step(model, False, device, autocast), model.kv_metrics())
    if not args.no_hf:
        cfg = ModelConfig.preset(args.preset, attention="mha", vocab_size=args.vocab_size)
        hf = hf_gpt2(cfg).to(device).train()
        models["HF GPT2LMHeadModel"] = (hf, make_step(hf, True, device, autocast), None)

    T = cfg.block_size
    xy = torch.randint(0, args.vocab_size, (args.batch_size, T + 1), device=device)
    x, y = xy[:, :-1], xy[:, 1:]
    for _, step, _ in models.values():  # warm-up: allocator, kernels, optimizer state
        step(x, y)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, (_, step, _) in models.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(x, y)
            sync(device)
            times[name].append((time.perf_counter() - t0) / args.steps)

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
    print(
        f"\ntraining throughput, {args.preset} shape, batch {args.batch_size} x {T} tokens, "
        f"vocab {args.vocab_size}, {device.type}"
        + (f", {args.threads} thread(s)" if device.type == "cpu" else "")
    )
    print(f"{'model':<20} {'params (M)':>10} {'KV B/tok':>9} {'ms/step':>9} {'tokens/s':>9} {'vs mha':>7}")
    for r in rows:
        kvb = f"{r['kv_bytes_per_token']:.0f}" if r["kv_bytes_per_token"] is not None else "-"
        rel = f"{r['tokens_per_s'] / ref:.2f}" if ref else "-"
        print(f"{r['model']:<20} {r['params_M']:>10.2f} {kvb:>9} {r['ms_per_step']:>9.1f} "
              f"{r['tokens_per_s']:>9.0f} {rel:>7}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "train_throughput",
        "settings": vars(args) | {"device": str(device), "block_size": T},
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "load_avg_1m": os.getloadavg()[0],  # other processes on a shared machine slow every row
        },
        "environment": environment_info() | {"transformers": _version("transformers")},
        "rows": rows,
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
