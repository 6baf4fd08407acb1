"""The GPT model: embeddings, pre-norm blocks, final norm, LM head, for the GPT-2, GPT-NeoX and Llama
families (LayerNorm or RMSNorm, GELU or SwiGLU MLP, sequential or parallel residual, learned positions or
RoPE, tied or untied head: each a ModelConfig field).

It knows nothing about KV structures: each block's attention comes from the registry by `kind`, the
owner map says which layer's KV each layer reads, and the cache is built from the layers' own states.
"""

from __future__ import annotations

import json
import numbers
from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvlab.attention import KVStructure, get_variant
from kvlab.attention.base import init_linear_, residual_std
from kvlab.cache import CacheError, KVCache
from kvlab.config import ConfigError, ModelConfig
from kvlab.inputs import check_device, check_token_ids

# cuDNN's SDPA builds a new execution plan for every new sequence length (about 5 ms of CPU per call on
# an H100 with torch 2.11, measured), and generation changes the length every step (the cache's keys, or
# the cropped context of cache-free decoding): inference on CUDA therefore uses the flash /
# memory-efficient kernels (math as the fallback). Training (fixed shapes) keeps PyTorch's choice.
_CACHED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in float32 and cast back (as Llama), so bf16 inputs keep full-precision statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).to(x.dtype)


_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


class MLP(nn.Module):
    """down(act(up(x))), or with gated_mlp down(act(gate(x)) * up(x)) (SwiGLU when act is SiLU)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.mlp_width
        self.c_fc = nn.Linear(cfg.n_embd, width, bias=cfg.bias)  # up
        self.c_gate = nn.Linear(cfg.n_embd, width, bias=cfg.bias) if cfg.gated_mlp else None
        self.c_proj = nn.Linear(width, cfg.n_embd, bias=cfg.bias)  # down, into the residual
        self.dropout = nn.Dropout(cfg.dropout)
        self.act = _ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.c_gate(x)) * self.c_fc(x) if self.c_gate is not None else self.act(self.c_fc(x))
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, owns_kv: bool):
        super().__init__()
        layer_cfg = cfg.attention.for_layer(layer_idx)
        self.ln_1 = make_norm(cfg)
        self.attn: KVStructure = get_variant(layer_cfg.kind)(layer_cfg, cfg, layer_idx, owns_kv)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.parallel_residual = cfg.parallel_residual

    def forward(self, x, pos: int, state=None, kv=None):
        a, new_kv = self.attn(self.ln_1(x), pos=pos, state=state, kv=kv)
        if self.parallel_residual:  # GPT-NeoX: attention and MLP both read x
            return x + self.resid_dropout(a) + self.mlp(self.ln_2(x)), new_kv
        x = x + self.resid_dropout(a)
        x = x + self.mlp(self.ln_2(x))
        return x, new_kv


def _check_cache_size(batch_size, max_len) -> None:
    for name, v in (("batch_size", batch_size), ("max_len", max_len)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v <= 0:
            raise CacheError(f"{name}={v!r} must be a positive integer")


def _check_cache_dtype(dtype) -> torch.dtype:
    """What new_cache and kv_cache_bytes take: a floating torch.dtype (integers would round K/V)."""
    if not isinstance(dtype, torch.dtype):
        raise CacheError(
            f"cache dtype {dtype!r} must be a torch.dtype such as torch.bfloat16 or torch.float32"
        )
    if not dtype.is_floating_point:
        raise CacheError(f"cache dtype {dtype} would round K/V to integers; use a floating dtype")
    return dtype


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        if not isinstance(cfg, ModelConfig):
            raise ConfigError(
                f"GPT takes a ModelConfig, got {type(cfg).__name__}; build one with ModelConfig(**fields), "
                "ModelConfig.from_dict(d) or ModelConfig.preset(name)"
            )
        super().__init__()
        self.config = cfg
        self.owners = cfg.attention.owners(cfg.n_layer)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i, self.owners[i] == i) for i in range(cfg.n_layer))
        # Learned positions in that family unless every layer encodes positions itself (seed 000's MLA
        # switches wpe off); RoPE families rotate q/k inside attention.
        self.uses_learned_positions = cfg.positions == "learned" and not all(
            b.attn.provides_positions for b in self.blocks
        )
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if self.uses_learned_positions else None
        self.drop = nn.Dropout(cfg.dropout)
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # GPT-2, SmolLM2
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nanoGPT init: N(0, 0.02) everywhere, residual projections N(0, 0.02 / sqrt(2 n_layer))."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_linear_(module)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std(self.config.n_layer))
        for block in self.blocks:
            block.attn.reset_parameters()

    # ---- forward --------------------------------------------------------------------------------
    def forward(
        self, idx: torch.Tensor, cache: KVCache | None = None, *, hidden: bool = False
    ) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab). With a cache: appends to it and returns every position.
        hidden=True: the final-norm states (B, T, C) instead, for a loss that applies the LM head itself
        (kvlab.train.linear_ce)."""
        check_token_ids(idx, self.config.vocab_size)
        B, T = idx.shape
        pos = 0
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise CacheError(
                    f"cache must be a KVCache from model.new_cache(...), got {type(cache).__name__}"
                )
            cache.check_model(self._structure_key(), idx.device)
            cache.check_append(B, T)
            pos = cache.pos
        if self.wpe is not None and pos + T > self.config.block_size:
            raise CacheError(
                f"positions up to {pos + T} exceed block_size={self.config.block_size} (learned positions); "
                "shorten the input or crop it to the last block_size tokens"
            )
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(pos, pos + T, device=idx.device))
        x = self.drop(x)
        kvs: dict[int, tuple] = {}  # payload of each owner layer, for its borrowers (no-cache path)
        inference = cache is not None or not (self.training or torch.is_grad_enabled())
        backends = sdpa_kernel(_CACHED_SDPA_BACKENDS) if inference and idx.is_cuda else nullcontext()
        with backends:
            for i, block in enumerate(self.blocks):
                owner = self.owners[i]
                state = cache.state_for(i) if cache is not None else None
                x, new_kv = block(x, pos, state=state, kv=None if owner == i else kvs.get(owner))
                if owner == i and cache is None:
                    kvs[i] = new_kv
        if cache is not None:
            cache.advance(T)
        x = self.ln_f(x)
        return x if hidden else self.lm_head(x)

    # ---- the cache ------------------------------------------------------------------------------
    def _param_dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    def new_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A preallocated cache holding only the KV-owning layers' reduced state."""
        max_len = self.config.block_size if max_len is None else max_len
        _check_cache_size(batch_size, max_len)
        if self.wpe is not None and max_len > self.config.block_size:
            raise CacheError(
                f"max_len={max_len} exceeds block_size={self.config.block_size}; learned positions stop there"
            )
        dtype = _check_cache_dtype(dtype or self._param_dtype())
        device = self.wte.weight.device if device is None else check_device(device, "device", allow_meta=True)
        states = [
            b.attn.new_state(batch_size, max_len, device, dtype) if self.owners[i] == i else None
            for i, b in enumerate(self.blocks)
        ]
        return KVCache(states, self.owners, batch_size, max_len, self._structure_key(), device)

    def _structure_key(self) -> str:
        """What a cache's layout depends on: the model's shape and attention config (JSON), computed once
        per config object (a decode step should not serialise the config)."""
        c = self.config
        held = self.__dict__.get("_structure_cache")
        if held is None or held[0] is not c:
            shape = (c.n_layer, c.n_head, c.n_embd, c.family)
            held = (c, f"{shape}{json.dumps(c.attention.to_dict(), sort_keys=True)}")
            self.__dict__["_structure_cache"] = held
        return held[1]

    def kv_cache_bytes(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> int:
        """Analytic bytes of new_cache(batch_size, max_len, dtype); equals cache.nbytes() exactly."""
        _check_cache_size(batch_size, max_len)
        dtype = _check_cache_dtype(dtype or self._param_dtype())
        return sum(b.attn.cache_bytes(batch_size, max_len, dtype) for b in self.blocks)

    def kv_metrics(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
        """Structural KV metrics (design.md): per-token bytes at bf16, sharing ratios, latent ratio."""
        per_layer = [b.attn.kv_bytes_per_token(dtype) for b in self.blocks]
        owners = [b.attn for b in self.blocks if b.attn.owns_kv]
        return {
            "kv_bytes_per_token": float(sum(per_layer) / len(per_layer)),
            "kv_bytes_per_token_total": float(sum(per_layer)),
            "head_sharing_ratio": float(self.config.n_head / (sum(a.kv_heads for a in owners) / len(owners))),
            "layer_sharing_ratio": float(self.config.n_layer / len(owners)),
            "latent_rank_ratio": float(sum(a.latent_rank_ratio for a in owners) / len(owners)),
        }

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Approximate training FLOPs per token (6N + attention, PaLM appendix B), for MFU figures."""
        T = seq_len or self.config.block_size
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T
