"""Attention file for kvlab's seed-000 harness (`kvlab init-attention --from FILL`).

Edit only between the two region markers. Everything outside the region is the frozen harness: the
loader runs the region with exactly the names imported below (math, torch, nn, F) and nothing else.
Check a file with `kvlab validate FILE`; train it with `kvlab train --attention-file FILE --out RUN`.
"""

import torch.nn as nn
import torch.nn.functional as F

# BEGIN KV EDITABLE REGION


def build_kv_heads(config):
    """How many K/V heads the block materialises and their width: (n_kv_head, head_dim)."""
    head_dim = config.n_embd // config.n_head
    return config.n_head, head_dim


def cross_layer_share(layer_idx, config):
    """True: this layer reuses the previous layer's K/V (detached) instead of computing its own."""
    return False


def latent_kv_project(k, v, config):
    """Optionally compress K/V into a latent space: returns (k, v, latent_ratio). Identity here."""
    return k, v, 1.0


def expand_kv_to_q_heads(x, n_rep):
    """(B, H_kv, T, D) -> (B, H_kv * n_rep, T, D): each K/V head serves n_rep query heads."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


class CausalSelfAttention(nn.Module):
    # layer_idx -> detached (k, v) of the last forward, kept only for a next layer that shares it
    _lent_kv = {}

    def __init__(self, config, layer_idx=0):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd={config.n_embd} must be a multiple of n_head={config.n_head}")
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.n_kv_head, self.head_dim = build_kv_heads(config)
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        self.share_across_layers = layer_idx > 0 and bool(cross_layer_share(layer_idx, config))
        self.lends_kv = bool(cross_layer_share(layer_idx + 1, config))
        self.head_sharing_ratio = self.n_head / self.n_kv_head
        self.use_pos_emb = True
        q_width = self.n_head * self.head_dim
        kv_width = 0 if self.share_across_layers else self.n_kv_head * self.head_dim
        self.split_sizes = [q_width, kv_width, kv_width]
        self.c_attn = nn.Linear(config.n_embd, q_width + 2 * kv_width, bias=config.bias)
        self.c_proj = nn.Linear(q_width, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self._last_latent_rank_ratio = 1.0
        self._last_kv_storage_ratio = self.n_kv_head / self.n_head
        self._uses_latent_compression = False

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.split_sizes, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        if self.share_across_layers:
            k, v = CausalSelfAttention._lent_kv[self.layer_idx - 1]  # (B, n_kv, T, hd), no gradient
            ratio = self._last_latent_rank_ratio
        else:
            k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
            v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
            k, v, ratio = latent_kv_project(k, v, self)
        if self.lends_kv:
            CausalSelfAttention._lent_kv[self.layer_idx] = (k.detach(), v.detach())
        self._last_latent_rank_ratio = float(ratio)
        self._last_kv_storage_ratio = 0.0 if self.share_across_layers else self.n_kv_head / self.n_head
        self._uses_latent_compression = float(ratio) != 1.0
        n_rep = self.n_head // k.size(1)
        k = expand_kv_to_q_heads(k, n_rep)  # (B, nh, T, hd)
        v = expand_kv_to_q_heads(v, n_rep)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


# END KV EDITABLE REGION
