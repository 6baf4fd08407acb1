"""Shared test fixtures: tiny configs and the list of every KV structure the invariants run over."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvlab import AttentionConfig, ModelConfig

# Every registered structure and combination. Each entry: id -> AttentionConfig for a tiny model with
# n_layer=4, n_head=4, n_embd=32 (head_dim 8). Adding a structure means adding it here: the invariant
# tests (cached == full forward, measured bytes == analytic bytes) then cover it.
VARIANTS: dict[str, AttentionConfig] = {
    "mha": AttentionConfig(kind="gqa", n_kv_heads=4),
    "gqa": AttentionConfig(kind="gqa", n_kv_heads=2),
    "mqa": AttentionConfig(kind="gqa", n_kv_heads=1),
    "cla2": AttentionConfig(kind="gqa", kv_share="every:2"),
    "gqa+cla2": AttentionConfig(kind="gqa", n_kv_heads=2, kv_share="every:2"),
    "mqa+every2": AttentionConfig(kind="gqa", n_kv_heads=1, kv_share="every:2"),
    "mlkv-groups3": AttentionConfig(kind="gqa", n_kv_heads=1, kv_share="groups:3"),
    "mlkv-groups1": AttentionConfig(kind="gqa", n_kv_heads=2, kv_share="groups:1"),
    "explicit-owners": AttentionConfig(kind="gqa", n_kv_heads=2, kv_share=[0, 0, 2, 0]),
    "mla": AttentionConfig(kind="mla", kv_rank=16, rope_dim=4, q_rank=24),
    "mla+cla2": AttentionConfig(kind="mla", kv_rank=16, rope_dim=4, q_rank=24, kv_share="every:2"),
    "mla-no-qrank": AttentionConfig(kind="mla", kv_rank=12, rope_dim=8),
    # What kvlab.convert.to_mla builds: per-KV-head RoPE keys and no latent norm; or no decoupled key.
    "mla-rope-heads": AttentionConfig(kind="mla", kv_rank=16, rope_dim=4, rope_heads=2, latent_norm=False),
    "mla-no-rope": AttentionConfig(kind="mla", kv_rank=16, rope_dim=0, latent_norm=False),
    "matryoshka-full": AttentionConfig(kind="matryoshka"),
    "matryoshka-mixed": AttentionConfig(kind="matryoshka", k_ranks=[8, 3, 5, 1], v_ranks=[2, 8, 4, 6]),
    "matryoshka+gqa": AttentionConfig(kind="matryoshka", n_kv_heads=2, ranks=3, v_ranks=[5, 1]),
    # Context-KV: 2-slot rings so the invariant sequences evict slots; layer 0 only, with a short window.
    "context-4": AttentionConfig(kind="context", interval=4, max_contexts=2),
    "context-layer0+gqa": AttentionConfig(
        kind="gqa",
        n_kv_heads=2,
        layers={0: AttentionConfig(kind="context", interval=3, max_contexts=2, local_window=2, n_kv_heads=1)},
    ),
}


# Every model family with what makes it differ at tiny size: NeoX rotates half of each 8-dim head here
# (Pythia: 25% of 64) and uses a parallel residual; Llama has RMSNorm, SwiGLU, no biases, untied head.
FAMILIES: dict[str, dict] = {
    "gpt2": dict(family="gpt2"),
    "neox": dict(family="neox", rotary_pct=0.5),
    "llama": dict(family="llama", bias=False, intermediate_size=48, rope_theta=500.0),
}


def tiny_config(attention: AttentionConfig | str, **overrides) -> ModelConfig:
    fields = dict(n_layer=4, n_head=4, n_embd=32, block_size=64, vocab_size=97, bias=True, dropout=0.0)
    fields.update(overrides)
    return ModelConfig(attention=attention, **fields)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip cleanly without CUDA (CI has none); they run when a GPU is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class Widenings(TorchDispatchMode):
    """Records the element count of every dtype conversion from bfloat16 to float32."""

    def __init__(self):
        super().__init__()
        self.widened: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        src = args[0] if args else None
        is_cast = func._overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.to)
        if is_cast and isinstance(src, torch.Tensor) and src.dtype == torch.bfloat16:
            if out.dtype == torch.float32:
                self.widened.append(src.numel())
        return out
