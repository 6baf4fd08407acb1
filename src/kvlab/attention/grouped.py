"""Grouped KV heads: MHA (n_kv_heads = n_head), GQA, MQA (n_kv_heads = 1).

The cache holds only the n_kv_heads K and V heads; groups of n_head / n_kv_heads query heads share a KV
head inside SDPA at attention time. Positions come from the model's learned embedding (GPT-2 family).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kvlab.attention.base import KVStructure, Payload, TensorState, causal_attention, register
from kvlab.config import AttentionConfig, ModelConfig


@register("gqa")
class GroupedAttention(KVStructure):
    """Caches K and V for n_kv_heads heads: (B, H_kv, T, head_dim) each."""

    def __init__(self, cfg: AttentionConfig, model_cfg: ModelConfig, layer_idx: int, owns_kv: bool):
        super().__init__(cfg, model_cfg, layer_idx, owns_kv)
        self.n_kv_heads = cfg.n_kv_heads or model_cfg.n_head
        kv_width = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(self.n_embd, self.n_embd, bias=model_cfg.bias)
        # A borrowing layer has no K/V projection at all: it reads the owner's KV.
        self.kv_proj = nn.Linear(self.n_embd, 2 * kv_width, bias=model_cfg.bias) if owns_kv else None
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=model_cfg.bias)

    config_fields = ("n_kv_heads",)

    def project_kv(self, x: torch.Tensor, pos: int) -> Payload:
        B, T, _ = x.shape
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv_heads, self.head_dim).unbind(2)  # (B, T, H_kv, D)
        return k.transpose(1, 2), v.transpose(1, 2)  # (B, H_kv, T, D) each

    def new_state(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (batch_size, self.n_kv_heads, max_len, self.head_dim)
        k = torch.zeros(shape, device=device, dtype=dtype)
        v = torch.zeros(shape, device=device, dtype=dtype)
        return TensorState({"k": k, "v": v}, time_dim=2)

    def attend(self, x: torch.Tensor, pos: int, kv: Payload) -> torch.Tensor:
        B, T, C = x.shape
        k, v = kv  # (B, H_kv, S, D)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        y = causal_attention(q, k, v, pos, dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> float:
        return 2 * self.n_kv_heads * self.head_dim * dtype.itemsize if self.owns_kv else 0

    @property
    def kv_heads(self) -> float:
        return float(self.n_kv_heads)
