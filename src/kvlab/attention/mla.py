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
    PLAIN_LINEARS,
    KVStructure,
    Linears,
    Payload,
    StepPosition,
    TensorState,
    attend_dtype,
    causal_attention,
    register,
    register_preset,
)
from kvlab.attention.rope import Rotary, apply_rope, rope_inv_freq
from kvlab.config import AttentionConfig, ConfigError, ModelConfig, ModelShape, _divisors

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
    # Options for models converted from MHA/GQA (kvlab.convert.mla): with them the conversion is exact at
    # full rank. rope_heads: decoupled RoPE keys per token (None = 1 shared by all heads, DeepSeek-V2; n:
    # query head h reads key h // (n_head / n), MHA2MLA's per-head partial RoPE). rope_pairs: which
    # frequency pairs of the model's own RoPE the decoupled key uses (None = RoPE at width rope_dim).
    # latent_norm False drops the RMSNorm on the latent so the latent path stays linear.
    rope_heads: int | None = None
    rope_pairs: list[int] | None = None
    latent_norm: bool | None = None


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
        if cfg.rope_pairs is not None:  # a subset of the model's own frequencies (converted models)
            self.decoupled_rope = _PairRotary(Rotary.from_model(model_cfg), cfg.rope_pairs)
        self.rope_heads = cfg.rope_heads or 1
        self.provides_positions = self.rope_dim > 0  # rope_dim 0: positions come from the family
        self.latent_norm = cfg.latent_norm is not False
        bias = model_cfg.bias
        q_width = self.n_head * (self.head_dim + self.rope_dim)  # per head: q_nope ++ q_rope
        if self.q_rank:  # low-rank query with a norm on its bottleneck (DeepSeek-V2 eq. 12-13)
            self.q_a = nn.Linear(self.n_embd, self.q_rank, bias=bias)
            self.q_norm = nn.RMSNorm(self.q_rank, eps=_RMS_EPS)
            self.q_b = nn.Linear(self.q_rank, q_width, bias=bias)
        else:
            self.q_proj = nn.Linear(self.n_embd, q_width, bias=bias)
        if owns_kv:  # the down-projection writes the cache, so only an owner has one
            self.kv_a = nn.Linear(self.n_embd, self.kv_rank + self.rope_heads * self.rope_dim, bias=bias)
            self.kv_norm = nn.RMSNorm(self.kv_rank, eps=_RMS_EPS) if self.latent_norm else None
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
            if v is None or not isinstance(v, int) or v < (name == "kv_rank"):
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
        if cfg.rope_heads is not None and (cfg.rope_heads <= 0 or model_cfg.n_head % cfg.rope_heads):
            raise ConfigError(
                f"rope_heads={cfg.rope_heads} must divide n_head={model_cfg.n_head}; "
                f"try {_divisors(model_cfg.n_head)}"
            )
        if cfg.rope_pairs is not None:
            n_pairs = model_cfg.rope_dim // 2 if model_cfg.positions == "rope" else 0
            if len(cfg.rope_pairs) * 2 != cfg.rope_dim or not all(0 <= j < n_pairs for j in cfg.rope_pairs):
                raise ConfigError(
                    f"rope_pairs={cfg.rope_pairs} must list rope_dim/2={cfg.rope_dim // 2} frequency pairs "
                    f"of the model's RoPE (0..{n_pairs - 1}); leave it unset for RoPE at width rope_dim"
                )

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
        B, T, _ = x.shape
        c_kv, k_rope = self.kv_a(x).split([self.kv_rank, self.rope_heads * self.rope_dim], dim=-1)
        if self.rope_heads > 1:  # (B, T, n * rd) -> (B, n, T, rd): one key per group of query heads
            k_rope = k_rope.view(B, T, self.rope_heads, self.rope_dim).transpose(1, 2)
        c_kv = _rms_norm(self.kv_norm, c_kv) if self.kv_norm is not None else c_kv
        if self.rope_heads == 1:  # one contiguous latent (B, T, r + rd): c_kv ++ k_rope
            return (torch.cat([c_kv, self._rope(k_rope, pos)], dim=-1),)
        return c_kv, self._rope(k_rope, pos)  # (B, T, r), (B, n, T, rd)

    def new_state(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        if self.rope_heads == 1:  # one buffer, so the absorbed decode reads its key in place (a view)
            latent = torch.zeros(
                batch_size, max_len, self.kv_rank + self.rope_dim, device=device, dtype=dtype
            )
            return TensorState({"latent": latent}, time_dim=1)
        c_kv = torch.zeros(batch_size, max_len, self.kv_rank, device=device, dtype=dtype)
        if self.rope_heads > 1:  # per-head keys: (B, n, T, rd), time on axis 2 unlike c_kv
            k_rope = torch.zeros(
                batch_size, self.rope_heads, max_len, self.rope_dim, device=device, dtype=dtype
            )
            return TensorState({"c_kv": c_kv, "k_rope": k_rope}, time_dim={"c_kv": 1, "k_rope": 2})
        k_rope = torch.zeros(batch_size, max_len, self.rope_dim, device=device, dtype=dtype)
        return TensorState({"c_kv": c_kv, "k_rope": k_rope}, time_dim=1)

    def attend(self, x: torch.Tensor, pos: int, kv: Payload) -> torch.Tensor:
        B, T, _ = x.shape
        if len(kv) == 1:  # shared RoPE key: (B, S, kv_rank + rope_dim), split into views
            latent = kv[0]
            c_kv, k_rope = latent.split([self.kv_rank, self.rope_dim], dim=-1)
        else:  # per-head RoPE keys: (B, S, kv_rank), (B, n, S, rope_dim)
            latent, (c_kv, k_rope) = None, kv
        q_nope, q_rope = self._query(x, pos)
        scale = (self.head_dim + self.rope_dim) ** -0.5
        dropout_p = self.dropout if self.training else 0.0
        if self.use_absorbed(pos, T):
            y = self._attend_absorbed(q_nope, q_rope, c_kv, k_rope, latent, pos, scale, dropout_p)
        else:
            y = self._attend_unabsorbed(q_nope, q_rope, c_kv, k_rope, pos, scale, dropout_p)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))  # (B, T, C)

    def _attend_unabsorbed(self, q_nope, q_rope, c_kv, k_rope, pos, scale, dropout_p) -> torch.Tensor:
        """Decompress per-head K/V from the latent, then plain SDPA. Returns (B, H, T, head_dim)."""
        B, S, _ = c_kv.shape
        kv = self.kv_b(c_kv).view(B, S, self.n_head, 2 * self.head_dim).transpose(1, 2)  # (B, H, S, 2 hd)
        k_nope, v = kv.split([self.head_dim, self.head_dim], dim=-1)  # (B, H, S, hd) each
        k_rope = self._rope_keys_per_head(k_rope, S)  # (B, H, S, rd)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, hd + rd)
        k = torch.cat([k_nope, k_rope], dim=-1)  # (B, H, S, hd + rd)
        return causal_attention(q, k, v, pos, scale=scale, dropout_p=dropout_p)

    def _rope_keys_per_head(self, k_rope: torch.Tensor, S: int) -> torch.Tensor:
        """(B, S, rd) shared or (B, n, S, rd) per group -> (B, H, S, rd), a view where possible."""
        B = k_rope.shape[0]
        if self.rope_heads == 1:
            return k_rope[:, None].expand(B, self.n_head, S, self.rope_dim)
        return k_rope.repeat_interleave(self.n_head // self.rope_heads, dim=1)

    def _attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, latent, pos, scale, dropout_p) -> torch.Tensor:
        """Attend in latent space: keys are (c_kv ++ k_rope), values are c_kv, one KV head for all heads.

        q_nope . (W_UK c + b_K) = (q_nope W_UK) . c + q_nope . b_K; the second term is the same for every
        key, so softmax drops it. sum_s p_s (W_UV c_s + b_V) = W_UV (sum_s p_s c_s) + b_V since the p_s sum
        to 1. Returns (B, H, T, head_dim).
        """
        if self.rope_heads > 1:  # per-head RoPE keys: the cache is no longer one shared KV head
            return self._attend_unabsorbed(q_nope, q_rope, c_kv, k_rope, pos, scale, dropout_p)
        w_uk, w_uv = self._up_weights()  # (H, hd, r) each
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, H, T, r)
        q = torch.cat([q_latent, q_rope], dim=-1)  # (B, H, T, r + rd)
        # The cache (c_kv ++ k_rope), read in place, as one KV head; the values are c_kv itself (a view).
        if q.shape[2] == 1 and dropout_p == 0.0:
            B, H = q.shape[:2]
            o_latent = _latent_step(q.view(B, H, -1), latent, c_kv, scale).view(B, H, 1, self.kv_rank)
        else:
            o_latent = causal_attention(
                q, latent[:, None], c_kv[:, None], pos, scale=scale, dropout_p=dropout_p
            )
        y = torch.einsum("bhtr,hdr->bhtd", o_latent, w_uv)  # (B, H, T, hd)
        if self.kv_b.bias is not None:
            b_v = self.kv_b.bias.view(self.n_head, 2 * self.head_dim)[:, self.head_dim :]  # (H, hd)
            y = y + b_v[None, :, None, :]
        return y

    def decode(
        self, x: torch.Tensor, at: StepPosition, state, linear: Linears = PLAIN_LINEARS
    ) -> torch.Tensor:
        """One token per sequence, x (B, C): the absorbed path of `attend` in (B, H, width) tensors.

        The owner writes c_kv ++ k_rope at `at` of the one latent buffer; every head then scores and mixes
        the latent in place (`_latent_step`). W_UK and W_UV stay views of kv_b's weight: folding W_UK into
        the query projection would make q_b H * kv_rank wide instead of H * head_dim (4x the bytes at
        kv_rank = 4 head_dim) and a batch-1 step is bound by the bytes it reads. Per-head RoPE keys, or
        absorb=False, take forward's path (no static step).
        """
        absorbed = self.absorb is not False if at.static else self.use_absorbed(at.pos, 1)
        if self.rope_heads > 1 or not absorbed:
            return super().decode(x, at, state, linear)
        B = x.shape[0]
        H, hd, rd, r = self.n_head, self.head_dim, self.rope_dim, self.kv_rank
        buf = state.tensors["latent"]  # (B, max_len, r + rd)
        if self.owns_kv:
            c_kv, k_rope = linear(self.kv_a, x).split([r, rd], dim=-1)  # (B, r), (B, rd)
            if self.kv_norm is not None:
                c_kv = _rms_norm(self.kv_norm, c_kv)
            k_rope = at.rope(self.decoupled_rope, k_rope.view(B, 1, rd))  # post-RoPE, (B, 1, rd)
            at.write(buf, 1, torch.cat([c_kv[:, None], k_rope.to(c_kv.dtype)], dim=-1))
        if self.q_rank:
            q = linear(self.q_b, _rms_norm(self.q_norm, linear(self.q_a, x)))
        else:
            q = linear(self.q_proj, x)
        q = q.view(B, H, hd + rd)
        q_nope, q_rope = q.split([hd, rd], dim=-1)  # (B, H, hd), (B, H, rd)
        w_uk, w_uv = self._up_weights()  # (H, hd, r) each
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # (B, H, r)
        q = torch.cat(
            [q_latent, at.rope(self.decoupled_rope, q_rope.view(B, H, 1, rd)).view(B, H, rd)], dim=-1
        )
        latent = at.held(buf, 1)  # (B, S, r + rd), a view
        mask = at.mask(latent.shape[1], x.device)
        dt = attend_dtype(latent.dtype, q.dtype, q.device)  # a narrower cache is read in its own dtype
        latent = latent.to(dt)
        o = _latent_step(q.to(dt), latent, latent[..., :r], (hd + rd) ** -0.5, mask).to(q.dtype)  # (B, H, r)
        y = torch.bmm(o.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # (B, H, hd)
        if self.kv_b.bias is not None:
            y = y + self.kv_b.bias.view(H, 2 * hd)[:, hd:]  # b_V (sum of the probabilities is 1)
        return linear(self.c_proj, y.reshape(B, H * hd))

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> float:
        return (self.kv_rank + self.rope_heads * self.rope_dim) * dtype.itemsize if self.owns_kv else 0

    @property
    def kv_heads(self) -> float:
        return 1.0  # the latent is one KV "head" shared by every query head (seed 000 convention)

    @property
    def latent_rank_ratio(self) -> float:
        return self.kv_rank / (self.head_dim + self.rope_dim)


def _latent_step(
    q: torch.Tensor, latent: torch.Tensor, c_kv: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """One decode step of absorbed MLA: q (B, H, r + rd) over every held latent (B, S, r + rd), values
    c_kv (B, S, r) -> (B, H, r). All H heads read the one latent head: two GEMMs over the cache in place.
    `mask` (S,): True where the latent holds a token (a static step reads the whole buffer).

    The scores are computed as latent @ q^T, (B, S, H): MKL streams the cache rows against H query
    columns about 1.3x faster than q @ latent^T at S = 4096 (benchmarks/README.md), and SDPA's CPU kernels
    would take their math path here (value width r != key width r + rd).
    """
    scores = torch.matmul(latent, q.transpose(1, 2))  # (B, S, H)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores.transpose(1, 2) * scale, dim=-1, dtype=torch.float32)  # (B, H, S)
    return torch.bmm(probs.to(latent.dtype), c_kv)  # (B, H, r)


class _PairRotary(Rotary):
    """RoPE at a chosen subset of the model's frequency pairs (rotate-half layout over the kept pairs)."""

    tabled = False  # computed per call (`at`)

    def __init__(self, model_rotary: Rotary, pairs: list[int]):
        super().__init__(2 * len(pairs), model_rotary.theta, model_rotary.scaling)
        self.model_dim, self.pairs = model_rotary.dim, list(pairs)

    def __call__(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        return self.at(x, torch.arange(pos, pos + x.shape[-2], device=x.device))

    def at(self, x: torch.Tensor, positions: torch.Tensor, end: int | None = None) -> torch.Tensor:
        # Computed per call on CPU (as rope_cos_sin): models built on the meta device hold no tensors here.
        inv_freq = rope_inv_freq(self.model_dim, self.theta, self.scaling)[self.pairs].to(positions.device)
        freqs = torch.outer(positions.to(torch.float32), inv_freq)  # (T, rd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return apply_rope(x, emb.cos().to(x.dtype), emb.sin().to(x.dtype))


@register_preset("mla")
def _mla(shape: ModelShape) -> AttentionConfig:
    """Seed 000's MLA: kv_rank = 4 * head_dim, rope_dim = head_dim, q_rank = min(C, 12 * head_dim)."""
    hd = shape.head_dim
    return AttentionConfig(kind="mla", kv_rank=4 * hd, rope_dim=hd, q_rank=min(shape.n_embd, 12 * hd))
