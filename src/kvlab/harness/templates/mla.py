"""Attention file for kvlab's seed-000 harness (`kvlab init-attention --from FILL`).

Edit only between the two region markers. Everything outside the region is the frozen harness: the
loader runs the region with exactly the names imported below (math, torch, nn, F) and nothing else.
Check a file with `kvlab validate FILE`; train it with `kvlab train --attention-file FILE --out RUN`.

Seed 000's contract is `CausalSelfAttention(config, layer_idx=0)` with `forward(x)`, (B, T, C) -> (B, T, C).
This fill also implements kvlab's cache interface (optional; delete `new_state` and the `state`/`pos`
arguments and the file is still a valid seed-000 file, timed cache-free):
  new_state(batch_size, max_len, device, dtype) -> dict of preallocated tensors: all the layer keeps for
      max_len tokens ({} for a layer that keeps nothing);
  forward(x, state=None, pos=0): with a state, x holds positions pos..pos+T-1; write what they leave into
      the state's tensors at [pos, pos+T) and attend over positions 0..pos+T-1.
Then the harness measures the bytes the cache really holds, checks cached decoding against the full
forward, and times cached decoding. If you change what K/V hold (e.g. in latent_kv_project), change
new_state to match.
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


def causal_attention(q, k, v, dropout_p, scale=None):
    """SDPA where the T queries are the last T of the S positions in k/v (T == S without a cache)."""
    T, S = q.size(-2), k.size(-2)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # query t sees keys <= S - T + t
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


class CausalSelfAttention(nn.Module):
    """DeepSeek-V2 style latent attention: the cache holds c_kv (kv_lora_rank) + one RoPE key per token."""

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

    def new_state(self, batch_size, max_len, device, dtype):
        """kvlab's cache interface: the latent c_kv and the one shared RoPE key for max_len tokens (what
        DeepSeek-V2 caches); a layer reusing the previous layer's latent keeps nothing."""
        if self.share_across_layers:
            return {}
        return {
            "c_kv": torch.zeros(batch_size, max_len, self.kv_lora_rank, device=device, dtype=dtype),
            "k_pe": torch.zeros(batch_size, 1, max_len, self.qk_rope_head_dim, device=device, dtype=dtype),
        }

    def forward(self, x, state=None, pos=0):
        """(B, T, C) -> (B, T, C). With a state (kvlab's cache), x holds positions pos..pos+T-1."""
        B, T, C = x.size()
        S = pos + T  # the queries see positions 0..S-1
        nope, rope, hv = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        cos, sin = rotary_cos_sin(S, rope, x.device, x.dtype)
        cos, sin = cos[pos:], sin[pos:]  # (T, rope): the angles of x's positions
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # (B, T, nh * (nope + rope))
        q = q.view(B, T, self.n_head, nope + rope).transpose(1, 2)  # (B, nh, T, nope + rope)
        q_nope, q_pe = q.split([nope, rope], dim=-1)
        if self.share_across_layers:
            c_kv, k_pe = CausalSelfAttention._lent_latent[self.layer_idx - 1]  # (B, S, rank), (B, 1, S, rope)
        else:
            c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, rope], dim=-1)
            c_kv = self.kv_a_layernorm(c_kv)  # (B, T, kv_lora_rank): what the cache keeps
            k_pe = apply_rotary(k_pe.unsqueeze(1), cos.to(k_pe.dtype), sin.to(k_pe.dtype))  # (B, 1, T, rope)
            if state is not None:  # append the new tokens' latent and RoPE key, then read every position
                state["c_kv"][:, pos:S] = c_kv
                state["k_pe"][:, :, pos:S] = k_pe
                c_kv = state["c_kv"][:, :S].to(x.dtype)  # (B, S, kv_lora_rank)
                k_pe = state["k_pe"][:, :, :S].to(x.dtype)  # (B, 1, S, rope)
        if self.lends_kv:
            CausalSelfAttention._lent_latent[self.layer_idx] = (c_kv.detach(), k_pe.detach())
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_head, nope + hv).transpose(1, 2)  # (B, nh, S, nope+hv)
        k_nope, v = kv.split([nope, hv], dim=-1)
        q_pe = apply_rotary(q_pe, cos.to(q_pe.dtype), sin.to(q_pe.dtype))
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, nh, T, nope + rope)
        k = torch.cat([k_nope, k_pe.expand(B, self.n_head, S, rope)], dim=-1)  # (B, nh, S, nope + rope)
        self._last_latent_rank_ratio = self.kv_lora_rank / (self.head_dim + self.qk_rope_head_dim)
        self._uses_latent_compression = True
        dropout = self.dropout if self.training else 0.0
        y = causal_attention(q, k, v, dropout, scale=self.softmax_scale)  # (B, nh, T, hv)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * hv)
        return self.resid_dropout(self.c_proj(y))


# END KV EDITABLE REGION
