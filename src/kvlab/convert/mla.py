"""MHA/GQA -> MLA (latent KV), as MHA2MLA and TransMLA convert checkpoints (reference.md, peers).

Per layer and KV head the key splits into RoPE dimensions kept as MLA's decoupled key (`rope_dim` of them:
MHA2MLA's partial RoPE, the frequency pairs with the largest query-key norm product, or the
highest-frequency pairs without calibration) and the rest (NoPE). The NoPE keys and the values of all KV
heads are stacked into one map M (m x C) and factored through a rank-`kv_rank` basis U (m x r): the
latent is c = U^T M x, kv_b = U rebuilds keys and values. U comes from the SVD of M ("svd") or from PCA of
M x on calibration text ("pca": top eigenvectors of M E[x x^T] M^T).

The MLA layer it builds uses the options made for this (attention/mla.py): one RoPE key per KV head
(`rope_heads`), the model's own RoPE frequencies at the kept pairs (`rope_pairs`), no latent RMSNorm
(`latent_norm=False`, so the latent path stays linear) and no decoupled key at all in GPT-2's learned-
position family (`rope_dim=0`). At kv_rank = m (and every RoPE pair kept) the converted model reproduces
the original's logits; the score scale (D + rope_dim)^-1/2 is folded into the query.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from kvlab.config import AttentionConfig, ConfigError
from kvlab.convert.calibrate import attention_input_moments
from kvlab.convert.common import build_like, grouped_attention_or_error
from kvlab.model import GPT

METHODS = ("svd", "pca")


def mla_rank_bound(model: GPT, rope_dim: int | None = None) -> int:
    """m: the rows of the stacked NoPE-key + value map, the kv_rank at which to_mla keeps everything."""
    cfg = model.config
    rd = _default_rope_dim(model) if rope_dim is None else rope_dim
    n_kv = model.config.attention.n_kv_heads or cfg.n_head
    return n_kv * (2 * cfg.head_dim - rd)


def _default_rope_dim(model: GPT) -> int:
    return model.config.rope_dim if model.config.positions == "rope" else 0


@torch.no_grad()
def to_mla(
    model: GPT,
    kv_rank: int,
    rope_dim: int | None = None,
    method: str = "svd",
    calibration: Iterable[torch.Tensor] | None = None,
) -> GPT:
    """A latent-KV (MLA) copy of a grouped-KV `model`; the original is untouched.

    kv_rank: latent width per token (<= mla_rank_bound(model, rope_dim); that bound is exact).
    rope_dim: RoPE dims kept per KV head (even, <= the model's rotary dims; default all of them; 0 in the
    gpt2 family, whose positions are learned). method: "svd" of the weights or "pca" of calibration
    activations (needs `calibration`, an iterable of (B, T) token tensors, which also picks the RoPE pairs).
    """
    att = grouped_attention_or_error(model, "to_mla")
    if att.kv_share != "none":
        raise ConfigError(f"to_mla needs kv_share='none' (got {att.kv_share!r}); convert the unshared model")
    if method not in METHODS:
        raise ConfigError(f"to_mla: method={method!r} unknown; use one of {', '.join(METHODS)}")
    cfg = model.config
    H, D, C = cfg.n_head, cfg.head_dim, cfg.n_embd
    n_kv = att.n_kv_heads or H
    R = cfg.rope_dim if cfg.positions == "rope" else 0  # rotary dims per head in the source
    rd = R if rope_dim is None else rope_dim
    if not isinstance(rd, int) or rd < 0 or rd % 2 or rd > R:
        fix = "the gpt2 family has learned positions, so use rope_dim=0" if R == 0 else f"use an even 0..{R}"
        raise ConfigError(
            f"to_mla: rope_dim={rope_dim!r} must be even and at most the model's {R} RoPE dims; {fix}"
        )
    m = n_kv * (2 * D - rd)
    if not isinstance(kv_rank, int) or not 1 <= kv_rank <= m:
        raise ConfigError(
            f"to_mla: kv_rank={kv_rank!r} must be between 1 and {m} (the NoPE keys and values of "
            f"{n_kv} KV heads; kv_rank={m} keeps everything)"
        )
    if method == "pca" and calibration is None:
        raise ConfigError("to_mla: method='pca' needs calibration batches; pass calibration= or use 'svd'")
    moments = attention_input_moments(model, calibration) if calibration is not None else None

    state = model.state_dict()
    out = {k: v for k, v in state.items() if ".attn." not in k}
    layer_atts = {}
    scale = math.sqrt((D + rd) / D)  # MLA scores with (D + rd)^-1/2, the source with D^-1/2
    for i in range(cfg.n_layer):
        p = f"blocks.{i}.attn."
        w_q = state[p + "q_proj.weight"].view(H, D, C)
        w_k, w_v = state[p + "kv_proj.weight"].view(2, n_kv, D, C).unbind(0)
        b_q, b_kv = state.get(p + "q_proj.bias"), state.get(p + "kv_proj.bias")
        G = moments[i] if moments is not None else None
        pairs = _select_pairs(w_q, w_k, G, R, rd // 2)
        rope_idx = pairs + [j + R // 2 for j in pairs]  # rotate-half layout of the kept pairs
        nope_idx = [d for d in range(D) if d not in set(rope_idx)]
        M = torch.cat([w_k[:, nope_idx].reshape(-1, C), w_v.reshape(-1, C)])  # (m, C)
        assert M.shape == (m, C), f"to_mla: stacked map {tuple(M.shape)} != {(m, C)}"
        U = _basis(M, kv_rank, G)  # (m, r), orthonormal columns
        n_nope = len(nope_idx)

        # kv_a: [latent (r) ; one RoPE key per KV head (n_kv x rd)]
        out[p + "kv_a.weight"] = torch.cat([U.T @ M, w_k[:, rope_idx].reshape(-1, C)])
        # kv_b: per query head [k_nope (D, zero-padded past n_nope) ; v (D)] from its KV head's rows of U
        u_k = U[: n_kv * n_nope].view(n_kv, n_nope, kv_rank)
        u_v = U[n_kv * n_nope :].view(n_kv, D, kv_rank)
        kv_b = U.new_zeros(H, 2 * D, kv_rank)
        q = w_q.new_zeros(H, D + rd, C)
        group = H // n_kv
        for h in range(H):
            kv_b[h, :n_nope], kv_b[h, D:] = u_k[h // group], u_v[h // group]
            q[h, :n_nope], q[h, D:] = w_q[h, nope_idx] * scale, w_q[h, rope_idx] * scale
        out[p + "kv_b.weight"] = kv_b.reshape(H * 2 * D, kv_rank)
        out[p + "q_proj.weight"] = q.reshape(H * (D + rd), C)
        out[p + "c_proj.weight"] = state[p + "c_proj.weight"]
        if b_kv is not None:  # biases: the latent has none; kv_b adds the K (NoPE) and V biases back
            b_k, b_v = b_kv.view(2, n_kv, D).unbind(0)
            out[p + "kv_a.bias"] = torch.cat([b_kv.new_zeros(kv_rank), b_k[:, rope_idx].reshape(-1)])
            bb = b_kv.new_zeros(H, 2 * D)
            bq = b_q.new_zeros(H, D + rd)
            for h in range(H):
                bb[h, :n_nope], bb[h, D:] = b_k[h // group, nope_idx], b_v[h // group]
                bq[h, :n_nope] = b_q.view(H, D)[h, nope_idx] * scale
                bq[h, D:] = b_q.view(H, D)[h, rope_idx] * scale
            out[p + "kv_b.bias"], out[p + "q_proj.bias"] = bb.reshape(-1), bq.reshape(-1)
            out[p + "c_proj.bias"] = state[p + "c_proj.bias"]
        layer_atts[i] = AttentionConfig(
            kind="mla",
            kv_rank=kv_rank,
            rope_dim=rd,
            rope_heads=n_kv if rd and n_kv > 1 else None,
            rope_pairs=pairs if rd else None,
            latent_norm=False,
        )
    # One structure for the model; layers whose RoPE pairs differ carry their own override.
    base = layer_atts[0]
    new_att = base.replace(layers={i: a for i, a in layer_atts.items() if a != base})
    return build_like(model, new_att, out, "to_mla")


def _select_pairs(w_q, w_k, G, R: int, n_keep: int) -> list[int]:
    """The n_keep RoPE frequency pairs to keep, sorted. With calibration moments G: MHA2MLA's 2-norm rule,
    the pairs with the largest sum over query heads of RMS|q_pair| x RMS|k_pair| (RMS over tokens, from G;
    a pair's norm is the same before and after rotation). Without: the highest frequencies (pairs 0..)."""
    if n_keep == 0:
        return []
    if G is None:
        return list(range(n_keep))
    half = R // 2
    H, n_kv = w_q.shape[0], w_k.shape[0]
    G = G.to(w_q.device)

    def pair_rms(w):  # w (heads, D, C) -> (heads, half): sqrt(E |w_pair x|^2)
        e = torch.einsum("hdc,ce,hde->hd", w.double(), G, w.double())  # (heads, D): E[(w_d x)^2]
        return (e[:, :half] + e[:, half:R]).clamp_min(0).sqrt()

    score = (pair_rms(w_q) * pair_rms(w_k).repeat_interleave(H // n_kv, dim=0)).sum(0)  # (half,)
    return sorted(score.topk(n_keep).indices.tolist())


def _basis(M: torch.Tensor, r: int, G: torch.Tensor | None) -> torch.Tensor:
    """(m, r) orthonormal columns: top-r left singular vectors of M, or with G the top-r eigenvectors of
    M G M^T (PCA of M x). Columns past M's rank are zero (they carry nothing at any setting)."""
    m = M.shape[0]
    if G is None:
        U, _, _ = torch.linalg.svd(M.double(), full_matrices=False)  # (m, min(m, C))
    else:
        _, vecs = torch.linalg.eigh(M.double() @ G.to(M.device) @ M.double().T)  # ascending
        U = vecs.flip(-1)
    U = U[:, :r]
    if U.shape[1] < r:
        U = torch.cat([U, U.new_zeros(m, r - U.shape[1])], dim=1)
    return U.to(M.dtype)
