"""`evaluate`: every metric of design.md for one run (or model), as one flat-keyed dict, and its table.

The top-level keys are the contract (val_loss, heldout_loss, kv_bytes_per_token, ..., measured_cache_bytes,
generation_toks_per_s); per-corpus details (word/byte perplexity, bits per byte, LAMBADA accuracy and
perplexity) live under `corpora[NAME]`. heldout_loss is the unweighted mean of the corpora's losses
(seed 000's 345M version; one corpus: its loss) and `heldout_losses` holds each corpus's. Zero-shot
tasks (kvlab.eval.tasks), when asked for, sit under `tasks[NAME]` (acc, acc_norm, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvlab.checkpoint import check_tokenizer, load_model, read_run_config, resolve_source
from kvlab.errors import KvlabError
from kvlab.eval.cloze import lambada_metrics
from kvlab.eval.corpora import CLOZE_SIZE, DEFAULT_CORPUS, CorpusError, HeldoutCorpus, resolve_corpus
from kvlab.eval.lm import EvalError, document_perplexity, heldout_loss, val_loss
from kvlab.eval.speed import generation_speed, measure_cache_bytes, nocache_speed, peak_generation_memory
from kvlab.train.batches import VAL_SEED_OFFSET

HF_EVAL_CONTEXT = 1024  # context of held-out scoring for imported models (hf:DIR, fetched models)

CONTRACT_KEYS = (
    "val_loss",
    "heldout_loss",
    "kv_bytes_per_token",
    "kv_bytes_per_token_total",
    "head_sharing_ratio",
    "layer_sharing_ratio",
    "latent_rank_ratio",
    "measured_cache_bytes",
    "measured_cache_bytes_per_token",
    "generation_toks_per_s",
)


def _run_context(run_dir: Path, device) -> dict[str, Any]:
    """Model, tokenizer, dataset dir and eval settings of a run directory (or an HF model: hf:DIR, a
    fetchable model's name), whose tokenizer sits beside its weights."""
    kind, run_dir = resolve_source(run_dir)
    config = read_run_config(run_dir) if kind == "run" else {}
    model = load_model(run_dir, device=device)
    train, data_cfg = config.get("train") or {}, config.get("data") or {}
    tokenizer, tokenizer_error = None, None
    try:  # a run without a tokenizer still gets every token-level metric
        from kvlab.data import load_tokenizer

        tokenizer = load_tokenizer(run_dir)
    except (ImportError, KvlabError) as e:
        tokenizer_error = str(e)
    else:  # one that does not fit the model is refused here, not blamed on a corpus later
        check_tokenizer(tokenizer, model, run_dir, config)
    return {
        "kind": kind,
        "model": model,
        "tokenizer": tokenizer,
        "tokenizer_error": tokenizer_error,
        "dataset_dir": data_cfg.get("dir"),
        "data_tokenizer": data_cfg.get("tokenizer"),
        # A run is scored at its training context; an imported model at most at HF_EVAL_CONTEXT tokens,
        # since a pretrained model's full window (SmolLM2: 8192) makes CPU scoring impractically slow.
        "block_size": train.get("block_size") or min(model.config.block_size, HF_EVAL_CONTEXT),
        "batch_size": train.get("batch_size", 8),
        "eval_iters": train.get("eval_iters", 200),
        "val_seed": train.get("seed", 0) + VAL_SEED_OFFSET,  # the batches training scored
    }


def _val_tokens(dataset_dir) -> np.ndarray | None:
    if dataset_dir is None or not Path(dataset_dir).is_dir():
        return None
    from kvlab.data import open_split

    return np.asarray(open_split(dataset_dir, "val"))


def score_corpus(
    model, tokenizer, corpus: HeldoutCorpus, block_size: int, batch_size: int = 8, limit: int | None = None
) -> dict[str, Any]:
    """heldout_loss, document perplexities and cloze metrics of one corpus (whatever it provides)."""
    out: dict[str, Any] = {}
    if corpus.tokens is not None:
        vocab = model.config.vocab_size
        top = int(np.max(corpus.tokens)) if len(corpus.tokens) else 0
        if top >= vocab:
            raise CorpusError(
                f"--heldout {corpus.name}: token id {top} is outside the model's vocabulary ({vocab}); "
                "the corpus was tokenized with a different tokenizer"
            )
        out["heldout_loss"] = heldout_loss(model, corpus.tokens, block_size, batch_size, max_windows=limit)
        out["heldout_tokens"] = len(corpus.tokens)
    if corpus.documents and tokenizer is not None:
        docs = corpus.documents[:limit] if limit else corpus.documents
        out.update(document_perplexity(model, tokenizer, docs, block_size, detokenize=corpus.detokenize))
    if corpus.passages and tokenizer is not None:
        passages = corpus.passages[:limit] if limit else corpus.passages
        out.update(lambada_metrics(model, tokenizer, passages, block_size))
        out["lambada_source"] = corpus.passages_source
    out.update(corpus.info)
    return out


def evaluate(
    run_dir_or_model,
    heldout: list[str | HeldoutCorpus] | None = None,
    *,
    tokenizer=None,
    dataset_dir: str | Path | None = None,
    val_tokens=None,
    block_size: int | None = None,
    batch_size: int | None = None,
    eval_iters: int | None = None,
    speed: bool = True,
    nocache: bool = False,
    limit: int | None = None,
    cloze_size: int = CLOZE_SIZE,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    tasks: str | list[str] | None = None,
    task_limit: int | None = None,
    cache: bool | None = None,
) -> dict[str, Any]:
    """All metrics of a run directory (or a GPT with explicit data) as one dict (design.md, Metrics).

    heldout: corpus names (see kvlab.eval.corpora; default ["heldout"], the run's own dataset split) or
    HeldoutCorpus objects; heldout_loss is the unweighted mean of their losses. tasks: zero-shot
    tasks ("arc_easy,piqa" or NAME=PATH, see kvlab.eval.tasks), task_limit their documents. limit
    caps windows, documents and passages per corpus (quick looks); speed=False skips tokens/s and
    peak memory; nocache also times seed 000's cache-free generation. Metrics not computable are None.
    seed: of the val batches and the cloze set; None = the val batches training scored (so val_loss
    equals the run's last one on the same device) and cloze seed 0.
    cache: measure the cache and time cached generation; None = where the model has one (an attention
    file's SeedGPT without kvlab's cache interface has none: its cache metrics and speed are skipped).
    """
    if isinstance(run_dir_or_model, (str, Path)):
        ctx = _run_context(Path(run_dir_or_model), device)
        run_dir = str(run_dir_or_model)
    else:
        model = run_dir_or_model
        ctx = {
            "model": model,
            "tokenizer": None,
            "tokenizer_error": None,
            "dataset_dir": None,
            "data_tokenizer": None,
            "block_size": model.config.block_size,
            "batch_size": 8,
            "eval_iters": 200,
            "val_seed": 0,
        }
        run_dir = None
    model = ctx["model"].eval()
    tokenizer = tokenizer or ctx["tokenizer"]
    dataset_dir = dataset_dir or ctx["dataset_dir"]
    block_size = min(block_size or ctx["block_size"], model.config.block_size)
    batch_size, eval_iters = batch_size or ctx["batch_size"], eval_iters or ctx["eval_iters"]
    if not heldout and dataset_dir is None and ctx.get("kind") == "hf":
        raise CorpusError(
            f"{run_dir} is a pretrained model with no dataset of its own; name what to score with --heldout "
            "(e.g. shakespeare, sotu, a .txt file or folder, or a dataset made by `kvlab data prepare "
            f"--tokenizer {run_dir}`)"
        )
    heldout = list(heldout) if heldout else [DEFAULT_CORPUS]

    val_seed = ctx["val_seed"] if seed is None else seed
    seed = 0 if seed is None else seed
    corpora: list[HeldoutCorpus] = []
    for h in heldout:
        if isinstance(h, HeldoutCorpus):
            corpora.append(h)
            continue
        if h != DEFAULT_CORPUS and not Path(h).is_dir() and tokenizer is None:
            raise CorpusError(
                f"--heldout {h} needs the run's tokenizer ({ctx['tokenizer_error'] or 'none given'})"
            )
        corpora.append(resolve_corpus(h, dataset_dir, tokenizer, cloze_size, seed, ctx["data_tokenizer"]))

    result: dict[str, Any] = {"run_dir": run_dir, "params": model.num_params(), "block_size": block_size}
    if val_tokens is None:
        val_tokens = _val_tokens(dataset_dir)
    generator = torch.Generator().manual_seed(val_seed)
    result["val_seed"] = val_seed
    result["val_loss"] = (
        val_loss(model, val_tokens, block_size, batch_size, eval_iters, generator)
        if val_tokens is not None
        else None
    )
    details = {c.name: score_corpus(model, tokenizer, c, block_size, batch_size, limit) for c in corpora}
    losses = {name: d["heldout_loss"] for name, d in details.items() if d.get("heldout_loss") is not None}
    result["heldout_corpus"] = corpora[0].name if len(corpora) == 1 else "+".join(details)
    result["heldout_loss"] = sum(losses.values()) / len(losses) if losses else None
    result["heldout_losses"] = losses
    result.update(model.kv_metrics())

    # A real prompt for the cache and speed measurements: held-out tokens, else validation tokens.
    prompt_source = next(
        (c.tokens for c in corpora if c.tokens is not None and len(c.tokens) > block_size), None
    )
    if prompt_source is None:
        prompt_source = val_tokens
    cache = getattr(model, "supports_cache", True) if cache is None else cache
    if prompt_source is None and (cache or nocache):
        raise EvalError(
            "no held-out or validation tokens to prefill the cache with; pass val_tokens or a corpus"
        )
    if cache:
        result.update(measure_cache_bytes(model, prompt_source))
    result["generation_toks_per_s"] = None
    if speed and cache:
        result.update(generation_speed(model, prompt_source))
        result.update(peak_generation_memory(model, prompt_source))
    if nocache:
        result.update(nocache_speed(model, prompt_source))
    result["corpora"] = details
    if tasks:
        from kvlab.eval.tasks import evaluate_tasks

        result["tasks"] = evaluate_tasks(model, tokenizer, tasks, block_size, task_limit, batch_size)
    return result


# ---- the readable table ---------------------------------------------------------------------------
_ROWS = [
    ("val_loss", "val loss", ".4f"),
    ("heldout_loss", "held-out loss", ".4f"),
    ("kv_bytes_per_token", "KV bytes/token/layer (bf16)", ".1f"),
    ("kv_bytes_per_token_total", "KV bytes/token, all layers", ".1f"),
    ("head_sharing_ratio", "head sharing ratio", ".2f"),
    ("layer_sharing_ratio", "layer sharing ratio", ".2f"),
    ("latent_rank_ratio", "latent rank ratio", ".3f"),
    ("measured_cache_bytes", "measured cache bytes", ",d"),
    ("analytic_cache_bytes", "analytic cache bytes", ",d"),
    ("measured_cache_bytes_per_token", "measured cache B/token/layer (bf16)", ".1f"),
    ("generation_toks_per_s", "cached decode tokens/s", ".1f"),
    ("nocache_toks_per_s", "cache-free tokens/s", ".1f"),
    ("peak_memory_bytes", "peak memory bytes", ",d"),
]
_CORPUS_ROWS = [
    ("heldout_loss", "held-out loss", ".4f"),
    ("word_perplexity", "word perplexity", ".3f"),
    ("byte_perplexity", "byte perplexity", ".4f"),
    ("bits_per_byte", "bits per byte", ".4f"),
    ("lambada_accuracy", "last-word accuracy", ".4f"),
    ("lambada_perplexity", "last-word perplexity", ".3f"),
]


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_report(metrics: dict[str, Any]) -> str:
    """A two-column text table of evaluate()'s result, one block per corpus."""
    lines = []
    if metrics.get("run_dir"):
        lines.append(
            f"run: {metrics['run_dir']}  ({metrics['params'] / 1e6:.2f}M params, "
            f"block {metrics['block_size']})"
        )
    rows = [(label, _fmt(metrics.get(k), f)) for k, label, f in _ROWS if k in metrics]
    if "cache_tokens" in metrics:
        rows.append(("cache measured at", f"{metrics['cache_tokens']} tokens, {metrics['cache_dtype']}"))
    if "peak_memory_kind" in metrics:
        rows.append(("peak memory measured as", metrics["peak_memory_kind"]))
    if "generation_prompt_tokens" in metrics:
        rows.append(
            (
                "decode shape",
                f"{metrics['generation_prompt_tokens']} prompt + "
                f"{metrics['generation_new_tokens']} new tokens, batch 1",
            )
        )
    if len(metrics.get("heldout_losses") or {}) > 1:
        rows += [(f"  held-out loss, {n}", _fmt(v, ".4f")) for n, v in metrics["heldout_losses"].items()]
    for name, t in (metrics.get("tasks") or {}).items():
        for m in ("acc", "acc_norm"):
            if m in t:
                rows.append((f"{name} {m}", f"{t[m]:.4f} ± {t[m + '_stderr']:.4f} ({t['items']} items)"))
    width = max(len(label) for label, _ in rows)
    lines += [f"{label.ljust(width)}  {value}" for label, value in rows]
    for name, d in metrics.get("corpora", {}).items():
        lines.append(f"\nheld-out corpus: {name}")
        for k, label, f in _CORPUS_ROWS:
            if k in d:
                lines.append(f"  {label.ljust(width - 2)}  {_fmt(d[k], f)}")
        if "lambada_source" in d:
            lines.append(
                f"  {'cloze passages'.ljust(width - 2)}  {d['lambada_passages']} ({d['lambada_source']})"
            )
    return "\n".join(lines)
