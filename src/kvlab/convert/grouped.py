"""Grouped-KV conversions of a trained kind='gqa' model: fewer KV heads (GQA/MQA) or KV layers (CLA/MLKV).

Both are pure functions returning a new model: `to_gqa` mean-pools the K and V heads of each group (seed
002's rule), `to_kv_share` gives each owner layer the uniform mean of the K/V projections of the layers
that will read it. Everything else is copied key by key, so at the no-op setting the logits are unchanged.
"""

from __future__ import annotations

import torch

from kvlab.config import ConfigError, _divisors
from kvlab.convert.common import build_like, grouped_attention_or_error
from kvlab.model import GPT


def _kv_keys(state: dict[str, torch.Tensor], layer: int) -> list[str]:
    prefix = f"blocks.{layer}.attn.kv_proj."
    return [k for k in state if k.startswith(prefix)]  # weight, and bias when the model has biases


@torch.no_grad()
def to_gqa(model: GPT, n_kv_heads: int) -> GPT:
    """A copy of `model` with n_kv_heads KV heads per layer, each the mean of its group's K/V heads.

    Query head h reads KV head h // (n_head / n_kv_heads), so new KV head j pools the old heads serving
    the same query heads: a contiguous block of old_n_kv_heads / n_kv_heads heads. Weights and biases alike.
    """
    att = grouped_attention_or_error(model, "to_gqa")
    cfg = model.config
    old = att.n_kv_heads or cfg.n_head
    if not isinstance(n_kv_heads, int) or n_kv_heads <= 0 or old % n_kv_heads:
        raise ConfigError(
            f"to_gqa: n_kv_heads={n_kv_heads!r} must divide the model's n_kv_heads={old}; "
            f"try {_divisors(old)}"
        )
    g, D = old // n_kv_heads, cfg.head_dim
    state = model.state_dict()
    out = dict(state)
    for i, owner in enumerate(model.owners):
        if owner != i:
            continue  # borrowers have no kv_proj
        for key in _kv_keys(state, i):
            t = state[key]  # (2 * old * D, C) or (2 * old * D,)
            grouped = t.reshape(2, n_kv_heads, g, D, *t.shape[1:])  # (K|V, new head, group, D, [C])
            out[key] = grouped.mean(dim=2).reshape(2 * n_kv_heads * D, *t.shape[1:])
    new_att = att.replace(n_kv_heads=n_kv_heads)
    return build_like(model, new_att, out, "to_gqa")


@torch.no_grad()
def to_kv_share(model: GPT, kv_share: str | list[int], merge: str = "mean") -> GPT:
    """A copy of `model` whose layers share KV as `kv_share` says (MLKV / CLA uptraining init).

    merge="mean": each owner layer's K/V projection becomes the uniform mean of the projections of the
    layers that will borrow from it, itself included (LCKV's rule); merge="owner": the owner keeps its own.
    Borrowers keep their queries, outputs and MLPs and lose kv_proj. In RoPE families the mean of
    pre-RoPE projections equals the mean of post-RoPE keys (every layer rotates alike). The source must
    not share KV already (kv_share='none').
    """
    if merge not in ("mean", "owner"):
        raise ConfigError(f"to_kv_share: merge={merge!r} unknown; use 'mean' or 'owner'")
    att = grouped_attention_or_error(model, "to_kv_share")
    if att.kv_share != "none":
        raise ConfigError(
            f"to_kv_share needs a model with kv_share='none' (got {att.kv_share!r}); "
            "convert the unshared model"
        )
    new_att = att.replace(kv_share=kv_share)
    owners = new_att.owners(model.config.n_layer)  # validates the spec (one-line ConfigError)
    state = model.state_dict()
    out = {k: v for k, v in state.items() if ".attn.kv_proj." not in k}
    for o in sorted(set(owners)):
        group = [i for i, owner in enumerate(owners) if owner == o] if merge == "mean" else [o]
        for key in _kv_keys(state, o):
            suffix = key.rsplit(".", 1)[-1]
            out[key] = torch.stack([state[f"blocks.{i}.attn.kv_proj.{suffix}"] for i in group]).mean(dim=0)
    return build_like(model, new_att, out, "to_kv_share")
