"""Grouped KV (MHA/GQA/MQA) -> MatryoshkaKV: copy every weight, add per-head projections.

Matryoshka layers keep GQA's parameter names, so conversion is a key-by-key copy; the new rotation and
mean parameters start at identity/zero (or PCA of calibration K/V, seed 003), and at full rank the
converted model reproduces the original's logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from kvlab.attention.matryoshka import pca_init_
from kvlab.config import AttentionConfig, ConfigError
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
    att = model.config.attention
    if att.kind != "gqa" or att.layers:
        raise ConfigError(
            f"to_matryoshka converts kind='gqa' models without per-layer overrides; got kind={att.kind!r}"
            f"{' with layers overrides' if att.layers else ''}"
        )
    if att.kv_share != "none":
        raise ConfigError(
            f"to_matryoshka needs kv_share='none' (got {att.kv_share!r}); Matryoshka layers own their KV"
        )
    new_att = AttentionConfig(kind="matryoshka", n_kv_heads=att.n_kv_heads, ranks=ranks)
    cfg = dataclasses.replace(model.config, attention=new_att)
    device = model.wte.weight.device
    target = GPT(cfg).to(device=device, dtype=model.wte.weight.dtype)
    source = model.state_dict()
    state = target.state_dict()
    added = sorted(set(state) - set(source))
    for name in added:  # only the projection parameters are new
        if name.rsplit(".", 1)[-1] not in ("k_base", "v_base", "k_skew", "v_skew", "k_mean", "v_mean"):
            raise AssertionError(f"to_matryoshka: unexpected new tensor {name}")
    missing = sorted(set(source) - set(state))
    assert not missing, f"to_matryoshka: tensors {missing[:3]} have no place in the Matryoshka model"
    for name, tensor in source.items():
        shape, want = tuple(tensor.shape), tuple(state[name].shape)
        assert shape == want, f"to_matryoshka: {name} has shape {shape}, the Matryoshka model {want}"
        state[name] = tensor.detach().clone()
    target.load_state_dict(state, strict=True)
    target.train(model.training)
    if calibration is not None:
        pca_init_(target, calibration)
    return target
