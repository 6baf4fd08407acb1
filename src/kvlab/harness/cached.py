"""An attention file's own KV cache, where it implements kvlab's cache interface (`loader.cache_interface`).

`check_cache` runs a float64 copy of the model through real prefills and token-by-token decoding into the
file's cache and compares every position's logits with the full forward. Two sequences are decoded
interleaved, one from a copy of its cache, so a layer that keeps state outside the cache (on itself,
keyed by the last call or by the cache object) decodes wrongly and is caught. The bytes are the cache's
own: the numbers its tensors hold after the run, at 2 bytes each (seed 000's bf16 accounting), per token
and layer, set against the seed formula's declared figure by `compare_cache`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from kvlab.harness.metrics import BF16_BYTES

# float64 cached vs full forward differ only by summation order (~1e-13 relative)
ATOL = 1e-8


def _clone_cache(model: nn.Module, cache, dtype: torch.dtype):
    """A new cache object with copies of every tensor `cache` holds (same contents, other identities)."""
    twin = model.new_cache(batch_size=cache.batch_size, max_len=cache.max_len, dtype=dtype, device="cpu")
    for new, old in zip(twin.states, cache.states):
        new.tensors.clear()
        new.tensors.update({name: t.clone() for name, t in old.tensors.items()})
    twin.pos = cache.pos
    return twin


@torch.no_grad()
def check_cache(
    model: nn.Module, prompt_len: int = 8, new_tokens: int = 4, batch_size: int = 2, seed: int = 0
):
    """Cached prefill + decode == full forward (float64, CPU), and the bytes the file's cache holds."""
    cfg = model.config
    total = min(prompt_len + new_tokens, cfg.block_size)
    prompt_len = max(1, min(prompt_len, total - 1))
    twin = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, cfg.vocab_size, (batch_size, total), generator=gen) for _ in range(2)]
    full = [twin(idx) for idx in seqs]  # (B, total, V) each
    caches = [
        twin.new_cache(batch_size=batch_size, max_len=total, dtype=torch.float64, device="cpu") for _ in seqs
    ]
    steps = [[twin(idx[:, :prompt_len], cache=c)] for idx, c in zip(seqs, caches)]  # both prefills first
    caches[0] = _clone_cache(twin, caches[0], torch.float64)
    for t in range(prompt_len, total):  # interleaved: a, b, a, b, ...
        for idx, c, out in zip(seqs, caches, steps):
            out.append(twin(idx[:, t : t + 1], cache=c))
    diff = max(float((torch.cat(out, dim=1) - f).abs().max()) for out, f in zip(steps, full))
    scale = max(1.0, max(float(f.abs().max()) for f in full))
    cache = caches[1]  # the one that was never copied: exactly what the file allocated and filled
    tokens = batch_size * total
    layers = [
        {
            "kv_bytes_per_token": (s.numbers() * BF16_BYTES + s.other_bytes()) / tokens,
            "tensors": {name: list(t.shape) for name, t in s.tensors.items()},
        }
        for s in cache.states
    ]
    return {
        "interface": True,
        "decode_matches_full": diff <= ATOL * scale,
        "max_abs_diff": diff,
        "method": f"prefill {prompt_len} + decode {total - prompt_len} tokens one at a time (batch "
        f"{batch_size}, float64, two sequences interleaved, one from a copied cache) vs the full forward",
        "kv_bytes_per_token": sum(x["kv_bytes_per_token"] for x in layers) / len(layers),
        "bytes_method": "numbers the file's cache holds after the run x 2 bytes (bf16), per token",
        "cache_nbytes": cache.nbytes(),
        "cache_dtype": "float64",
        "cache_tokens": total,
        "batch_size": batch_size,
        "per_layer": layers,
    }


def compare_cache(declared: dict[str, Any], cache: dict[str, Any]) -> list[str]:
    """Human lines where the file's cache disagrees with the seed formula or with the full forward.

    More bytes in the cache than declared is a MISMATCH (the seed's figure understates what decoding
    keeps); fewer is a note (e.g. a cache of x from which K/V are recomputed, which the formula cannot
    credit). A cache whose decoding differs from the full forward is a MISMATCH, and its speed is not used.
    """
    if not cache.get("interface"):
        return []
    if cache.get("error"):
        return [f"MISMATCH cache: {cache['error']}"]
    lines = []
    if not cache["decode_matches_full"]:
        lines.append(
            f"MISMATCH cache: cached decoding differs from the full forward (max |logit diff| "
            f"{cache['max_abs_diff']:.3g}); generation timed cache-free instead"
        )
    for i, (d, c) in enumerate(zip(declared["per_layer"], cache["per_layer"])):
        db, cb = d["kv_bytes_per_token"], c["kv_bytes_per_token"]
        if cb > db:
            lines.append(f"MISMATCH layer {i}: declared {db} B/token, the cache holds {cb:g} B/token")
        elif cb < db:
            lines.append(f"note layer {i}: declared {db} B/token, the cache holds only {cb:g} B/token")
    return lines


def cache_report(model: nn.Module) -> dict[str, Any]:
    """check_cache where the file implements the interface; otherwise why not. A cached path that raises
    is reported (and generation timed cache-free), not fatal: the seed's contract does not need it."""
    if not model.supports_cache:
        return {"interface": False, "reason": model.cache_unsupported}
    try:
        return check_cache(model)
    except (MemoryError, PermissionError):  # limits and refused escapes end the run with their verdict
        raise
    except Exception as e:
        text = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
        if "out of memory" in text.lower() or "allocate" in text.lower():
            raise
        return {"interface": True, "decode_matches_full": False, "error": f"the cached path failed ({text})"}


def usable(cache: dict[str, Any] | None) -> bool:
    """Whether cached decoding may be timed: the interface is there and decodes as the full forward does."""
    return bool(
        cache and cache.get("interface") and cache.get("decode_matches_full") and not cache.get("error")
    )
