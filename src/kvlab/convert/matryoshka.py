"""Grouped KV (MHA/GQA/MQA) -> MatryoshkaKV: copy every weight, add per-head projections; PCA init.

Matryoshka layers keep GQA's parameter names, so conversion is a key-by-key copy; the new rotation and
mean parameters start at identity/zero (or PCA of calibration K/V, seed 003), and at full rank the
converted model reproduces the original's logits.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kvlab.attention.matryoshka import get_ranks, layers_or_error, set_ranks
from kvlab.config import AttentionConfig, ConfigError
from kvlab.convert.common import build_like, grouped_attention_or_error
from kvlab.model import GPT


def to_matryoshka(
    model: GPT,
    ranks: int | None = None,
    calibration: Iterable[torch.Tensor] | None = None,
) -> GPT:
    """A Matryoshka copy of a grouped-KV `model` (same n_kv_heads), at rank `ranks` (None = full).

    With `calibration` (an iterable of (B, T) token tensors), bases and means are PCA-initialised;
    otherwise U = identity and mu = 0. The original model is left untouched.
    """
    att = grouped_attention_or_error(model, "to_matryoshka")
    if att.kv_share != "none":
        raise ConfigError(
            f"to_matryoshka needs kv_share='none' (got {att.kv_share!r}); Matryoshka layers own their KV"
        )
    new_att = AttentionConfig(kind="matryoshka", n_kv_heads=att.n_kv_heads, ranks=ranks)
    new = ("k_base", "v_base", "k_skew", "v_skew", "k_mean", "v_mean")  # only the projections are new
    target = build_like(model, new_att, model.state_dict(), "to_matryoshka", new_suffixes=new)
    if calibration is not None:
        pca_init_(target, calibration)
    return target


@torch.no_grad()
def pca_init_(model: GPT, idx_batches: Iterable[torch.Tensor]) -> None:
    """Initialise every Matryoshka layer by PCA of its K and V on calibration tokens (seed 003).

    Runs the model at full rank (the output is then independent of the bases), collects per-head mean and
    covariance of the unprojected K/V in float64, and sets mu = mean, U = eigenvectors of the mean-centred
    covariance by descending eigenvalue, so the first r columns keep the most variance. Ranks are restored.
    """
    layers = layers_or_error(model)
    saved = get_ranks(model)
    set_ranks(model, k=layers[0][1].head_dim, v=layers[0][1].head_dim)
    stats: dict[int, list] = {}

    def hook(attn, args, kwargs):
        x = args[0]
        k, v = attn.full_kv(x, kwargs.get("pos", 0))  # (B, H_kv, T, D)
        acc = stats.setdefault(attn.layer_idx, [0, None, None, None, None])
        for j, t in enumerate((k, v)):
            t = t.double().transpose(0, 1).flatten(1, 2)  # (H_kv, B*T, D)
            s, ss = t.sum(1), t.transpose(1, 2) @ t  # (H_kv, D), (H_kv, D, D)
            acc[1 + 2 * j] = s if acc[1 + 2 * j] is None else acc[1 + 2 * j] + s
            acc[2 + 2 * j] = ss if acc[2 + 2 * j] is None else acc[2 + 2 * j] + ss
        acc[0] += k.shape[0] * k.shape[2]

    handles = [a.register_forward_pre_hook(hook, with_kwargs=True) for _, a in layers]
    was_training = model.training
    try:
        model.eval()
        for idx in idx_batches:
            model(idx)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        set_ranks(model, k=saved["k"], v=saved["v"])
    if not stats:
        raise ConfigError("pca_init_ got no calibration batches; pass at least one (B, T) token tensor")
    for i, attn in layers:
        n, k_sum, k_sq, v_sum, v_sq = stats[i]
        bases, means = [], []
        for s, ss in ((k_sum, k_sq), (v_sum, v_sq)):
            mean = s / n  # (H_kv, D)
            cov = ss / n - mean[:, :, None] * mean[:, None, :]  # (H_kv, D, D), mean-centred
            _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
            bases.append(vecs.flip(-1))  # descending: rank r keeps the top-r principal directions
            means.append(mean)
        attn.set_bases_(bases[0].to(attn.k_base.dtype), bases[1].to(attn.v_base.dtype))
        attn.k_mean.copy_(means[0])
        attn.v_mean.copy_(means[1])
