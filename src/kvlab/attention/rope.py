"""Rotary position embeddings (rotate-half convention, as GPT-NeoX, Llama and DeepSeek-V2 in HF).

`Rotary` is the model-level RoPE of the NeoX and Llama families: it rotates the first `dim` dims of each
head (all of them in Llama, 25% in Pythia) with the family's base and, for Llama 3, its long-context
frequency scaling. MLA's decoupled RoPE key uses the same functions at its own width.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_inv_freq(dim: int, theta: float = 10000.0, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies (dim/2,) in float32, with Llama 3 or linear scaling when given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":  # positions / factor == frequencies / factor
        return inv_freq / factor
    # Llama 3 (the released rope scaling): long wavelengths slowed by `factor`, short ones kept, and a
    # smooth blend between the two bands.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(
    dim: int,
    positions: torch.Tensor,
    theta: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    scaling: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, dim) for integer positions (T,). Computed in float32, then cast."""
    inv_freq = rope_inv_freq(dim, theta, scaling).to(positions.device)
    freqs = torch.outer(positions.to(torch.float32), inv_freq)  # (T, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, dim) rotated by position; cos/sin (T, dim) broadcast over leading axes."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Rotary:
    """RoPE on the first `dim` dims of each head (the rest pass through), at absolute positions.

    cos/sin tables are built once per (device, dtype) and grown by doubling, then sliced per call: a decode
    step used to rebuild them (arange, outer, cat, cos, sin: ~8 ops) in every layer. The tables are plain
    attributes, not module buffers, so they never enter a state dict; keyed by device, a model moved with
    .to() builds fresh ones there. Entries equal rope_cos_sin's exactly (same float32 arithmetic per
    position).
    """

    tabled = True  # the calls read the cached tables (a subclass that computes per call says False)

    def __init__(self, dim: int, theta: float, scaling: dict[str, Any] | None = None):
        self.dim, self.theta, self.scaling = dim, theta, scaling
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_model(cls, model_cfg) -> Rotary | None:
        if model_cfg.positions != "rope":
            return None
        return cls(model_cfg.rope_dim, model_cfg.rope_theta, model_cfg.rope_scaling)

    def tables(self, end: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (L, dim) for positions 0..L-1 with L >= end, cached per device and dtype."""
        held = self._tables.get((device, dtype))
        if held is None or held[0].shape[0] < end:
            length = max(64, 1 << (end - 1).bit_length())
            # Built outside inference mode so a table first made while generating can also serve
            # training (inference tensors cannot be saved for backward); it never needs a gradient.
            with torch.inference_mode(False), torch.no_grad():
                positions = torch.arange(length, device=device)
                held = rope_cos_sin(self.dim, positions, self.theta, dtype=dtype, scaling=self.scaling)
            self._tables[(device, dtype)] = held
        return held

    def reserve(self, end: int) -> None:
        """Grow each table held (every device and dtype used so far) to cover positions 0..end-1, so later
        calls up to `end` only slice it. A compiled decode step must not be where a table grows: the traced
        growth guards on the table's size and specialises on the position, recompiling at each doubling."""
        for device, dtype in list(self._tables):
            self.tables(end, device, dtype)

    def __getstate__(self) -> dict:  # copies and pickles (deepcopy of a model) rebuild their tables
        return {**self.__dict__, "_tables": {}}

    def __call__(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """x (..., T, D) at positions pos..pos+T-1 -> the same shape, first `dim` dims rotated."""
        T = x.shape[-2]
        cos, sin = self.tables(pos + T, x.device, x.dtype)
        return self._apply(x, cos[pos : pos + T], sin[pos : pos + T])

    def at(self, x: torch.Tensor, positions: torch.Tensor, end: int | None = None) -> torch.Tensor:
        """x (..., T, D) at the given integer positions (T,); `end` > every position lets the cached
        tables serve the call (without it, the tables for exactly these positions are computed)."""
        if end is None:
            cos, sin = rope_cos_sin(self.dim, positions, self.theta, dtype=x.dtype, scaling=self.scaling)
        else:
            cos, sin = (t[positions] for t in self.tables(end, x.device, x.dtype))
        return self._apply(x, cos, sin)

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.dim == x.shape[-1]:
            return apply_rope(x, cos, sin)
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        return torch.cat([apply_rope(rot, cos, sin), rest], dim=-1)


def rotaries(model) -> list[Rotary]:
    """Every Rotary held by a module of model (each layer has its own; MLA's decoupled key too)."""
    return [v for m in model.modules() for v in vars(m).values() if isinstance(v, Rotary) and v.tabled]


def reserve_rope(model, length: int, device: torch.device, dtype: torch.dtype) -> None:
    """Build every Rotary table of model for positions 0..length-1 on (device, dtype) now, before a
    compiled forward: a table first built inside it makes the next call recompile (the tables it guards
    on were empty when it was traced)."""
    for rotary in rotaries(model):
        rotary.tables(length, torch.device(device), dtype)
