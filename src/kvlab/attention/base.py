"""The KV-structure interface, its registry, and the pieces every structure shares.

A KV structure is an attention layer that decides what each token leaves in the cache (its *payload*)
and how queries read it back. `KVStructure.forward` is the one code path for full-sequence training and
for cached prefill/decode, so the two cannot drift apart; a layer that borrows another layer's KV
(CLA/MLKV) gets the owner's payload, or the owner's cache state, and stores nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvlab.attention.rope import Rotary
from kvlab.attention.step import (  # noqa: F401 - re-exported: the structures import them from here
    PLAIN_LINEARS,
    Linears,
    StaticDecodeError,
    StaticPosition,
    StepPosition,
    attend_dtype,
    decode_attention,
)
from kvlab.config import AttentionConfig, ConfigError, ModelConfig, ModelShape, _divisors

Payload = tuple[torch.Tensor, ...]

_REGISTRY: dict[str, type[KVStructure]] = {}

_PRESETS: list[tuple[re.Pattern, str, Callable[..., AttentionConfig]]] = []


@dataclass
class NoOptions:
    """A kind without options of its own."""


def register(kind: str) -> Callable[[type[KVStructure]], type[KVStructure]]:
    """Class decorator: make a KV structure available as AttentionConfig(kind=...)."""

    def deco(cls: type[KVStructure]) -> type[KVStructure]:
        if kind in _REGISTRY:
            raise ValueError(f"attention kind {kind!r} registered twice")
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return deco


def get_variant(kind: str) -> type[KVStructure]:
    if kind not in _REGISTRY:
        raise ConfigError(f"unknown attention kind {kind!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[kind]


def registered_kinds() -> list[str]:
    return sorted(_REGISTRY)


def register_preset(pattern: str, display: str | None = None):
    """Decorator: `fn(shape: ModelShape, *regex groups) -> AttentionConfig` becomes the attention preset
    whose name fully matches `pattern` (e.g. r"mlkv-(\\d+)", shown as `display`, "mlkv-<N>")."""

    def deco(fn: Callable[..., AttentionConfig]) -> Callable[..., AttentionConfig]:
        _PRESETS.append((re.compile(pattern), display or pattern, fn))
        return fn

    return deco


def find_preset(name: str) -> Callable[[ModelShape], AttentionConfig] | None:
    for pattern, _, fn in _PRESETS:
        m = pattern.fullmatch(name)
        if m:
            return lambda shape, fn=fn, m=m: fn(shape, *(int(g) for g in m.groups()))
    return None


def preset_names() -> list[str]:
    return [display for _, display, _ in _PRESETS]


class TensorState:
    """Preallocated per-layer cache storage written by index (gpt-fast style).

    Holds named tensors whose `time_dim` axis has length max_len; `write` copies new tokens' payload in at
    a position, `read` returns views of everything up to a position. Nothing else is allocated, so
    `nbytes()` is exactly what the layer keeps.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], time_dim: int | dict[str, int] = 1):
        self.tensors = tensors
        self.time_dims = {k: time_dim for k in tensors} if isinstance(time_dim, int) else dict(time_dim)

    def write(self, pos: int, payload: Payload) -> None:
        for (name, buf), value in zip(self.tensors.items(), payload, strict=True):
            d = self.time_dims[name]
            buf.narrow(d, pos, value.shape[d]).copy_(value)

    def read(self, end: int) -> Payload:
        return tuple(buf.narrow(self.time_dims[name], 0, end) for name, buf in self.tensors.items())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def causal_attention(
    q: torch.Tensor,  # (B, H, T, D)
    k: torch.Tensor,  # (B, H_kv, S, D)
    v: torch.Tensor,  # (B, H_kv, S, Dv)
    q_start: int,  # absolute position of q[:, :, 0]; keys hold positions 0..S-1
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:  # (B, H, T, Dv)
    """Causal SDPA where queries may start later than keys (cached prefill/decode).

    Query t (absolute position q_start + t) sees keys 0..q_start + t. KV heads are shared by groups of
    query heads inside SDPA (`enable_gqa`), never expanded in the cache. K/V of another dtype than q (a
    cache's) are attended in `attend_dtype`; the result is in q's dtype.
    """
    if k.dtype != q.dtype or v.dtype != q.dtype:
        dt = attend_dtype(k.dtype, q.dtype, q.device)
        y = causal_attention(q.to(dt), k.to(dt), v.to(dt), q_start, scale=scale, dropout_p=dropout_p)
        return y.to(q.dtype)
    T, S = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if T > 1 and (k.stride(-1) != 1 or v.stride(-1) != 1):
        # A CPU cache stored (D, S)-major (`kv_buffer`): SDPA's flash kernel needs unit-stride head dims,
        # and its math fallback would hold a (T, S) score matrix per head; a prefill copies the keys once.
        k, v = k.contiguous(), v.contiguous()
    if q_start == 0 and T == S:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p, enable_gqa=gqa
        )
    if T == 1 and q_start == S - 1:  # one decode step sees every held key: no mask
        if gqa:
            # Fold each KV head's group of query heads onto the query axis, (B, H_kv, G, D): every KV head
            # is read once per step by the fast kernels, instead of SDPA's GQA fallback expanding K/V.
            B, H, _, D = q.shape
            y = F.scaled_dot_product_attention(
                q.reshape(B, k.shape[1], H // k.shape[1], D), k, v, scale=scale, dropout_p=dropout_p
            )  # (B, H_kv, G, Dv)
            return y.reshape(B, H, 1, v.shape[-1])
        return F.scaled_dot_product_attention(q, k, v, scale=scale, dropout_p=dropout_p)
    q_pos = torch.arange(q_start, q_start + T, device=q.device)
    mask = torch.arange(S, device=q.device)[None, :] <= q_pos[:, None]  # (T, S)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p, enable_gqa=gqa
    )


def kv_buffer(shape: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed (B, H, max_len, D) cache buffer. On CPU it is stored (B, H, D, max_len) and seen through a
    transpose: a decode step then reads each head's keys and values as D rows of length S, which MKL's
    GEMV streams about 2x faster at S = 4096 than S rows of D = 64 (llama.cpp keeps V transposed for the
    same reason). Elsewhere (SDPA's GPU kernels need unit-stride heads) it is stored as it is seen."""
    B, H, L, D = shape
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    return torch.zeros(B, H, D, L, device=device, dtype=dtype).transpose(2, 3)


class KVStructure(nn.Module):
    """Base class of every attention variant.

    Subclasses implement `project_kv` (the payload the new tokens add), `new_state` (their own cache
    layout), `attend` (queries over a payload) and `kv_bytes_per_token`; `validate` checks their config.
    """

    kind: str = ""
    # True: the layer encodes positions itself (MLA's decoupled RoPE key) even in a learned-positions
    # family, so a model made only of such layers drops its wpe (seed 000's MLA).
    provides_positions = False
    # Why another layer cannot read this structure's cache (kv_share), or None when it can.
    kv_share_unsupported: str | None = None
    # True: `attend` reads the cache's tensors only through causal_attention, which attends a narrower
    # cache in `attend_dtype`; False: forward's cached path first converts the cache to the compute dtype.
    attends_any_cache_dtype = False

    def __init__(self, cfg: AttentionConfig, model_cfg: ModelConfig, layer_idx: int, owns_kv: bool):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.owns_kv = owns_kv
        self.n_head = model_cfg.n_head
        self.n_embd = model_cfg.n_embd
        self.head_dim = model_cfg.head_dim
        self.dropout = model_cfg.dropout
        self.n_layer = model_cfg.n_layer
        # RoPE families rotate q and k here, before K enters the cache (None: learned positions).
        self.rotary = Rotary.from_model(model_cfg)

    # ---- configuration --------------------------------------------------------------------------
    Options: type = NoOptions  # the kind's own options (a dataclass): AttentionConfig(kind=..., **options)

    @classmethod
    def check_config(cls, cfg: AttentionConfig, model_cfg: ModelConfig) -> None:
        """Checks shared by every kind (n_kv_heads divides n_head where the kind has it), then `validate`."""
        n = getattr(cfg.options, "n_kv_heads", None)
        if n is not None and (n <= 0 or model_cfg.n_head % n):
            raise ConfigError(
                f"n_kv_heads={n} must divide n_head={model_cfg.n_head}; try {_divisors(model_cfg.n_head)}"
            )
        cls.validate(cfg, model_cfg)

    @classmethod
    def validate(cls, cfg: AttentionConfig, model_cfg: ModelConfig) -> None:
        """Raise ConfigError for values this kind cannot use (after `check_config`'s shared checks)."""

    def reset_parameters(self) -> None:
        """Re-initialise structure-specific parameters after the model's generic init (default: none)."""

    # ---- the interface --------------------------------------------------------------------------
    def project_kv(self, x: torch.Tensor, pos: int) -> Payload:
        raise NotImplementedError

    def new_state(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        raise NotImplementedError

    def attend(self, x: torch.Tensor, pos: int, kv: Payload) -> torch.Tensor:
        """Queries from x (positions pos..pos+T-1) over payload kv holding positions 0..pos+T-1."""
        raise NotImplementedError

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> float:
        """Bytes one token adds to this layer's cache as the cache grows without bound (0 if borrowing)."""
        raise NotImplementedError

    def cache_bytes(self, batch_size: int, max_len: int, dtype: torch.dtype) -> int:
        """Analytic bytes of this layer's state for a cache of max_len tokens (== state.nbytes())."""
        if not self.owns_kv:
            return 0
        return int(batch_size * max_len * self.kv_bytes_per_token(dtype))

    @property
    def kv_heads(self) -> float:
        """KV heads for head_sharing_ratio (MLA counts as one)."""
        return float(self.n_head)

    @property
    def latent_rank_ratio(self) -> float:
        return 1.0

    def forward(
        self, x: torch.Tensor, pos: int = 0, state=None, kv: Payload | None = None
    ) -> tuple[torch.Tensor, Payload | None]:
        """x: (B, T, C) at absolute positions pos..pos+T-1.

        Owner, no cache: attend over the payload of x itself. Owner, cache: append the payload to `state`
        and attend over everything it holds. Borrower: `kv` (no cache) or `state` (cache) is the owner's.
        Returns (y, payload of x if owner else None) so the model can hand it to borrowers.
        """
        new_kv = self.project_kv(x, pos) if self.owns_kv else None
        if state is None:
            full = new_kv if self.owns_kv else kv
            if full is None:
                raise RuntimeError(f"layer {self.layer_idx} borrows KV but was given none")
        else:
            if self.owns_kv:
                state.write(pos, new_kv)
            full = state.read(pos + x.shape[1])
            if not self.attends_any_cache_dtype:  # a cache narrower than the compute (bf16 cache, fp32 model)
                full = tuple(t.to(x.dtype) for t in full)
        return self.attend(x, pos, full), new_kv

    def decode(
        self, x: torch.Tensor, at: StepPosition, state, linear: Linears = PLAIN_LINEARS
    ) -> torch.Tensor:
        """One cached decode step (kvlab.decode's fast path): x (B, C), one token per sequence at position
        `at` -> (B, C).

        `state` is the cache this layer reads (its own, or its owner's); an owner appends x's payload.
        `at` says where to write and what to read (`StepPosition`; a `StaticPosition` for a step whose
        shapes do not depend on the position). `linear(layer, x)` applies one of the layer's nn.Linear
        (`Linears`: the fast path may hold its weight in the layout a batch-1 GEMV reads fastest).
        Structures override this with a lean one-token path; the default runs the general forward, so every
        structure decodes correctly without one (but not statically).
        """
        if at.static:
            raise StaticDecodeError(
                f"layer {self.layer_idx} ({self.kind}) has no static decode step; decode without static=True"
            )
        return self.forward(x[:, None], pos=at.pos, state=state)[0][:, 0]


def init_linear_(module: nn.Linear, std: float = 0.02) -> None:
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def residual_std(n_layer: int) -> float:
    """GPT-2 init for projections into the residual stream: 0.02 / sqrt(2 * n_layer)."""
    return 0.02 / math.sqrt(2 * n_layer)
