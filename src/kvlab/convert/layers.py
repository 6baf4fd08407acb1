"""Swap chosen layers of a trained model for another KV structure (seed 001: Context-KV on layer 0).

Everything outside the replaced layers' attention is copied; inside them, every tensor the new structure
has under the same name and shape (q_proj, kv_proj, c_proj where the shapes allow) carries over, and only
what the structure adds (a ContextBlock, its norm, the slot projections) starts from its initialisation.
"""

from __future__ import annotations

import dataclasses

import torch

from kvlab.config import AttentionConfig, ConfigError
from kvlab.convert.common import build_like
from kvlab.model import GPT


@torch.no_grad()
def replace_layers(model: GPT, layers: dict[int, AttentionConfig], seed: int = 0) -> GPT:
    """A copy of `model` whose layers i in `layers` use structure layers[i]; the original is untouched.

    Returns the new model and leaves new parameters at the structure's own init (seeded by `seed`).
    Replacing a layer by its current structure reproduces the original logits.
    """
    cfg, att = model.config, model.config.attention
    for i, c in layers.items():
        if not isinstance(i, int) or not 0 <= i < cfg.n_layer:
            raise ConfigError(
                f"replace_layers: layer index {i!r} is out of range; "
                f"the model has layers 0..{cfg.n_layer - 1}"
            )
        if not isinstance(c, AttentionConfig):
            raise ConfigError(
                f"replace_layers: layers[{i}] must be an AttentionConfig, got {type(c).__name__}"
            )
    new_att = att.replace(layers={**att.layers, **layers})
    torch.manual_seed(seed)
    fresh = GPT(dataclasses.replace(cfg, attention=new_att)).state_dict()  # validates the new structure
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, t in fresh.items():
        old = state.get(name)
        replaced = any(name.startswith(f"blocks.{i}.attn.") for i in layers)
        if old is not None and tuple(old.shape) == tuple(t.shape):
            out[name] = old  # carried over
        elif replaced:
            out[name] = t  # what the new structure adds, or a projection whose shape changed
        else:
            raise AssertionError(f"replace_layers: {name} of an unchanged layer has no source tensor")
    return build_like(model, new_att, out, "replace_layers")
