"""`kvlab generate RUN_DIR --prompt ...`: cached decoding from a saved run, with tokens/s. Several
`--prompt` (or `--prompt-ids`) options, of any lengths, generate as one batch."""

from __future__ import annotations

import argparse

import torch

from kvlab.checkpoint import load_model, load_model_tokenizer, resolve_source
from kvlab.errors import KvlabError
from kvlab.generate import generate
from kvlab.inputs import check_device


def _encode_prompts(args, run_dir, model) -> tuple[list[list[int]], object]:
    if args.prompt_ids is not None:
        prompts = []
        for text in args.prompt_ids:
            try:
                prompts.append([int(t) for t in text.split(",") if t.strip()])
            except ValueError as e:
                raise KvlabError(
                    f"--prompt-ids {text!r}: expected comma-separated token ids, e.g. 1,2,3"
                ) from e
        return prompts, None
    tokenizer = load_model_tokenizer(run_dir, model)  # one line when it does not fit the model
    return [tokenizer.encode(text) for text in args.prompt], tokenizer


def _check_options(args) -> None:
    """Sampling options, checked before the model is loaded."""
    if args.max_new_tokens < 1:
        raise KvlabError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.top_k is not None and args.top_k < 1:
        raise KvlabError(f"--top-k {args.top_k}: must be at least 1 (or leave it out: no top-k filter)")
    if not args.temperature >= 0 or args.temperature == float("inf"):
        raise KvlabError(f"--temperature {args.temperature}: must be a finite number >= 0 (0 = greedy)")


def run(args: argparse.Namespace) -> int:
    _check_options(args)
    check_device(args.device)
    _, source_dir = resolve_source(args.run_dir)  # a run, hf:DIR or a fetchable model: tokenizer beside it
    model = load_model(source_dir, device=args.device)
    prompts, tokenizer = _encode_prompts(args, source_dir, model)
    vocab = model.config.vocab_size
    if not all(prompts):  # ids outside the vocabulary: generate's own one-line check
        raise KvlabError("a prompt is empty; pass --prompt TEXT or --prompt-ids 1,2,3")
    if args.eos_id is not None and not 0 <= args.eos_id < vocab:
        raise KvlabError(f"--eos-id {args.eos_id} is outside the model's vocabulary ({vocab} tokens)")
    eos = args.eos_id if args.eos_id is not None else getattr(tokenizer, "eot_token", None)
    result = generate(
        model,
        [torch.tensor(ids, dtype=torch.long, device=args.device) for ids in prompts],
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        eos_token=eos,
        seed=args.seed,
        compile=args.compile,
        static=args.static,
    )
    for i, (ids, row) in enumerate(zip(prompts, result.sequences())):
        new = row[len(ids) :]
        text = tokenizer.decode(new) if tokenizer is not None else ",".join(map(str, new))
        if len(prompts) > 1:
            print(f"--- [{i}]")
        print((args.prompt[i] if tokenizer is not None else "") + text)
    batch = f"batch {len(prompts)}, " if len(prompts) > 1 else ""
    print(
        f"[{result.new_tokens} tokens, {batch}prefill {result.prefill_s * 1e3:.1f} ms, "
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
    g.add_argument(
        "--prompt",
        action="append",
        help="prompt text (encoded with the run's tokenizer); repeat it to generate several as one batch",
    )
    g.add_argument(
        "--prompt-ids", action="append", help="prompt as comma-separated token ids; repeat it for a batch"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eos-id", type=int, default=None, help="stop at this token (default: the tokenizer's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the one-token decode step with torch.compile (the first steps pay the compilation; "
        "worth it on GPUs and long generations, not on a CPU: see benchmarks/README.md)",
    )
    p.add_argument(
        "--static",
        action="store_true",
        help="static decode steps (the whole cache read with a mask, the position a tensor): with "
        "--compile on a GPU they run as CUDA graphs, as gpt-fast; slower on a CPU",
    )
    p.set_defaults(func=run)
