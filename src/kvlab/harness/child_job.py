"""The job a contained child runs (`kvlab.harness.child`), stage by stage: build, forward, KV metrics, the
file's own cache, optional training, the held-out evaluation and generation speed.

Everything here runs after the child has locked itself in, so it only imports modules `child.main`
imported before the lock, and reads and writes inside the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path


def run_job(job: dict, root: Path, result: dict) -> None:
    """Fill `result` stage by stage (so a failure still says how far it got)."""
    import torch

    from kvlab.config import ModelConfig, TrainConfig
    from kvlab.harness.cached import cache_report, compare_cache, usable
    from kvlab.harness.loader import AttentionLoadError, build_seed_model
    from kvlab.harness.metrics import compare, declared_metrics, diagnostics, measure_kv

    torch.set_num_threads(job.get("num_threads", 1))
    model_cfg = ModelConfig.from_dict(job["model"])
    extra = job.get("extra", {})
    result.update(attention_file=job["attention_file"], stage="build")
    torch.manual_seed(job.get("seed", 42))
    if job.get("declare_only"):
        _declare(root / job["attention_file"], model_cfg, extra, result)
        result["stage"] = "done"
        return
    model = build_seed_model(root / job["attention_file"], model_cfg, **extra)
    result.update(attention_sha256=model.attention_sha256, stage="forward")
    idx = torch.randint(0, model_cfg.vocab_size, (2, min(16, model_cfg.block_size)))
    logits = model(idx)  # the submission's forward runs here first
    if logits.shape != (*idx.shape, model_cfg.vocab_size) or not torch.isfinite(logits).all():
        raise AttentionLoadError(
            f"forward returned {tuple(logits.shape)} logits (finite: "
            f"{bool(torch.isfinite(logits).all())}); expected {(*idx.shape, model_cfg.vocab_size)}"
        )
    result["stage"] = "metrics"
    declared = declared_metrics(model)
    measured = (
        measure_kv(model, max_tokens=job.get("measure_max_tokens", 8192)) if job.get("measure") else None
    )
    result.update(
        declared=declared,
        diagnostics=diagnostics(model),
        measured=measured,
        kv_flags=compare(declared, measured) if measured else [],
    )
    cache = None
    if job.get("measure") or job.get("generate"):
        result["stage"] = "cache"
        cache = cache_report(model)
        result["cache"] = cache
        result["kv_flags"] += compare_cache(declared, cache)
    if job.get("train"):
        result["stage"] = "train"
        from kvlab.train.checkpointing import read_metrics
        from kvlab.train.loop import train

        train_cfg = TrainConfig.from_dict({**job["train"], "tensorboard": False, "compile": False})
        run_info = {
            "attention_file": job["attention_file"],
            "attention_sha256": model.attention_sha256,
            "substrate": "seed-000 nanoGPT (kvlab.harness.SeedGPT)",
            "seed_config_extra": extra,
        }
        factory = lambda cfg: build_seed_model(root / job["attention_file"], cfg, **extra)
        train(
            model_cfg, train_cfg, job["data"], root, resume=bool(job.get("resume")), progress=False,
            model_factory=factory, run_info=run_info,
        )  # fmt: skip
        history = read_metrics(root)
        result["train"] = history[-1] if history else None
    weights = root / WEIGHTS_FILE if job.get("train") else job.get("weights")
    if job.get("evaluate"):
        if weights is not None:  # the trained model, for the evaluation and the timing that follow
            result["stage"] = "load"
            _load_weights(model, weights)
        result["stage"] = "evaluate"
        result["evaluation"] = _evaluate(model, job["evaluate"], job.get("device", "cpu"), usable(cache))
    if job.get("generate"):
        result["stage"] = "generate"
        result["generation"] = _generation_speed(model, job, model_cfg, cached=usable(cache))
    result["stage"] = "done"


WEIGHTS_FILE = "model.safetensors"  # what kvlab's training loop commits (kvlab.checkpoint.WEIGHTS_FILE)


def _declare(path: Path, model_cfg, extra: dict, result: dict) -> None:
    """Build the model and report its seed-000 figures: on the meta device (no memory, no init cost) where
    the file's __init__ allows it, else on the CPU."""
    import torch

    from kvlab.harness.loader import build_seed_model
    from kvlab.harness.metrics import declared_metrics

    try:
        with torch.device("meta"):
            model = build_seed_model(path, model_cfg, **extra)
        result["built_on"] = "meta"
    except (MemoryError, PermissionError):
        raise
    except Exception:  # e.g. an __init__ that reads a tensor's value: meta tensors have none
        model = build_seed_model(path, model_cfg, **extra)
        result["built_on"] = "cpu"
    result.update(declared=declared_metrics(model), kv_metrics=model.kv_metrics(), params=model.num_params())


def _load_weights(model, path) -> None:
    """Trained weights (kvlab's model.safetensors: the tied head stored once) into the model, every tensor."""
    from safetensors.torch import load_file

    from kvlab.harness.loader import AttentionLoadError

    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise AttentionLoadError(
            f"{path} does not fit the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )


def _evaluate(model, spec: dict, device: str, cached: bool) -> dict:
    """kvlab.eval.evaluate on the model in memory, over the corpora the parent resolved (spec["corpora"]:
    token .npy files and JSON lists it wrote), then the file's own cache measured at the context length
    where the cache checked out (a cache that fails there is reported, not fatal)."""
    import numpy as np

    from kvlab.eval import evaluate
    from kvlab.eval.corpora import HeldoutCorpus
    from kvlab.eval.speed import measure_cache_bytes

    def listed(path):
        return json.loads(Path(path).read_text()) if path else None

    corpora = [
        HeldoutCorpus(
            name=c["name"],
            tokens=np.load(c["tokens"]) if c.get("tokens") else None,
            documents=listed(c.get("documents")),
            passages=listed(c.get("passages")),
            passages_source=c.get("passages_source", ""),
            detokenize=bool(c.get("detokenize")),
            info=dict(c.get("info") or {}),
        )
        for c in spec["corpora"]
    ]
    tokenizer = None
    if spec.get("tokenizer"):
        from kvlab.data import load_tokenizer

        tokenizer = load_tokenizer(spec["tokenizer"])
    model.to(device).eval()
    metrics = evaluate(
        model, heldout=corpora, tokenizer=tokenizer, dataset_dir=spec.get("dataset_dir"),
        block_size=spec.get("block_size"), batch_size=spec.get("batch_size"),
        eval_iters=spec.get("eval_iters"), speed=False, limit=spec.get("limit"), seed=spec.get("seed"),
        tasks=spec.get("tasks"), task_limit=spec.get("task_limit"), cache=False,
    )  # fmt: skip
    if cached:
        block = model.config.block_size
        prompt = next((c.tokens for c in corpora if c.tokens is not None and len(c.tokens) > block), None)
        if prompt is None and spec.get("dataset_dir"):
            from kvlab.data import open_split

            prompt = np.asarray(open_split(spec["dataset_dir"], "val"))
        try:
            metrics.update(measure_cache_bytes(model, prompt))
        except (MemoryError, PermissionError):
            raise
        except Exception as e:
            metrics["cache_error"] = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
    return metrics


NOCACHE_METHOD = "seed-000: cache-free greedy decoding, each step reruns the cropped context (eager)"
CACHED_METHOD = (
    "kvlab: cached greedy decoding through the file's new_state cache (prefill, then one token a step)"
)


def _generation_speed(model, job: dict, model_cfg, cached: bool) -> dict:
    """Cached decoding where the file's cache checked out (seed 000's cache-free figure next to it);
    otherwise the cache-free figure alone, labelled as seed 000's method."""
    import torch

    from kvlab.eval.speed import generation_speed, nocache_speed

    model.eval()
    device = next(model.parameters()).device
    tokens = torch.randint(
        0, model_cfg.vocab_size, (model_cfg.block_size,), generator=torch.Generator().manual_seed(0)
    ).to(device)
    shape = {"prompt_len": job.get("prompt_len", 128), "new_tokens": job.get("new_tokens", 128)}
    nocache = nocache_speed(model, tokens, **shape)["nocache_toks_per_s"]
    if not cached:
        return {"generation_toks_per_s": nocache, "method": NOCACHE_METHOD}
    out = generation_speed(model, tokens, **shape)
    return {
        "generation_toks_per_s": out["generation_toks_per_s"],
        "method": CACHED_METHOD,
        "prompt_tokens": out["generation_prompt_tokens"],
        "new_tokens": out["generation_new_tokens"],
        "nocache_toks_per_s": nocache,
        "nocache_method": NOCACHE_METHOD,
    }
