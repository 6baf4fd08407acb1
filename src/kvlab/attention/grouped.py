"""Grouped KV heads: MHA (n_kv_heads = n_head), GQA, MQA (n_kv_heads = 1), and the presets that share
them across layers (CLA, MLKV).

The cache holds only the n_kv_heads K and V heads; groups of n_head / n_kv_heads query heads share a KV
head inside SDPA at attention time. In RoPE families (NeoX, Llama) keys are rotated before they are
cached, so a layer borrowing this layer's KV reads post-RoPE keys with and without the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from kvlab.attention.base import (
    PLAIN_LINEARS,
    KVStructure,
    Linears,
    Payload,
    StepPosition,
    TensorState,
    causal_attention,
    decode_attention,
    kv_buffer,
    register,
    register_preset,
)
from kvlab.config import AttentionConfig, ModelConfig, ModelShape


@dataclass
class GroupedOptions:
    n_kv_heads: int | None = None  # KV heads per layer; None = n_head (MHA). Must divide n_head.


@register("gqa")
class GroupedAttention(KVStructure):
    """Caches K and V for n_kv_heads heads: (B, H_kv, T, head_dim) each."""

    Options = GroupedOptions
    attends_any_cache_dtype = True

    def __init__(self, cfg: AttentionConfig, model_cfg: ModelConfig, layer_idx: int, owns_kv: bool):
        super().__init__(cfg, model_cfg, layer_idx, owns_kv)
        self.n_kv_heads = cfg.n_kv_heads or model_cfg.n_head
        kv_width = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(self.n_embd, self.n_embd, bias=model_cfg.bias)
        # A borrowing layer has no K/V projection at all: it reads the owner's KV.
        self.kv_proj = nn.Linear(self.n_embd, 2 * kv_width, bias=model_cfg.bias) if owns_kv else None
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=model_cfg.bias)

    def project_kv(self, x: torch.Tensor, pos: int) -> Payload:
        B, T, _ = x.shape
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv_heads, self.head_dim).unbind(2)  # (B, T, H_kv, D)
        k = k.transpose(1, 2)  # (B, H_kv, T, D)
        if self.rotary is not None:
            k = self.rotary(k, pos)  # cached post-RoPE
        return k, v.transpose(1, 2)  # (B, H_kv, T, D) each

    def queries(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """(B, T, C) -> (B, H, T, D), rotated to positions pos.. in RoPE families."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        return self.rotary(q, pos) if self.rotary is not None else q

    def new_state(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (batch_size, self.n_kv_heads, max_len, self.head_dim)
        k, v = kv_buffer(shape, device, dtype), kv_buffer(shape, device, dtype)
        return TensorState({"k": k, "v": v}, time_dim=2)

    def attend(self, x: torch.Tensor, pos: int, kv: Payload) -> torch.Tensor:
        B, T, C = x.shape
        k, v = kv  # (B, H_kv, S, D)
        q = self.queries(x, pos)  # (B, H, T, D)
        y = causal_attention(q, k, v, pos, dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def decode(
        self, x: torch.Tensor, at: StepPosition, state, linear: Linears = PLAIN_LINEARS
    ) -> torch.Tensor:
        """One token per sequence, x (B, C): write its K/V at `at` (owner), attend over 0..pos in place.

        The arithmetic of forward's cached path without its Python layers (payload tuple, state read and
        write loops, module calls); each KV head's G query heads are folded onto the query axis so every
        cached KV head is read once (no mask: a step sees every key, or a static step masks the rest).
        """
        B = x.shape[0]
        H_kv, D = self.n_kv_heads, self.head_dim
        k_buf, v_buf = state.tensors["k"], state.tensors["v"]  # (B, H_kv, max_len, D)
        if self.owns_kv:
            kv = linear(self.kv_proj, x).view(B, 2, H_kv, 1, D)  # (B, 2, H_kv, 1, D)
            k = kv[:, 0] if self.rotary is None else at.rope(self.rotary, kv[:, 0])  # cached post-RoPE
            at.write(k_buf, 2, k)
            at.write(v_buf, 2, kv[:, 1])
        q = linear(self.q_proj, x).view(B, self.n_head, 1, D)  # (B, H, 1, D)
        if self.rotary is not None:
            q = at.rope(self.rotary, q)
        k, v = at.held(k_buf, 2), at.held(v_buf, 2)  # (B, H_kv, S, D) views
        mask = at.mask(k.shape[2], x.device)
        y = decode_attention(q.view(B, H_kv, -1, D), k, v, mask=mask)  # (B, H_kv, G, D), in attend_dtype
        return linear(self.c_proj, y.reshape(B, self.n_embd))

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> float:
        return 2 * self.n_kv_heads * self.head_dim * dtype.itemsize if self.owns_kv else 0

    @property
    def kv_heads(self) -> float:
        return float(self.n_kv_heads)


# ---- presets (seed 000's baselines and cross-layer sharing) ----------------------------------------
@register_preset("mha")
def _mha(shape: ModelShape) -> AttentionConfig:
    return AttentionConfig(kind="gqa", n_kv_heads=shape.n_head)


@register_preset("gqa")
def _gqa(shape: ModelShape) -> AttentionConfig:  # seed 000: n_kv_heads = n_head // 4
    return AttentionConfig(kind="gqa", n_kv_heads=max(1, shape.n_head // 4))


@register_preset("mqa")
def _mqa(shape: ModelShape) -> AttentionConfig:
    return AttentionConfig(kind="gqa", n_kv_heads=1)


@register_preset("cla2")
def _cla2(shape: ModelShape) -> AttentionConfig:  # CLA: adjacent layer pairs share one KV
    return AttentionConfig(kind="gqa", n_kv_heads=shape.n_head, kv_share="every:2")


@register_preset(r"mlkv-(\d+)", "mlkv-<N>")
def _mlkv(shape: ModelShape, n_owners: int) -> AttentionConfig:  # seed 002: N KV heads in the whole model
    return AttentionConfig(kind="gqa", n_kv_heads=1, kv_share=f"groups:{n_owners}")
