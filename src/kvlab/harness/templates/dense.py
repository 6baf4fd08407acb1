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


def causal_attention(q, k, v, dropout_p, scale=None):
    """SDPA where the T queries are the last T of the S positions in k/v (T == S without a cache)."""
    T, S = q.size(-2), k.size(-2)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # query t sees keys <= S - T + t
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


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

    def new_state(self, batch_size, max_len, device, dtype):
        """kvlab's cache interface: this layer's K and V (n_kv_head heads) for max_len tokens, preallocated;
        a layer reusing the previous layer's K/V keeps nothing."""
        if self.share_across_layers:
            return {}
        shape = (batch_size, self.n_kv_head, max_len, self.head_dim)  # (B, n_kv, max_len, hd)
        return {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
        }

    def forward(self, x, state=None, pos=0):
        """(B, T, C) -> (B, T, C). With a state (kvlab's cache), x holds positions pos..pos+T-1."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.split_sizes, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        if self.share_across_layers:
            k, v = CausalSelfAttention._lent_kv[self.layer_idx - 1]  # (B, n_kv, S, hd), no gradient
            ratio = self._last_latent_rank_ratio
        else:
            k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
            v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
            k, v, ratio = latent_kv_project(k, v, self)
            if state is not None:  # append the new tokens' K/V, then read every cached position
                state["k"][:, :, pos : pos + T] = k
                state["v"][:, :, pos : pos + T] = v
                k = state["k"][:, :, : pos + T].to(q.dtype)  # (B, n_kv, S = pos + T, hd)
                v = state["v"][:, :, : pos + T].to(q.dtype)  # (B, n_kv, S, hd)
        if self.lends_kv:
            CausalSelfAttention._lent_kv[self.layer_idx] = (k.detach(), v.detach())
        self._last_latent_rank_ratio = float(ratio)
        self._last_kv_storage_ratio = 0.0 if self.share_across_layers else self.n_kv_head / self.n_head
        self._uses_latent_compression = float(ratio) != 1.0
        n_rep = self.n_head // k.size(1)
        k = expand_kv_to_q_heads(k, n_rep)  # (B, nh, S, hd)
        v = expand_kv_to_q_heads(v, n_rep)  # (B, nh, S, hd)
        y = causal_attention(q, k, v, self.dropout if self.training else 0.0)  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


# END KV EDITABLE REGION
