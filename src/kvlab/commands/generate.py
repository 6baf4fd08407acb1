"""`kvlab generate RUN_DIR --prompt ...`: cached decoding from a saved run, with tokens/s."""

from __future__ import annotations

import argparse

import torch

from kvlab.checkpoint import load_model, resolve_source
from kvlab.errors import KvlabError
from kvlab.generate import generate


def _encode_prompt(args, run_dir):
    if args.prompt_ids is not None:
        return [int(t) for t in args.prompt_ids.split(",") if t.strip()], None
    try:
        from kvlab.data import load_tokenizer
    except ImportError as e:  # pragma: no cover - data package always ships
        raise KvlabError("text prompts need kvlab.data; pass --prompt-ids instead") from e
    tokenizer = load_tokenizer(run_dir)
    return tokenizer.encode(args.prompt), tokenizer


def run(args: argparse.Namespace) -> int:
    _, source_dir = resolve_source(args.run_dir)  # a run, hf:DIR or a fetchable model: tokenizer beside it
    model = load_model(source_dir, device=args.device)
    ids, tokenizer = _encode_prompt(args, source_dir)
    if not ids:
        raise KvlabError("the prompt is empty; pass --prompt TEXT or --prompt-ids 1,2,3")
    vocab = model.config.vocab_size
    if max(ids) >= vocab:
        raise KvlabError(f"prompt token id {max(ids)} is outside the model's vocabulary ({vocab} tokens)")
    idx = torch.tensor([ids], dtype=torch.long, device=args.device)
    eos = args.eos_id if args.eos_id is not None else getattr(tokenizer, "eot_token", None)
    result = generate(
        model,
        idx,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        eos_token=eos,
        seed=args.seed,
    )
    new = result.tokens[0, len(ids) :].tolist()
    text = tokenizer.decode(new) if tokenizer is not None else ",".join(map(str, new))
    print((args.prompt if tokenizer is not None else "") + text)
    print(
        f"[{result.new_tokens} tokens, prefill {result.prefill_s * 1e3:.1f} ms, "
        f"decode {result.tokens_per_s:.1f} tokens/s, cache {result.cache_bytes / 1024:.1f} KiB]",
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a trained run with the KV cache",
        description="Prefill the prompt, then decode token by token over the model's reduced KV cache.",
        epilog='example: kvlab generate runs/gqa --prompt "ROMEO:" --max-new-tokens 100 --temperature 0.8',
    )
    p.add_argument("run_dir", help="a run directory, hf:DIR, or a fetchable model name (kvlab models list)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text (encoded with the run's tokenizer)")
    g.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eos-id", type=int, default=None, help="stop at this token (default: the tokenizer's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=run)
