"""Measured (not analytic) costs: cache bytes after a real prefill, decode tokens/s, peak memory.

Peak memory is the CUDA allocator's peak on GPU. On CPU there is no allocator peak to read, so
`LiveTensorTracker` counts the bytes of every tensor storage alive at once (parameters + cache +
activations) through a TorchDispatchMode; the result is labelled "cpu_live_tensor_bytes".
"""

from __future__ import annotations

import time
import weakref

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kvlab.eval.lm import EvalError
from kvlab.generate import generate


def _prompt(tokens, length: int, device) -> torch.Tensor:
    t = tokens[:length] if isinstance(tokens, torch.Tensor) else torch.from_numpy(np.array(tokens[:length]))
    if t.numel() < length:
        raise EvalError(f"the prompt source has {t.numel()} tokens; {length} are needed")
    return t.long().view(1, -1).to(device)  # (1, T)


@torch.inference_mode()
def measure_cache_bytes(model, tokens, prompt_len: int | None = None, batch_size: int = 1) -> dict:
    """cache.nbytes() after prefilling real tokens into a block_size cache, against the analytic figure,
    and what that costs per token: measured_cache_bytes_per_token.

    measured_cache_bytes (the model's dtype) must equal the analytic kv_cache_bytes for every structure
    (design.md); a mismatch is a bug in that structure's cache (e.g. it stores decompressed K/V), so this
    raises instead of reporting a wrong number. A model without kv_cache_bytes (an attention file's
    SeedGPT, whose cache is the file's own) reports the measured bytes only.

    measured_cache_bytes_per_token: a second cache, in bfloat16, prefilled the same way; its nbytes() /
    (batch x cache tokens) / n_layer -- per layer at bf16, beside kv_bytes_per_token, but at this context
    length: what a user really pays there (Context-KV's current chunk and recurrent state included, so at
    short contexts it exceeds the asymptotic figure).
    """
    max_len = model.config.block_size
    prompt_len = min(prompt_len or max_len, max_len, len(tokens))
    device = next(model.parameters()).device
    idx = _prompt(tokens, prompt_len, device).expand(batch_size, -1)  # (B, T)
    dtype = next(model.parameters()).dtype
    cache = model.new_cache(batch_size=batch_size, max_len=max_len)
    model(idx, cache=cache)
    measured = cache.nbytes()
    out = {
        "measured_cache_bytes": measured,
        "cache_tokens": max_len,
        "cache_dtype": str(dtype).removeprefix("torch."),
    }
    if hasattr(model, "kv_cache_bytes"):
        analytic = model.kv_cache_bytes(batch_size=batch_size, max_len=max_len, dtype=dtype)
        if measured != analytic:
            raise AssertionError(
                f"measured cache bytes {measured} != analytic {analytic} (batch {batch_size}, {max_len} "
                "tokens); a KV structure allocates more (or less) than kv_bytes_per_token says"
            )
        out["analytic_cache_bytes"] = analytic
    bf16 = model.new_cache(batch_size=batch_size, max_len=max_len, dtype=torch.bfloat16)
    model(idx, cache=bf16)
    out["measured_cache_bytes_per_token"] = bf16.nbytes() / (batch_size * max_len) / model.config.n_layer
    return out


def speed_shape(block_size: int, prompt_len: int = 128, new_tokens: int = 128) -> tuple[int, int]:
    """(prompt, new tokens) that fit block_size: the design's 128 + 128, cropped proportionally."""
    if prompt_len + new_tokens <= block_size:
        return prompt_len, new_tokens
    new = max(1, block_size * new_tokens // (prompt_len + new_tokens))
    return block_size - new, new


def generation_speed(
    model, tokens, prompt_len: int = 128, new_tokens: int = 128, warmup_tokens: int = 8, repeats: int = 1
) -> dict:
    """Cached greedy decoding, batch 1: decode tokens/s after a warm-up (best of `repeats`)."""
    prompt_len, new_tokens = speed_shape(model.config.block_size, min(prompt_len, len(tokens)), new_tokens)
    idx = _prompt(tokens, prompt_len, next(model.parameters()).device)
    generate(model, idx, min(warmup_tokens, new_tokens))
    results = [generate(model, idx, new_tokens) for _ in range(repeats)]
    best = max(results, key=lambda r: r.tokens_per_s)
    return {
        "generation_toks_per_s": best.tokens_per_s,
        "generation_prefill_s": best.prefill_s,
        "generation_prompt_tokens": prompt_len,
        "generation_new_tokens": new_tokens,
    }


@torch.inference_mode()
def nocache_generate(model, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Seed 000's generation: no cache; each step reruns the whole cropped context (eager)."""
    block_size = model.config.block_size
    for _ in range(new_tokens):
        logits = model(idx[:, -block_size:])[:, -1, :]  # (B, V)
        idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return idx


def nocache_speed(
    model, tokens, prompt_len: int = 128, new_tokens: int = 128, warmup_tokens: int = 8
) -> dict:
    """Tokens/s of cache-free greedy generation (all new tokens over the whole loop), after a warm-up."""
    prompt_len, new_tokens = speed_shape(model.config.block_size, min(prompt_len, len(tokens)), new_tokens)
    device = next(model.parameters()).device
    idx = _prompt(tokens, prompt_len, device)
    nocache_generate(model, idx, min(warmup_tokens, new_tokens))
    _sync(device)
    t0 = time.perf_counter()
    nocache_generate(model, idx, new_tokens)
    _sync(device)
    return {"nocache_toks_per_s": new_tokens / (time.perf_counter() - t0)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LiveTensorTracker(TorchDispatchMode):
    """Counts the bytes of tensor storages created inside the mode that are alive at the same time.

    Every aten op's outputs are seen (composite ops are decomposed below this mode, so their
    intermediates are too); a storage is counted once however many views share it and released when
    its last tracked tensor dies. Kernel-internal scratch buffers are invisible: this is live tensor
    bytes, not process RSS. `peak` excludes storages that existed before the mode (parameters).
    """

    def __init__(self, preexisting: set[int] = frozenset()):
        super().__init__()
        self.preexisting = set(preexisting)  # storage data_ptrs alive before the mode (weights, prompt)
        self.live: dict[int, list[int]] = {}  # storage data_ptr -> [nbytes, tracked tensors alive]
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr == 0 or nbytes == 0:
            return
        if ptr not in self.live:
            if ptr in self.preexisting:
                return
            self.live[ptr] = [nbytes, 0]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        self.live[ptr][1] += 1
        weakref.finalize(t, self._release, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out


def peak_generation_memory(model, tokens, prompt_len: int = 128, new_tokens: int = 128) -> dict:
    """Peak memory of one cached greedy generation (same shape as generation_speed)."""
    prompt_len, new_tokens = speed_shape(model.config.block_size, min(prompt_len, len(tokens)), new_tokens)
    device = next(model.parameters()).device
    idx = _prompt(tokens, prompt_len, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        generate(model, idx, new_tokens)
        torch.cuda.synchronize(device)
        return {
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device),
            "peak_memory_kind": "cuda_max_allocated",
        }
    weights = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()
    }
    tracker = LiveTensorTracker(preexisting=set(weights) | {idx.untyped_storage().data_ptr()})
    with tracker:
        generate(model, idx, new_tokens)
    return {
        "peak_memory_bytes": sum(weights.values()) + idx.untyped_storage().nbytes() + tracker.peak,
        "peak_memory_kind": "cpu_live_tensor_bytes",
    }
