"""Decode speed and cache bytes per KV structure, sweeping batch size and context length; and kvlab's
cached generation against HF transformers' `generate` on the same shape (`--vs-hf`).

For each model shape, attention preset, batch size and context length: prefill `context` tokens into a
fresh cache, then time `--new-tokens` cached greedy decode steps (tokens/s = batch x steps / seconds)
through kvlab's decode fast path (`kvlab.decode.Decoder`, what `generate` runs); the cache's measured
bytes are checked against the analytic figure. Cache-free generation (seed 000: each step reruns the
whole cropped context) is timed at batch 1 for comparison. Weights are random: speed does not depend on
them. Runs on CUDA in bf16 when available, else CPU float32.

`--vs-hf`: kvlab's `generate` against `transformers`' `generate` (greedy, exactly `--hf-new-tokens` new
tokens after a `--hf-prompt`-token prompt, batch 1, random weights), rounds interleaved, the best round
counts, whole calls timed (prefill included): kvlab mha against GPT2LMHeadModel of the same shape, and
kvlab's Llama-family MQA against LlamaForCausalLM with one KV head. With `--clock cpu` (1 thread) the
process's CPU seconds are timed, which other jobs on shared cores do not inflate.

    python benchmarks/decode_speed.py                       # cpu-tiny + gpt2-124m, default sweep
    python benchmarks/decode_speed.py --shapes cpu-tiny --batch-sizes 1 --contexts 64 --quick
    python benchmarks/decode_speed.py --vs-hf --threads 1 --clock cpu   # issue 11's target: >= 3x
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from _setup import allow_many_compiled_models, threads_and_clock

from kvlab import GPT, ModelConfig
from kvlab.checkpoint import environment_info
from kvlab.decode import Decoder
from kvlab.errors import KvlabError
from kvlab.generate import generate

# perf_counter by default; --clock cpu: this process's CPU seconds (1 thread on shared cores)
CLOCK = [time.perf_counter]

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
def cached_decode(
    model: GPT, batch: int, context: int, steps: int, dtype, device, compile=False, static=False
) -> dict:
    """Prefill `context` random tokens, then time `steps` single-token decode steps over the cache.

    The steps run through `Decoder.step`; a compiled one gets 3 untimed warm-up steps first, so
    compilation is not counted.
    """
    decoder = Decoder(model, compile=compile, static=static)
    warm = 3 if compile else 0
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
        token = decoder.step(token, cache).argmax(-1, keepdim=True)  # (B, 1)
    _sync(device)
    t1w = time.perf_counter()
    for _ in range(steps):
        token = decoder.step(token, cache).argmax(-1, keepdim=True)  # (B, 1)
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
            warm_up = (model, 1, min(contexts), 2, dtype, device, args.compile, args.static)
            cached_decode(*warm_up)  # allocator, kernels (and compilation)
            for context in contexts:
                for batch in batches:
                    r = cached_decode(
                        model, batch, context, args.new_tokens, dtype, device, args.compile, args.static
                    )
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


# ---- kvlab generate against transformers' generate ----------------------------------------------
def hf_pairs(args) -> list[tuple[str, GPT, torch.nn.Module]]:
    """(label, kvlab model, transformers model of the same shape), both with random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    shape = dict(n_layer=args.hf_layers, n_head=args.hf_heads, n_embd=args.hf_width, block_size=args.hf_block,
                 vocab_size=args.hf_vocab)  # fmt: skip
    pairs = []
    cfg = ModelConfig.from_dict(dict(shape, family="gpt2", attention="mha"))
    hf_cfg = GPT2Config(
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.block_size,
        vocab_size=cfg.vocab_size, bos_token_id=0, eos_token_id=None, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    hf_cfg._attn_implementation = "sdpa"
    pairs.append(("mha / GPT2LMHeadModel", GPT(cfg), GPT2LMHeadModel(hf_cfg)))
    cfg = ModelConfig.from_dict(dict(shape, family="llama", attention="mqa"))
    hf_cfg = LlamaConfig(
        hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_width, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=1, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.block_size, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=bool(cfg.tie_embeddings), bos_token_id=0, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    hf_cfg._attn_implementation = "sdpa"
    pairs.append(("mqa / LlamaForCausalLM 1 KV head", GPT(cfg), LlamaForCausalLM(hf_cfg)))
    return pairs


def vs_hf(args) -> dict:
    """Whole-call tokens/s of kvlab's generate and transformers' generate, interleaved round by round."""
    torch.manual_seed(0)
    prompt, new = args.hf_prompt, args.hf_new_tokens
    idx = torch.randint(0, args.hf_vocab, (1, prompt))
    mask = torch.ones_like(idx)

    def kvlab_call(model, compile=False):
        def run():
            out = generate(model, idx, new, compile=compile).tokens
            assert out.shape == (1, prompt + new)

        return run

    def hf_call(model):
        @torch.inference_mode()
        def run():
            out = model.generate(idx, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False)  # fmt: skip
            assert out.shape == (1, prompt + new)

        return run

    rows = []
    print(f"\nkvlab generate vs transformers generate: {args.hf_layers} layers x {args.hf_width} wide, "
          f"{args.hf_heads} heads, vocab {args.hf_vocab}, prompt {prompt} + {new} new tokens, batch 1, "
          f"{torch.get_num_threads()} thread(s), {args.clock} clock, best of {args.hf_rounds}")  # fmt: skip
    print(f"{'pair':<34} {'kvlab t/s':>10} {'HF t/s':>8} {'kvlab/HF':>9}" + (
        f" {'compiled t/s':>13} {'compiled/HF':>11}" if args.compile else ""))  # fmt: skip
    for label, kv_model, hf_model in hf_pairs(args):
        kv_model.eval(), hf_model.eval()
        calls = {"kvlab": kvlab_call(kv_model), "hf": hf_call(hf_model)}
        if args.compile:
            calls["kvlab_compiled"] = kvlab_call(kv_model, compile=True)
        for run in calls.values():  # warm-up (and compilation) excluded
            run()
        times = {name: [] for name in calls}
        for _ in range(args.hf_rounds):
            for name, run in calls.items():
                t0 = CLOCK[0]()
                run()
                times[name].append(CLOCK[0]() - t0)
        tps = {name: new / min(t) for name, t in times.items()}
        row = {
            "pair": label,
            "tokens_per_s": tps,
            "round_s": times,
            "kvlab_over_hf": tps["kvlab"] / tps["hf"],
        }
        if args.compile:
            row["compiled_over_hf"] = tps["kvlab_compiled"] / tps["hf"]
        rows.append(row)
        print(f"{label:<34} {tps['kvlab']:>10.1f} {tps['hf']:>8.1f} {row['kvlab_over_hf']:>9.2f}" + (
            f" {tps['kvlab_compiled']:>13.1f} {row['compiled_over_hf']:>11.2f}" if args.compile else ""),
            flush=True)  # fmt: skip
    first = rows[0]["kvlab_over_hf"]
    verdict = "met" if first >= 3.0 else "NOT met"
    print(
        f"target (issue 11): kvlab >= 3x HF generate at batch 1: {first:.2f}x on {rows[0]['pair']}: {verdict}"
    )
    return {"rows": rows, "target_3x_met": first >= 3.0}


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
    p.add_argument(
        "--static", action="store_true",
        help="static decode steps (whole cache, masked; with --compile on a GPU: CUDA graphs, as gpt-fast)",
    )  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/decode_speed_<device>.json)"
    )
    p.add_argument("--vs-hf", action="store_true", help="kvlab generate against transformers' generate")
    p.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time (1 thread)"
    )
    p.add_argument("--hf-layers", type=int, default=4)
    p.add_argument("--hf-width", type=int, default=256)
    p.add_argument("--hf-heads", type=int, default=8)
    p.add_argument("--hf-vocab", type=int, default=8192)
    p.add_argument("--hf-block", type=int, default=256)
    p.add_argument("--hf-prompt", type=int, default=128)
    p.add_argument("--hf-new-tokens", type=int, default=128)
    p.add_argument("--hf-rounds", type=int, default=5)
    args = p.parse_args(argv)
    if args.compile:
        allow_many_compiled_models()
    if args.quick:
        args.new_tokens = 8
    CLOCK[0] = threads_and_clock(p, args)
    torch.manual_seed(0)
    env = environment_info()
    env["processor"] = platform.processor() or platform.machine()
    env["threads"] = torch.get_num_threads()
    env["load_avg_1m"] = os.getloadavg()[0]
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"commit {(env['git_commit'] or '?')[:7]}, load average {env['load_avg_1m']:.1f}")  # fmt: skip
    if args.vs_hf:
        from importlib.metadata import version

        env["transformers"] = version("transformers")
        result = vs_hf(args)
        commit = (env["git_commit"] or "nocommit")[:7]
        out = Path(
            args.out or Path(__file__).parent / "results" / f"decode_vs_hf_{args.device}_{commit}.json"
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": "decode_vs_hf", "settings": vars(args), "environment": env, **result}
        out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {out}")
        return 0
    print(HEADER)
    rows = run(args)
    out = Path(
        args.out or Path(__file__).parent / "results" / f"decode_speed_{torch.device(args.device).type}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"environment": env, "new_tokens": args.new_tokens, "rows": rows}, indent=2) + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
