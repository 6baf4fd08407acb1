"""What a one-token decode step (`KVStructure.decode`, run by kvlab.decode.Decoder) shares across
structures: where it writes and reads (`StepPosition`, `StaticPosition`), how it attends over a cache
(`decode_attention`, in `attend_dtype` when the cache is narrower than the compute) and how it applies a
layer's nn.Linear (`Linears`). Re-exported by kvlab.attention.base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlab.errors import KvlabError

# Devices whose cached steps widen a cache narrower than the compute instead of attending in its dtype.
# On this CPU a bfloat16 matmul needs oneDNN (which the decode step turns off for GELU's sake: without it a
# bf16 step over 4096 keys takes 7 ms against 1.2 ms widened), and oneDNN's batch-1 bf16 GEMMs are slower
# than float32 for MQA-shaped groups (benchmarks/README.md); GPUs' fused kernels read bf16 at half the
# bytes and accumulate in float32.
WIDENING_DEVICES = frozenset({"cpu"})


def attend_dtype(cache: torch.dtype, compute: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a cached step attends in when the cache is stored in `cache` and queries are `compute`.

    A narrower cache (bf16 cache under a float32 model or autocast's float32 residual stream) is read in its
    own dtype, so a step converts its one query instead of the whole cache; on WIDENING_DEVICES, and for a
    cache wider than the compute, the cache is converted to the compute dtype as before.
    """
    if cache == compute or device.type in WIDENING_DEVICES or cache.itemsize >= compute.itemsize:
        return compute
    return cache


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
):
    """q (B, H_kv, G, D) over held keys: k (B, H_kv, S, D), v (B, H_kv, S, Dv) -> (B, H_kv, G, Dv).

    A dynamic-shape decode step sees every key it is given (no mask); a static one (`StaticPosition`) gives
    the whole buffer and `mask` (S,), True where a key is held. A `kv_buffer` CPU cache ((D, S)-major) is
    read by two matmuls whose rows are whole sequences; otherwise SDPA's fused kernel does it. A cache in
    another dtype than q is attended in `attend_dtype` (the result is in q's dtype).
    """
    if k.dtype != q.dtype or v.dtype != q.dtype:
        dt = attend_dtype(k.dtype, q.dtype, q.device)
        return decode_attention(q.to(dt), k.to(dt), v.to(dt), scale=scale, mask=mask).to(q.dtype)
    if k.stride(-1) == 1 and v.stride(-1) == 1:
        attn_mask = None if mask is None else mask.view(1, -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    B, H, G, D = q.shape
    S = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    k_t = k.transpose(-1, -2).reshape(B * H, D, S)  # a view: rows of S keys per head dim
    scores = torch.baddbmm(q.new_empty(()), q.reshape(B * H, G, D), k_t, beta=0.0, alpha=scale)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)  # (B H, G, S)
    if probs.dtype != v.dtype:
        probs = probs.to(v.dtype)
    return torch.bmm(probs, v.reshape(B * H, S, -1)).view(B, H, G, -1)  # (B, H_kv, G, Dv)


class StepPosition:
    """Where a one-token decode step (`KVStructure.decode`) writes its payload and what it reads back.

    The position is a Python int: the step writes at `pos` and reads the first pos + 1 entries of a
    cached tensor, as slices (a step compiled with dynamic shapes keeps pos symbolic). `StaticPosition`
    holds it as a device tensor instead, for a step whose shapes and graph never change (CUDA graphs).
    """

    static = False

    def __init__(self, pos: int):
        self.pos = pos

    def write(self, buf: torch.Tensor, dim: int, value: torch.Tensor) -> None:
        """Store value (length 1 along dim) at the step's position of buf."""
        buf.narrow(dim, self.pos, 1).copy_(value)

    def held(self, buf: torch.Tensor, dim: int) -> torch.Tensor:
        """The part of buf a step reads along dim (with `mask`: which of it holds tokens)."""
        return buf.narrow(dim, 0, self.pos + 1)

    def mask(self, length: int, device: torch.device) -> torch.Tensor | None:
        """(length,) True where `held(...)` holds a token, or None when all of it does."""
        return None

    def rope(self, rotary, x: torch.Tensor) -> torch.Tensor:
        """x (..., 1, D) rotated to the step's position."""
        return rotary(x, self.pos)

    def tensor(self, device: torch.device) -> torch.Tensor:
        """The position as a (1,) int64 tensor."""
        return torch.arange(self.pos, self.pos + 1, device=device)

    @property
    def end(self) -> int:
        """A bound above every position the step reads (for RoPE tables)."""
        return self.pos + 1


class StaticPosition(StepPosition):
    """The step's position as a (1,) int64 device tensor, for a cache of max_len tokens: writes go through
    `index_copy_`, reads take the whole buffer with a mask (gpt-fast's static cache), so nothing about the
    step's shapes or control flow depends on the position."""

    static = True

    def __init__(self, pos: torch.Tensor, max_len: int):
        self.pos_t, self.max_len = pos, max_len

    @property
    def pos(self) -> int:
        raise StaticDecodeError("a static decode step has no Python position; this path needs one")

    def write(self, buf: torch.Tensor, dim: int, value: torch.Tensor) -> None:
        buf.index_copy_(dim, self.pos_t, value.to(buf.dtype))

    def held(self, buf: torch.Tensor, dim: int) -> torch.Tensor:
        return buf

    def mask(self, length: int, device: torch.device) -> torch.Tensor:
        return torch.arange(length, device=device) <= self.pos_t

    def rope(self, rotary, x: torch.Tensor) -> torch.Tensor:
        return rotary.at(x, self.pos_t, end=self.max_len)

    def tensor(self, device: torch.device) -> torch.Tensor:
        return self.pos_t

    @property
    def end(self) -> int:
        return self.max_len


class StaticDecodeError(KvlabError):
    """A layer has no static-shape decode step (`Decoder(static=True)`)."""


class Linears:
    """How a one-token decode step applies an nn.Linear (or anything with `.weight` and `.bias`).

    This one uses the parameters as they are; kvlab.decode's subclass reads each weight from the layout a
    batch-1 GEMV streams fastest. `weight(layer)` is the (out, in) weight to pass to fused ops that take
    one (e.g. torch.gru_cell).
    """

    def weight(self, layer) -> torch.Tensor:
        return layer.weight

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(layer), layer.bias)


PLAIN_LINEARS = Linears()
