"""Latent KV attention (MLA, DeepSeek-V2 style, as seed 000's MLA baseline).

Each token leaves only a normalised latent `c_kv` (kv_rank) and one decoupled RoPE key shared by all heads
(rope_dim) in the cache. Full forwards decompress per-head K/V from the latent (unabsorbed path); cached
decode steps fold the K up-projection into the query and the V up-projection into the output (absorbed
path), so they read the latent alone and never rebuild per-head K/V for the past.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from kvlab.attention.base import (
    KVStructure,
    Payload,
    TensorState,
    causal_attention,
    register,
    register_preset,
)
from kvlab.attention.rope import Rotary
from kvlab.config import AttentionConfig, ConfigError, ModelConfig, ModelShape

_RMS_EPS = 1e-6  # DeepSeek-V2's RMSNorm epsilon


def _rms_norm(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm in float32 (as DeepSeek-V2), cast back: under bf16 autocast the Linear before it yields
    bf16, and a bf16 mean of squares is both less accurate and off torch's fused kernel."""
    return norm(x.float()).to(x.dtype)


@dataclass
class MLAOptions:
    kv_rank: int | None = None  # latent width c_kv cached per token
    rope_dim: int | None = None  # width of the decoupled RoPE key shared by all heads
    q_rank: int | None = None  # optional low-rank query (None = full-rank query projection)
    # RoPE base of the decoupled key; None = the model's rope_theta in RoPE families, else 10000
    rope_theta: float | None = None


@register("mla")
class LatentAttention(KVStructure):
    """Caches c_kv (B, T, kv_rank) after RMSNorm and k_rope (B, T, rope_dim) after RoPE; nothing else.

    A layer that borrows KV (CLA/MLKV) has no kv_a projection and stores nothing, but keeps its own query
    and its own kv_b up-projection: the shared cache holds only the latent, so per-layer up-projections
    cost parameters, not memory.
    """

    provides_positions = True  # the decoupled RoPE key carries positions; an all-MLA model has no wpe
    Options = MLAOptions  # no n_kv_heads: the latent is one shared KV head

    def __init__(self, cfg: AttentionConfig, model_cfg: ModelConfig, layer_idx: int, owns_kv: bool):
        super().__init__(cfg, model_cfg, layer_idx, owns_kv)
        self.kv_rank = cfg.kv_rank
        self.rope_dim = cfg.rope_dim
        self.q_rank = cfg.q_rank
        # The decoupled key follows the family's RoPE (base, Llama 3 scaling) unless set here.
        rope_family = model_cfg.positions == "rope"
        theta = cfg.rope_theta or (model_cfg.rope_theta if rope_family else 10000.0)
        self.rope_theta = theta
        self.decoupled_rope = Rotary(self.rope_dim, theta, model_cfg.rope_scaling if rope_family else None)
        bias = model_cfg.bias
        q_width = self.n_head * (self.head_dim + self.rope_dim)  # per head: q_nope ++ q_rope
        if self.q_rank:  # low-rank query with a norm on its bottleneck (DeepSeek-V2 eq. 12-13)
            self.q_a = nn.Linear(self.n_embd, self.q_rank, bias=bias)
            self.q_norm = nn.RMSNorm(self.q_rank, eps=_RMS_EPS)
            self.q_b = nn.Linear(self.q_rank, q_width, bias=bias)
        else:
            self.q_proj = nn.Linear(self.n_embd, q_width, bias=bias)
        if owns_kv:  # the down-projection writes the cache, so only an owner has one
            self.kv_a = nn.Linear(self.n_embd, self.kv_rank + self.rope_dim, bias=bias)
            self.kv_norm = nn.RMSNorm(self.kv_rank, eps=_RMS_EPS)
        # Up-projection of the latent: per head k_nope (head_dim) then v (head_dim).
        self.kv_b = nn.Linear(self.kv_rank, self.n_head * 2 * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, self.n_embd, bias=bias)
        # None: pick by cost (absorbed for cached decode steps / short chunks); True/False force a path.
        self.absorb: bool | None = None

    # ---- configuration --------------------------------------------------------------------------
    @classmethod
    def validate(cls, cfg: AttentionConfig, model_cfg: ModelConfig) -> None:
        for name in ("kv_rank", "rope_dim"):
            v = getattr(cfg, name)
            if v is None or not isinstance(v, int) or v <= 0:
                raise ConfigError(
                    f"{name}={v!r}: kind='mla' needs a positive integer {name} (e.g. the 'mla' preset: "
                    f"kv_rank={4 * model_cfg.head_dim}, rope_dim={model_cfg.head_dim})"
                )
        if cfg.rope_dim % 2:
            raise ConfigError(
                f"rope_dim={cfg.rope_dim} must be even (RoPE rotates pairs); try {cfg.rope_dim + 1}"
            )
        if cfg.q_rank is not None and (not isinstance(cfg.q_rank, int) or cfg.q_rank <= 0):
            raise ConfigError(
                f"q_rank={cfg.q_rank!r} must be a positive integer, or None for a full-rank query"
            )
        if cfg.rope_theta is not None and cfg.rope_theta <= 0:
            raise ConfigError(f"rope_theta={cfg.rope_theta} must be positive; the usual value is 10000")

    def reset_parameters(self) -> None:
        # RMSNorm gains start at 1 (the model's generic init only touches Linear and Embedding).
        for norm in (getattr(self, "q_norm", None), getattr(self, "kv_norm", None)):
            if norm is not None:
                nn.init.ones_(norm.weight)

    # ---- helpers --------------------------------------------------------------------------------
    def _rope(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """Rotate x (..., T, rope_dim) to absolute positions pos..pos+T-1."""
        return self.decoupled_rope(x, pos)

    def _query(self, x: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q = self.q_b(_rms_norm(self.q_norm, self.q_a(x))) if self.q_rank else self.q_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim + self.rope_dim).transpose(1, 2)  # (B, H, T, hd + rd)
        q_nope, q_rope = q.split([self.head_dim, self.rope_dim], dim=-1)  # (B, H, T, hd), (B, H, T, rd)
        return q_nope, self._rope(q_rope, pos)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b's weight split per head: W_UK, W_UV each (H, head_dim, kv_rank)."""
        w = self.kv_b.weight.view(self.n_head, 2 * self.head_dim, self.kv_rank)  # (H, 2 hd, r)
        return w[:, : self.head_dim], w[:, self.head_dim :]

    def use_absorbed(self, pos: int, n_new: int) -> bool:
        """Which path a call takes: self.absorb if set, else the cheaper one for a cached call.

        Decompressing S cached latents costs about 2 S kv_rank H head_dim FLOPs; absorbing instead makes
        each of the T queries score and mix over kv_rank (not head_dim) wide keys, about
        2 T S H (kv_rank - head_dim) more. Absorb when that is cheaper, i.e. for decode steps and short
        chunks; prefill from position 0 and training keep the unabsorbed path (DeepSeek-V2, section 2.1.2).
        """
        if self.absorb is not None:
            return self.absorb
        return pos > 0 and n_new * (self.kv_rank - self.head_dim) < self.kv_rank * self.head_dim

    # ---- the interface --------------------------------------------------------------------------
    def project_kv(self, x: torch.Tensor, pos: int) -> Payload:
        c_kv, k_rope = self.kv_a(x).split([self.kv_rank, self.rope_dim], dim=-1)  # (B, T, r), (B, T, rd)
        return _rms_norm(self.kv_norm, c_kv), self._rope(k_rope, pos)

    def new_state(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        c_kv = torch.zeros(batch_size, max_len, self.kv_rank, device=device, dtype=dtype)
        k_rope = torch.zeros(batch_size, max_len, self.rope_dim, device=device, dtype=dtype)
        return TensorState({"c_kv": c_kv, "k_rope": k_rope}, time_dim=1)

    def attend(self, x: torch.Tensor, pos: int, kv: Payload) -> torch.Tensor:
        B, T, _ = x.shape
        c_kv, k_rope = kv  # (B, S, kv_rank), (B, S, rope_dim)
        q_nope, q_rope = self._query(x, pos)
        scale = (self.head_dim + self.rope_dim) ** -0.5
        dropout_p = self.dropout if self.training else 0.0
        if self.use_absorbed(pos, T):
            y = self._attend_absorbed(q_nope, q_rope, c_kv, k_rope, pos, scale, dropout_p)
        else:
            y = self._attend_unabsorbed(q_nope, q_rope, c_kv, k_rope, pos, scale, dropout_p)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))  # (B, T, C)

    def _attend_unabsorbed(self, q_nope, q_rope, c_kv, k_rope, pos, scale, dropout_p) -> torch.Tensor:
        """Decompress per-head K/V from the latent, then plain SDPA. Returns (B, H, T, head_dim)."""
        B, S, _ = c_kv.shape
        kv = self.kv_b(c_kv).view(B, S, self.n_head, 2 * self.head_dim).transpose(1, 2)  # (B, H, S, 2 hd)
        k_nope, v = kv.split([self.head_dim, self.head_dim], dim=-1)  # (B, H, S, hd) each
        k_rope = k_rope[:, None].expand(B, self.n_head, S, self.rope_dim)  # (B, H, S, rd): one shared key
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, hd + rd)
        k = torch.cat([k_nope, k_rope], dim=-1)  # (B, H, S, hd + rd)
        return causal_attention(q, k, v, pos, scale=scale, dropout_p=dropout_p)

    def _attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, pos, scale, dropout_p) -> torch.Tensor:
        """Attend in latent space: keys are (c_kv ++ k_rope), values are c_kv, one KV head for all heads.

        q_nope . (W_UK c + b_K) = (q_nope W_UK) . c + q_nope . b_K; the second term is the same for every
        key, so softmax drops it. sum_s p_s (W_UV c_s + b_V) = W_UV (sum_s p_s c_s) + b_V since the p_s sum
        to 1. Returns (B, H, T, head_dim).
        """
        w_uk, w_uv = self._up_weights()  # (H, hd, r) each
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, H, T, r)
        q = torch.cat([q_latent, q_rope], dim=-1)  # (B, H, T, r + rd)
        k = torch.cat([c_kv, k_rope], dim=-1)[:, None]  # (B, 1, S, r + rd): the cache as one KV head
        v = c_kv[:, None]  # (B, 1, S, r): the values are the latent itself
        o_latent = causal_attention(q, k, v, pos, scale=scale, dropout_p=dropout_p)  # (B, H, T, r)
        y = torch.einsum("bhtr,hdr->bhtd", o_latent, w_uv)  # (B, H, T, hd)
        if self.kv_b.bias is not None:
            b_v = self.kv_b.bias.view(self.n_head, 2 * self.head_dim)[:, self.head_dim :]  # (H, hd)
            y = y + b_v[None, :, None, :]
        return y

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> float:
        return (self.kv_rank + self.rope_dim) * dtype.itemsize if self.owns_kv else 0

    @property
    def kv_heads(self) -> float:
        return 1.0  # the latent is one KV "head" shared by every query head (seed 000 convention)

    @property
    def latent_rank_ratio(self) -> float:
        return self.kv_rank / (self.head_dim + self.rope_dim)


@register_preset("mla")
def _mla(shape: ModelShape) -> AttentionConfig:
    """Seed 000's MLA: kv_rank = 4 * head_dim, rope_dim = head_dim, q_rank = min(C, 12 * head_dim)."""
    hd = shape.head_dim
    return AttentionConfig(kind="mla", kv_rank=4 * hd, rope_dim=hd, q_rank=min(shape.n_embd, 12 * hd))
