"""Seed-000 metrics read from the realized modules, and the per-token K/V state kvlab measures.

`declared_metrics` applies seed 000's formulas to each layer's realized attributes (bf16, averaged over
layers, a borrowing layer counts 0). `measure_kv` checks them against what the attention actually reads:
a TorchFunctionMode records the K and V handed to scaled_dot_product_attention in every layer (however
the module produced them: repeated heads, decompressed latents), and the per-token state is the numerical
rank of the (tokens x K/V features) matrix over random tokens in float64 -- the fewest numbers per token
from which that layer's K/V follow linearly. A layer that declares sharing is measured by what its K/V
add beyond the previous layer's. Attention written without SDPA is reported as not measured.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

BF16_BYTES = 2


def layer_declared(attn: nn.Module, n_head: int) -> dict[str, Any]:
    """One block's seed-000 figures from its attributes (the seed's formulas, verbatim)."""
    shares = bool(getattr(attn, "share_across_layers", False))
    n_kv_head = int(getattr(attn, "n_kv_head", n_head))
    head_dim = int(attn.head_dim)
    latent = hasattr(attn, "kv_a_proj_with_mqa") or (shares and hasattr(attn, "kv_lora_rank"))
    if latent:
        rank, rope = int(attn.kv_lora_rank), int(attn.qk_rope_head_dim)
        per_token = BF16_BYTES * (rank + rope)
        latent_ratio = rank / (head_dim + rope)
    else:
        per_token = 2 * n_kv_head * head_dim * BF16_BYTES
        latent_ratio = 1.0
    return {
        "kv_bytes_per_token": 0 if shares else per_token,
        "head_sharing_ratio": n_head / n_kv_head,
        "latent_rank_ratio": latent_ratio,
        "share_across_layers": shares,
        "latent": latent,
    }


def declared_metrics(model: nn.Module) -> dict[str, Any]:
    """Seed 000's kv_bytes_per_token, head_sharing_ratio, latent_rank_ratio (means over layers)."""
    n_head = model.config.n_head
    layers = [layer_declared(b.attn, n_head) for b in model.blocks]
    mean = lambda key: float(sum(layer[key] for layer in layers) / len(layers))
    return {
        "kv_bytes_per_token": mean("kv_bytes_per_token"),
        "kv_bytes_per_token_total": float(sum(layer["kv_bytes_per_token"] for layer in layers)),
        "head_sharing_ratio": mean("head_sharing_ratio"),
        "latent_rank_ratio": mean("latent_rank_ratio"),
        "per_layer": layers,
    }


def diagnostics(model: nn.Module) -> list[dict[str, Any]]:
    """The `_last_*` attributes every forward sets (seed 000's contract), per layer; None when absent."""
    keys = ("_last_latent_rank_ratio", "_last_kv_storage_ratio", "_uses_latent_compression")
    return [{k.lstrip("_"): _plain(getattr(b.attn, k, None)) for k in keys} for b in model.blocks]


def _plain(value):
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


class _SdpaRecorder(TorchFunctionMode):
    """Records (k, v) of every scaled_dot_product_attention call, in call order."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            k = args[1] if len(args) > 1 else kwargs["key"]
            v = args[2] if len(args) > 2 else kwargs["value"]
            self.calls.append((k.detach(), v.detach()))
        return func(*args, **kwargs)


def _features(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) K and V -> (B * T, H_k * D_k + H_v * D_v): everything one token offers attention."""
    per_token = lambda t: t.transpose(-3, -2).flatten(-2).flatten(0, -2)  # (B*T, H*D)
    return torch.cat([per_token(k), per_token(v)], dim=1)


def _rank(m: torch.Tensor, rtol: float) -> int:
    s = torch.linalg.svdvals(m)
    return int((s > s[0] * rtol).sum()) if s.numel() and s[0] > 0 else 0


@torch.no_grad()
def measure_kv(model: nn.Module, max_tokens: int = 8192, rtol: float = 1e-7, seed: int = 0) -> dict[str, Any]:
    """Measured per-token K/V bytes per layer (bf16 accounting), from a float64 copy of the model."""
    twin = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    cfg = model.config
    declared = [layer_declared(b.attn, cfg.n_head) for b in twin.blocks]
    T = cfg.block_size
    # one probe forward tells how wide each layer's features are; then enough tokens for the rank
    gen = torch.Generator().manual_seed(seed)
    probe = _recorded(twin, torch.randint(0, cfg.vocab_size, (1, min(T, 8)), generator=gen))
    if len(probe) != cfg.n_layer:
        return {
            "measured": False,
            "reason": f"saw {len(probe)} scaled_dot_product_attention calls "
            f"for {cfg.n_layer} layers; measurement needs one SDPA call per layer",
        }
    widest = max(_features(k, v).shape[1] for k, v in probe)
    needed = 2 * widest + 16  # the sharing check stacks two layers' features
    if needed > max_tokens:
        return {"measured": False, "reason": f"needs {needed} probe tokens (> max_tokens={max_tokens})"}
    batch = -(-needed // T)
    calls = _recorded(twin, torch.randint(0, cfg.vocab_size, (batch, T), generator=gen))
    layers, prev = [], None
    for i, (k, v) in enumerate(calls):
        feats = _features(k, v)
        own = _rank(feats, rtol)
        if declared[i]["share_across_layers"] and prev is not None:
            dims = _rank(torch.cat([prev, feats], dim=1), rtol) - _rank(prev, rtol)  # what it adds
        else:
            dims = own
        layers.append(
            {"kv_bytes_per_token": BF16_BYTES * dims, "kv_dims": dims, "feature_width": feats.shape[1]}
        )
        prev = feats
    measured = [x["kv_bytes_per_token"] for x in layers]
    return {
        "measured": True,
        "method": "rank of the K/V passed to scaled_dot_product_attention over random tokens (float64)",
        "probe_tokens": batch * T,
        "kv_bytes_per_token": float(sum(measured) / len(measured)),
        "per_layer": layers,
    }


def _recorded(model: nn.Module, idx: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with _SdpaRecorder() as rec:
        model(idx)
    return rec.calls


def compare(declared: dict[str, Any], measured: dict[str, Any]) -> list[str]:
    """Human lines: per layer where the declared and measured bytes differ (empty when they agree).

    Measured above declared: the attention reads more per-token state than the seed's formula credits.
    Measured below: K/V span fewer dimensions than declared (e.g. MHA's K and V are linear in an
    n_embd-wide input), a note rather than a fault.
    """
    if not measured.get("measured"):
        return [f"not measured: {measured.get('reason')}"]
    lines = []
    for i, (d, m) in enumerate(zip(declared["per_layer"], measured["per_layer"])):
        db, mb = d["kv_bytes_per_token"], m["kv_bytes_per_token"]
        if mb > db:
            lines.append(f"MISMATCH layer {i}: declared {db} B/token, measured {mb} B/token")
        elif mb < db:
            lines.append(f"note layer {i}: declared {db} B/token, K/V span only {mb} B/token")
    return lines
