"""MatryoshkaKV's rank API (seed 003): which ranks each (layer, KV head, K/V) uses, for trainers (sample
per step: `sample_ranks_`, `RankSampler`) and searches (`get_ranks`, `set_ranks`), and `ranks_config` to
save an assignment in a checkpoint's config. Re-exported by kvlab.attention.matryoshka."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from kvlab.attention.matryoshka import MatryoshkaAttention, RankSpec, _check_rank
from kvlab.config import AttentionConfig, ConfigError


def matryoshka_layers(model: nn.Module) -> list[tuple[int, MatryoshkaAttention]]:
    """(layer index, attention) of every Matryoshka layer of a GPT, in layer order."""
    return [(i, b.attn) for i, b in enumerate(model.blocks) if isinstance(b.attn, MatryoshkaAttention)]


def layers_or_error(model: nn.Module) -> list[tuple[int, MatryoshkaAttention]]:
    layers = matryoshka_layers(model)
    if not layers:
        raise ConfigError(
            "the model has no kind='matryoshka' layers; build it with attention='matryoshka-<R>'"
        )
    return layers


def get_ranks(model: nn.Module) -> dict[str, list]:
    """{"layers": [i, ...], "k": [[rank per KV head] per layer], "v": [...]} over Matryoshka layers."""
    layers = layers_or_error(model)
    return {
        "layers": [i for i, _ in layers],
        "k": [list(a.k_ranks) for _, a in layers],
        "v": [list(a.v_ranks) for _, a in layers],
    }


def _expand(spec: RankSpec, layers: list[tuple[int, MatryoshkaAttention]], which: str) -> list[list[int]]:
    """int -> every head of every layer; list per layer of (int | list per head)."""
    if not isinstance(spec, (list, tuple)):
        spec = [spec] * len(layers)
    if len(spec) != len(layers):
        raise ConfigError(
            f"{which} ranks give {len(spec)} layers but the model has {len(layers)} Matryoshka layers "
            f"({[i for i, _ in layers]}); pass one entry per layer or a single int"
        )
    out = []
    for (i, attn), s in zip(layers, spec):
        heads = list(s) if isinstance(s, (list, tuple)) else [s] * attn.n_kv_heads
        if len(heads) != attn.n_kv_heads:
            raise ConfigError(
                f"{which} ranks for layer {i} give {len(heads)} heads; it has n_kv_heads={attn.n_kv_heads}"
            )
        for h, r in enumerate(heads):
            _check_rank(r, attn.head_dim, f"{which} rank of layer {i} head {h}")
        out.append([int(r) for r in heads])
    return out


def set_ranks(
    model: nn.Module, k: RankSpec | None = None, v: RankSpec | None = None, layers: list[int] | None = None
) -> None:
    """Set K and/or V ranks: an int for every head, or a list per Matryoshka layer of an int or a list
    per KV head. `set_ranks(model, **get_ranks(other))` copies an assignment. Create caches afterwards."""
    mlayers = layers_or_error(model)
    if layers is not None and list(layers) != [i for i, _ in mlayers]:
        raise ConfigError(
            f"ranks are for layers {list(layers)}; the model's Matryoshka layers are "
            f"{[i for i, _ in mlayers]}"
        )
    new_k = _expand(k, mlayers, "K") if k is not None else None  # check everything before changing
    new_v = _expand(v, mlayers, "V") if v is not None else None
    for j, (_, attn) in enumerate(mlayers):
        if new_k is not None:
            attn.k_ranks = new_k[j]
        if new_v is not None:
            attn.v_ranks = new_v[j]


def rank_choices(head_dim: int, steps: int = 8) -> list[int]:
    """The nested ranks a trainer samples from: {d/8, 2d/8, ..., d} (seed 003), rounded, at least 1."""
    return sorted({max(1, round(j * head_dim / steps)) for j in range(1, steps + 1)})


def sample_ranks_(
    model: nn.Module, generator: torch.Generator | None = None, choices: Sequence[int] | None = None
) -> dict[str, list]:
    """Draw every (layer, KV head, K/V) rank independently and uniformly from `choices` (default
    rank_choices(head_dim)); returns the new assignment (as get_ranks). Seed 003 does this every step."""
    for _, attn in layers_or_error(model):
        opts = torch.tensor(list(choices) if choices is not None else rank_choices(attn.head_dim))
        draw = opts[torch.randint(len(opts), (2, attn.n_kv_heads), generator=generator)]  # (K/V, H_kv)
        attn.k_ranks, attn.v_ranks = draw[0].tolist(), draw[1].tolist()
    return get_ranks(model)


class RankSampler:
    """Seed 003's training hook: before every step draw every rank at random (`sample_ranks_`), and before
    every evaluation and checkpoint (`before_eval`, called by the training loop) put the target ranks
    back, so val loss is scored and weights are saved at the ranks the model is used at, not the last draw.
    """

    def __init__(self, target: dict[str, list], choices: Sequence[int] | None = None):
        self.target = {"k": [list(r) for r in target["k"]], "v": [list(r) for r in target["v"]]}
        self.choices = choices

    def __call__(self, model: nn.Module, generator: torch.Generator | None = None) -> None:
        sample_ranks_(model, generator, self.choices)

    def before_eval(self, model: nn.Module) -> None:
        set_ranks(model, k=self.target["k"], v=self.target["v"])


def ranks_config(model: nn.Module) -> AttentionConfig:
    """The model's attention config with the current ranks written as per-layer overrides, so a saved
    checkpoint (e.g. after a rank search) rebuilds with exactly these ranks."""
    att = model.config.attention
    layers = dict(att.layers)
    for i, attn in layers_or_error(model):
        layers[i] = att.for_layer(i).replace(
            ranks=None, k_ranks=list(attn.k_ranks), v_ranks=list(attn.v_ranks)
        )
    return att.replace(layers=layers)


def projection_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The Matryoshka rotation and mean parameters (seed 003 trains them at a higher lr than the base)."""
    return [p for _, a in matryoshka_layers(model) for p in (a.k_skew, a.v_skew, a.k_mean, a.v_mean)]
