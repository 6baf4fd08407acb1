"""MatryoshkaKV's greedy rank search (seed 003, Algorithm 1): per (layer, KV head, K/V) ranks under a
KV-byte budget, chosen by the relative error each one-step cut causes in the final hidden states.

Owns `greedy_rank_search` and `final_hidden` (the ln_f output, read with a hook so model.py stays as
it is). The rank API it drives lives in kvlab.attention.matryoshka; the CLI in commands/search_ranks.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from kvlab.attention.matryoshka import get_ranks, layers_or_error, set_ranks
from kvlab.errors import KvlabError


class SearchError(KvlabError):
    """Unusable search arguments (budget, step, calibration data)."""


class _Stop(Exception):
    """Raised from the ln_f hook: the LM head's logits are not needed, so skip computing them."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


@torch.no_grad()
def final_hidden(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """The output of model.ln_f for tokens idx (B, T): (B, T, n_embd), float32, no LM head."""

    def hook(module, args, output):
        raise _Stop(output)

    handle = model.ln_f.register_forward_hook(hook)
    try:
        model(idx)
    except _Stop as stop:
        return stop.hidden.float()
    finally:
        handle.remove()
    raise AssertionError("model.ln_f was not called by model.forward")  # pragma: no cover


def _relative_error(model: nn.Module, batches: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """||h - h_ref|| / ||h_ref|| over every calibration token (Frobenius norm across all batches)."""
    num = den = 0.0
    for idx, ref in zip(batches, refs):
        num += (final_hidden(model, idx) - ref).pow(2).sum().item()
        den += ref.pow(2).sum().item()
    return math.sqrt(num / max(den, 1e-30))


class _Suffix:
    """The input of every block for each calibration batch at the current ranks, so that the error of a
    cut in layer j reruns only blocks j.. and ln_f (about half the model on average) instead of all of it.

    Valid because a cut in layer j changes nothing before it, and Matryoshka layers never lend KV (each
    block reads only its input); a model with borrowing layers falls back to full forwards.
    """

    def __init__(self, model: nn.Module, batches: list[torch.Tensor]):
        self.model, self.batches = model, batches
        blocks = getattr(model, "blocks", None)
        owners = getattr(model, "owners", None)
        self.enabled = blocks is not None and owners is not None and owners == list(range(len(blocks)))
        self.inputs: list[list[torch.Tensor]] = []
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Record every block's input for the current ranks (after a round lowered some of them)."""
        if not self.enabled:
            return
        self.inputs = []
        seen: list[torch.Tensor] = []
        hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for b in self.model.blocks]
        try:
            for idx in self.batches:
                seen.clear()
                final_hidden(self.model, idx)
                self.inputs.append(list(seen))
        finally:
            for h in hooks:
                h.remove()

    @torch.no_grad()
    def error(self, layer: int, refs: list[torch.Tensor]) -> float:
        """_relative_error with only blocks[layer:] rerun (layer: an index into model.blocks)."""
        if not self.enabled:
            return _relative_error(self.model, self.batches, refs)
        num = den = 0.0
        for inputs, ref in zip(self.inputs, refs):
            x = inputs[layer]
            for block in self.model.blocks[layer:]:
                x, _ = block(x, 0)
            num += (self.model.ln_f(x).float() - ref).pow(2).sum().item()
            den += ref.pow(2).sum().item()
        return math.sqrt(num / max(den, 1e-30))


def _bytes(model: nn.Module) -> float:
    return model.kv_metrics()["kv_bytes_per_token"]


def _bytes_at(model: nn.Module, rank_of) -> float:
    """kv_bytes_per_token with every Matryoshka rank set to rank_of(head_dim); the ranks are restored."""
    saved = get_ranks(model)
    try:
        for _, attn in layers_or_error(model):
            r = rank_of(attn.head_dim)
            attn.k_ranks, attn.v_ranks = [r] * attn.n_kv_heads, [r] * attn.n_kv_heads
        return _bytes(model)
    finally:
        set_ranks(model, k=saved["k"], v=saved["v"])


def greedy_rank_search(
    model: nn.Module,
    calib_batches: Iterable[torch.Tensor],
    budget: float,
    step: int | None = None,
    fraction: float = 0.1,
    progress: bool = False,
) -> dict:
    """Lower Matryoshka ranks greedily until kv_bytes_per_token <= budget x the full-rank figure.

    Each round tries every (layer, KV head, K or V) whose rank can drop by `step` (default head_dim // 8;
    never below `step`), alone, and measures the relative error of the final hidden states on
    `calib_batches` ((B, T) token tensors) against the full-rank model; the cheapest `fraction` of the
    candidates (at least one) are then lowered for real, stopping within a round as soon as the budget is
    met, so the result lands at or just under it. Starts from the current ranks; leaves the model at the
    found ranks. Returns {"layers", "k", "v" (get_ranks format), "kv_bytes_per_token", "ratio" (of the
    full-rank bytes), "full_kv_bytes_per_token", "error", "rounds", "history" (one entry per round)}.
    """
    layers = layers_or_error(model)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise SearchError(
            f"budget={budget!r} must be a fraction of the full-rank KV bytes in (0, 1], e.g. 0.4"
        )
    if not 0 < fraction <= 1:
        raise SearchError(
            f"fraction={fraction!r} must be in (0, 1]: the share of candidates lowered per round"
        )
    head_dim = layers[0][1].head_dim
    step = max(1, head_dim // 8) if step is None else step
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= head_dim:
        raise SearchError(f"step={step!r} must be an integer between 1 and head_dim={head_dim}")
    batches = [b for b in calib_batches]
    if not batches:
        raise SearchError("calib_batches is empty; pass at least one (B, T) batch of calibration tokens")

    full_bytes = _bytes_at(model, lambda d: d)
    target = budget * full_bytes
    floor = _bytes_at(model, lambda d: min(step, d))
    if floor > target + 1e-9:
        raise SearchError(
            f"budget={budget} is below the smallest reachable ratio {floor / full_bytes:.3f} (every rank at "
            f"step={step}); raise the budget or use a smaller step"
        )

    was_training = model.training
    model.eval()  # dropout off: errors must be deterministic
    start = get_ranks(model)
    for _, attn in layers:  # the full-rank reference, whatever head_dim each layer has
        attn.k_ranks, attn.v_ranks = [attn.head_dim] * attn.n_kv_heads, [attn.head_dim] * attn.n_kv_heads
    try:
        refs = [final_hidden(model, idx) for idx in batches]
    finally:
        set_ranks(model, k=start["k"], v=start["v"])

    history: list[dict] = []
    try:
        suffix = _Suffix(model, batches)
        while _bytes(model) > target + 1e-9:
            scored = []
            for j, (i, attn) in enumerate(layers):
                for h in range(attn.n_kv_heads):
                    for which in ("k", "v"):
                        ranks = getattr(attn, f"{which}_ranks")
                        old = ranks[h]
                        new = max(old - step, min(step, attn.head_dim))
                        if new >= old:
                            continue
                        ranks[h] = new
                        try:
                            err = suffix.error(i, refs)
                        finally:
                            ranks[h] = old
                        # Ties keep (layer, head, K before V) order: sorted() is stable, so runs repeat.
                        scored.append((err, i, j, h, which, new))
            if not scored:  # pragma: no cover - ruled out by the floor check above
                break
            scored.sort(key=lambda c: c[0])
            n_lower = max(1, math.ceil(fraction * len(scored)))
            lowered = []
            for err, i, j, h, which, new in scored[:n_lower]:
                getattr(layers[j][1], f"{which}_ranks")[h] = new
                lowered.append({"layer": i, "head": h, "kv": which, "rank": new, "error": err})
                if _bytes(model) <= target + 1e-9:
                    break
            suffix.refresh()
            entry = {
                "round": len(history) + 1,
                "candidates": len(scored),
                "lowered": lowered,
                "kv_bytes_per_token": _bytes(model),
                "ratio": _bytes(model) / full_bytes,
                "error": _relative_error(model, batches, refs),
            }
            history.append(entry)
            if progress:
                print(
                    f"round {entry['round']}: lowered {len(lowered)}/{len(scored)}, "
                    f"ratio {entry['ratio']:.3f}, hidden-state error {entry['error']:.4f}",
                    flush=True,
                )
    finally:
        model.train(was_training)

    found = get_ranks(model)
    kv_bytes = _bytes(model)
    return {
        **found,
        "kv_bytes_per_token": kv_bytes,
        "full_kv_bytes_per_token": full_bytes,
        "ratio": kv_bytes / full_bytes,
        "budget": budget,
        "step": step,
        "error": history[-1]["error"] if history else _relative_error(model, batches, refs),
        "rounds": len(history),
        "history": history,
    }
