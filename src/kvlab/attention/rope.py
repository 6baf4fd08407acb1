"""Rotary position embeddings (rotate-half convention, as GPT-NeoX, Llama and DeepSeek-V2 in HF)."""

from __future__ import annotations

import torch


def rope_cos_sin(
    dim: int, positions: torch.Tensor, theta: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, dim) for integer positions (T,). Computed in float32, then cast."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    freqs = torch.outer(positions.to(torch.float32), inv_freq)  # (T, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, dim) rotated by position; cos/sin (T, dim) broadcast over leading axes."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
