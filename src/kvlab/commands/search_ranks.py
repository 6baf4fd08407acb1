"""`kvlab search-ranks RUN_DIR --budget 0.4`: MatryoshkaKV's greedy rank search on a saved run.

Calibration windows come from the run's dataset val split; with --out the found ranks are saved as a new
run (config carries them as per-layer overrides) that `kvlab eval` / `kvlab generate` load as usual.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from kvlab.attention.matryoshka import matryoshka_layers, ranks_config, set_ranks
from kvlab.checkpoint import load_model, names_hf_model, read_config, save_model
from kvlab.errors import KvlabError, check_output_path
from kvlab.search import greedy_rank_search


def calibration_batches(
    data_dir: str | Path, block_size: int, n_tokens: int, batch_size: int = 8
) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of block_size tokens from the start of the val split, about
    n_tokens in all (at least one window; shorter when the split is), as (B, T) int64 batches."""
    from kvlab.data import open_split

    tokens = open_split(data_dir, "val")
    T = min(block_size, len(tokens))
    n_windows = max(1, min(math.ceil(n_tokens / T), len(tokens) // T))
    windows = np.asarray(tokens[: n_windows * T], dtype=np.int64).reshape(n_windows, T)  # (N, T)
    return [torch.from_numpy(windows[i : i + batch_size].copy()) for i in range(0, n_windows, batch_size)]


def _data_dir(run_dir: str, config: dict, override: str | None) -> str:
    if override is not None:
        return override
    data_dir = (config.get("data") or {}).get("dir")
    if not data_dir:
        raise KvlabError(
            f"{Path(run_dir) / 'config.json'} names no dataset (data.dir); pass --data DATASET_DIR"
        )
    return data_dir


def _print_table(result: dict, head_dim: int) -> None:
    print(f"{'layer':>5}  {'K ranks':<24} {'V ranks':<24}")
    for i, k, v in zip(result["layers"], result["k"], result["v"]):
        print(f"{i:>5}  {' '.join(map(str, k)):<24} {' '.join(map(str, v)):<24}")
    print(
        f"kv_bytes_per_token {result['kv_bytes_per_token']:.1f} of {result['full_kv_bytes_per_token']:.1f} "
        f"at full rank (head_dim {head_dim}, bf16): ratio {result['ratio']:.3f} "
        f"(budget {result['budget']}), hidden-state error {result['error']:.4f}, {result['rounds']} rounds"
    )


def _save(out: Path, model, config: dict, run_dir: str, result: dict) -> None:
    model.config = dataclasses.replace(model.config, attention=ranks_config(model))
    extra = {k: v for k, v in config.items() if k not in ("model", "environment")}
    extra["rank_search"] = {
        "from": str(Path(run_dir).resolve()),
        **{k: result[k] for k in ("budget", "step", "ratio", "kv_bytes_per_token", "error", "rounds")},
    }
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model, extra)
    try:  # the tokenizer travels with the run so `kvlab generate OUT --prompt` works
        from kvlab.data import load_tokenizer

        load_tokenizer(run_dir).save(out)
    except (KvlabError, FileNotFoundError):  # a run without tokenizer files: token ids only
        pass


def _convert_first(source: str, what: str, spec: str | None = None) -> KvlabError:
    return KvlabError(
        f"{source} is {what}, with no MatryoshkaKV projections to search; convert it first with "
        f"`kvlab uptrain --from {spec or source} --to matryoshka --data DATA --out RUN` (or "
        "kvlab.convert.matryoshka.to_matryoshka) and search that run"
    )


def _load_source(args: argparse.Namespace):
    """(model, config.json) of the run to search. A transformers model (hf:DIR, a fetchable name) is
    refused before it is fetched or loaded: imports are never MatryoshkaKV models."""
    if names_hf_model(args.run_dir):
        from kvlab.models import MODELS

        spec = (
            args.run_dir if args.run_dir.startswith("hf:") or args.run_dir in MODELS else f"hf:{args.run_dir}"
        )
        raise _convert_first(args.run_dir, "a Hugging Face model", spec)
    config = read_config(args.run_dir)
    model = load_model(args.run_dir, device=args.device)
    if not matryoshka_layers(model):
        raise _convert_first(args.run_dir, f"a {model.config.attention.kind} model")
    return model, config


def _check_data(data_dir: str, config: dict, vocab_size: int) -> None:
    """--data (or the run's data.dir) must be a dataset tokenized like the run, with ids in its vocabulary."""
    from kvlab.data import check_compatible, read_meta

    if not Path(data_dir).is_dir():
        raise KvlabError(f"dataset {data_dir} does not exist; pass --data with the run's dataset directory")
    trained_with = (config.get("data") or {}).get("tokenizer")
    try:
        check_compatible(read_meta(data_dir), vocab_size, trained_with)
    except KvlabError as e:
        raise KvlabError(f"--data {data_dir}: {e}") from None


def run(args: argparse.Namespace) -> int:
    if args.out is not None:
        check_output_path(args.out, "--out")  # before the search, not after it
    if args.calib_tokens < 1:
        raise KvlabError(f"--calib-tokens={args.calib_tokens} must be positive")
    model, config = _load_source(args)
    data_dir = _data_dir(args.run_dir, config, args.data)
    _check_data(data_dir, config, model.config.vocab_size)
    batches = calibration_batches(data_dir, model.config.block_size, args.calib_tokens)
    top = max(int(b.max()) for b in batches)
    if top >= model.config.vocab_size:
        raise KvlabError(
            f"{data_dir} has token id {top} outside the model's vocabulary ({model.config.vocab_size}); "
            "pass the dataset the run was trained on with --data"
        )
    batches = [b.to(args.device) for b in batches]
    if args.from_full:  # MatryoshkaKV's order: train with sampled ranks, then search down from full rank
        head_dim = model.config.head_dim
        set_ranks(model, k=head_dim, v=head_dim)
    result = greedy_rank_search(
        model, batches, args.budget, step=args.step, fraction=args.fraction, progress=args.progress
    )
    _print_table(result, model.config.head_dim)
    if args.out is not None:
        _save(Path(args.out), model, config, args.run_dir, result)
        print(f"saved {args.out} (evaluate with: kvlab eval {args.out})")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "search-ranks",
        help="greedy per-head K/V rank search for a MatryoshkaKV run under a KV budget",
        description=(
            "MatryoshkaKV Algorithm 1: repeatedly lower the (layer, head, K/V) ranks whose one-step cut "
            "changes the final hidden states least on val-split calibration windows, until the KV bytes "
            "per token are at most BUDGET x the full-rank figure."
        ),
        epilog="example: kvlab search-ranks runs/matryoshka --budget 0.4 --out runs/matryoshka-40",
    )
    p.add_argument(
        "run_dir",
        help="a MatryoshkaKV run directory (convert an HF model, hf:DIR or a model name, first)",
    )
    p.add_argument("--budget", type=float, required=True, help="target KV bytes as a fraction of full rank")
    p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens from the val split")
    p.add_argument("--out", default=None, help="save a copy of the run with the found ranks here")
    p.add_argument(
        "--data",
        default=None,
        help="dataset for calibration (default: the run's data.dir; needed without one)",
    )
    p.add_argument("--step", type=int, default=None, help="rank step (default head_dim // 8)")
    p.add_argument("--fraction", type=float, default=0.1, help="share of candidates lowered per round")
    p.add_argument("--progress", action="store_true", help="print one line per round")
    p.add_argument(
        "--from-full",
        action="store_true",
        help="start from full rank (every head at head_dim) instead of the run's ranks: the search "
        "MatryoshkaKV runs after training with sampled ranks (kvlab uptrain --recipe distill)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=run)
