"""Calibration statistics for the converters: the second moment of each attention layer's input.

Every linear map of a layer's input z = W x has E[z z^T] = W G W^T with G = E[x x^T], so one (C, C)
matrix per layer serves PCA of any projection (to_mla) and the RMS norm of any query/key slice (the
partial-RoPE selection) without running the model again per candidate.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kvlab.config import ConfigError
from kvlab.model import GPT


@torch.no_grad()
def attention_input_moments(model: GPT, batches: Iterable[torch.Tensor]) -> dict[int, torch.Tensor]:
    """{layer: E[x x^T] (C, C) float64} over every token of the calibration batches, where x is the input
    of the layer's attention (after its pre-norm). The model is left as it was (mode, weights)."""
    sums: dict[int, torch.Tensor] = {}
    count = [0]

    def hook_for(i: int):
        def hook(attn, args, kwargs):
            x = args[0].detach().double().flatten(0, 1)  # (B*T, C)
            sums[i] = x.T @ x if i not in sums else sums[i] + x.T @ x
            if i == 0:
                count[0] += x.shape[0]

        return hook

    handles = [
        b.attn.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, b in enumerate(model.blocks)
    ]
    was_training = model.training
    try:
        model.eval()
        for idx in batches:
            model(idx.to(model.wte.weight.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not count[0]:
        raise ConfigError("calibration gave no tokens; pass at least one (B, T) tensor of token ids")
    return {i: s / count[0] for i, s in sums.items()}
