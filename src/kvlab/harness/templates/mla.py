"""Attention file for kvlab's seed-000 harness (`kvlab init-attention --from FILL`).

Edit only between the two region markers. Everything outside the region is the frozen harness: the
loader runs the region with exactly the names imported below (math, torch, nn, F) and nothing else.
Check a file with `kvlab validate FILE`; train it with `kvlab train --attention-file FILE --out RUN`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# BEGIN KV EDITABLE REGION


def build_kv_heads(config):
    """MLA materialises one latent shared by every query head: (n_kv_head, head_dim) = (1, head_dim)."""
    return 1, config.n_embd // config.n_head


def cross_layer_share(layer_idx, config):
    """True: this layer reuses the previous layer's latent and RoPE key (detached)."""
    return False


def latent_kv_project(k, v, config):
    """Unused by this fill: the latent projection lives inside CausalSelfAttention."""
    return k, v, 1.0


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_cos_sin(T, dim, device, dtype, theta=10000.0):
    """cos, sin of shape (T, dim) for RoPE over positions 0..T-1 (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)  # (T, dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate (..., T, dim) by the position angles (rotate-half RoPE)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    """DeepSeek-V2 style latent attention: the cache would hold c_kv (kv_lora_rank) + one RoPE key."""

    # layer_idx -> detached (c_kv, k_pe) of the last forward, kept only for a next layer that shares it
    _lent_latent = {}

    def __init__(self, config, layer_idx=0):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd={config.n_embd} must be a multiple of n_head={config.n_head}")
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head, self.head_dim = build_kv_heads(config)
        self.qk_nope_head_dim = self.head_dim
        self.qk_rope_head_dim = self.head_dim  # one RoPE key shared by all heads
        self.v_head_dim = self.head_dim
        self.kv_lora_rank = getattr(config, "kv_lora_rank", None) or max(16, self.head_dim // 2)
        self.q_lora_rank = min(config.n_embd, 12 * self.head_dim)
        self.softmax_scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        self.share_across_layers = layer_idx > 0 and bool(cross_layer_share(layer_idx, config))
        self.lends_kv = bool(cross_layer_share(layer_idx + 1, config))
        self.head_sharing_ratio = self.n_head / self.n_kv_head
        self.use_pos_emb = False  # RoPE carries positions; the model drops its learned ones
        qk_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.q_a_proj = nn.Linear(config.n_embd, self.q_lora_rank, bias=config.bias)
        self.q_a_layernorm = RMSNorm(self.q_lora_rank)
        self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_head * qk_dim, bias=config.bias)
        if not self.share_across_layers:
            self.kv_a_proj_with_mqa = nn.Linear(
                config.n_embd, self.kv_lora_rank + self.qk_rope_head_dim, bias=config.bias
            )
            self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.n_head * (self.qk_nope_head_dim + self.v_head_dim), bias=config.bias
        )
        self.c_proj = nn.Linear(self.n_head * self.v_head_dim, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self._last_latent_rank_ratio = self.kv_lora_rank / (self.head_dim + self.qk_rope_head_dim)
        kept = 0 if self.share_across_layers else self.kv_lora_rank + self.qk_rope_head_dim
        self._last_kv_storage_ratio = kept / (2 * self.n_head * self.head_dim)  # vs MHA's K and V
        self._uses_latent_compression = True

    def forward(self, x):
        B, T, C = x.size()
        nope, rope, hv = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        cos, sin = rotary_cos_sin(T, rope, x.device, x.dtype)
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # (B, T, nh * (nope + rope))
        q = q.view(B, T, self.n_head, nope + rope).transpose(1, 2)  # (B, nh, T, nope + rope)
        q_nope, q_pe = q.split([nope, rope], dim=-1)
        if self.share_across_layers:
            c_kv, k_pe = CausalSelfAttention._lent_latent[self.layer_idx - 1]
        else:
            c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, rope], dim=-1)
            c_kv = self.kv_a_layernorm(c_kv)  # (B, T, kv_lora_rank): what a cache would keep
            k_pe = apply_rotary(k_pe.unsqueeze(1), cos.to(k_pe.dtype), sin.to(k_pe.dtype))  # (B, 1, T, rope)
        if self.lends_kv:
            CausalSelfAttention._lent_latent[self.layer_idx] = (c_kv.detach(), k_pe.detach())
        kv = self.kv_b_proj(c_kv).view(B, T, self.n_head, nope + hv).transpose(1, 2)  # (B, nh, T, nope+hv)
        k_nope, v = kv.split([nope, hv], dim=-1)
        q_pe = apply_rotary(q_pe, cos.to(q_pe.dtype), sin.to(q_pe.dtype))
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, nh, T, nope + rope)
        k = torch.cat([k_nope, k_pe.expand(B, self.n_head, T, rope)], dim=-1)  # (B, nh, T, nope + rope)
        self._last_latent_rank_ratio = self.kv_lora_rank / (self.head_dim + self.qk_rope_head_dim)
        self._uses_latent_compression = True
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
            scale=self.softmax_scale,
        )  # (B, nh, T, hv)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * hv)
        return self.resid_dropout(self.c_proj(y))


# END KV EDITABLE REGION
