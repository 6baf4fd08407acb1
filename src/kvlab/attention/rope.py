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
    """RoPE on the first `dim` dims of each head (the rest pass through), at absolute positions."""

    def __init__(self, dim: int, theta: float, scaling: dict[str, Any] | None = None):
        self.dim, self.theta, self.scaling = dim, theta, scaling

    @classmethod
    def from_model(cls, model_cfg) -> Rotary | None:
        if model_cfg.positions != "rope":
            return None
        return cls(model_cfg.rope_dim, model_cfg.rope_theta, model_cfg.rope_scaling)

    def __call__(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """x (..., T, D) at positions pos..pos+T-1 -> the same shape, first `dim` dims rotated."""
        return self.at(x, torch.arange(pos, pos + x.shape[-2], device=x.device))

    def at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (..., T, D) at the given integer positions (T,)."""
        cos, sin = rope_cos_sin(self.dim, positions, self.theta, dtype=x.dtype, scaling=self.scaling)
        if self.dim == x.shape[-1]:
            return apply_rope(x, cos, sin)
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        return torch.cat([apply_rope(rot, cos, sin), rest], dim=-1)
