"""Shared by the converters: the source-model check and a key-by-key, shape-asserted copy into a new GPT."""

from __future__ import annotations

import dataclasses

import torch

from kvlab.config import AttentionConfig, ConfigError
from kvlab.model import GPT


def grouped_attention_or_error(model: GPT, fn: str) -> AttentionConfig:
    """The model's attention config, if it is plain grouped KV (kind 'gqa', no per-layer overrides)."""
    att = model.config.attention
    if att.kind != "gqa" or att.layers:
        raise ConfigError(
            f"{fn} converts kind='gqa' models without per-layer overrides; got kind={att.kind!r}"
            f"{' with layers overrides' if att.layers else ''}"
        )
    return att


def build_like(
    model: GPT,
    att: AttentionConfig,
    tensors: dict[str, torch.Tensor],
    fn: str,
    new_suffixes: tuple[str, ...] = (),
) -> GPT:
    """A GPT with `model`'s config but attention `att`, loaded from `tensors` with every shape asserted.

    Every tensor must have a place in the new model; the new model's tensors that `tensors` lacks must end
    in one of `new_suffixes` (what the target adds, left at its initialisation).
    """
    cfg = dataclasses.replace(model.config, attention=att)
    ref = model.wte.weight
    target = GPT(cfg).to(device=ref.device, dtype=ref.dtype)
    state = target.state_dict()
    unplaced = sorted(set(tensors) - set(state))
    assert not unplaced, f"{fn}: tensors {unplaced[:4]} have no place in the converted model"
    added = [k for k in sorted(set(state) - set(tensors)) if k.rsplit(".", 1)[-1] not in new_suffixes]
    assert not added, f"{fn}: the converted model has tensors {added[:4]} that nothing initialises"
    for name, tensor in tensors.items():
        shape, want = tuple(tensor.shape), tuple(state[name].shape)
        assert shape == want, f"{fn}: {name} has shape {shape}, the converted model expects {want}"
        state[name] = tensor.detach().clone()
    target.load_state_dict(state, strict=True)
    target.train(model.training)
    return target
