"""Load an attention file's region and build seed 000's frozen nanoGPT substrate around it.

`load_attention(path)` validates the region, then runs it in a fresh namespace holding only math, torch,
nn, F and a reduced set of builtins. `SeedGPT` is nanoGPT's GPT-2 (learned positions unless the modules
set use_pos_emb False, pre-LN blocks, 4x GELU MLP, tied head, N(0, 0.02) init with residual projections
scaled by 1/sqrt(2 n_layer)) with the file's CausalSelfAttention in every block. It exposes kvlab's model
interface (`config`, `forward(idx) -> logits`) so kvlab's training loop and evaluations drive it; where the
file implements kvlab's cache interface (`cache_interface`), also `new_cache` and `forward(idx, cache=)`,
so kvlab's `generate` decodes it through the file's own cache.
"""

from __future__ import annotations

import builtins
import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvlab.cache import CacheError, KVCache
from kvlab.config import ModelConfig
from kvlab.errors import KvlabError
from kvlab.harness.template import REQUIRED_CLASS, REQUIRED_FUNCTIONS, read_region
from kvlab.harness.validate import FORBIDDEN_CALLS, validate_region

# The region sees the builtins minus those that reach the interpreter or the file system (the validator
# rejects their names already; this is a second, independent layer).
_SAFE_BUILTINS = {k: v for k, v in vars(builtins).items() if k not in FORBIDDEN_CALLS}


class AttentionLoadError(KvlabError):
    """An attention file that fails validation, or whose region fails to define or build."""


@dataclass(frozen=True)
class LoadedAttention:
    path: Path
    sha256: str  # of the region's source: what was run
    namespace: dict[str, Any]

    @property
    def attention_class(self) -> type[nn.Module]:
        return self.namespace[REQUIRED_CLASS]


def load_attention(path: str | Path) -> LoadedAttention:
    """Validate and run the region; raises AttentionLoadError listing every violation."""
    region = read_region(path)
    violations = validate_region(region)
    if violations:
        lines = "\n".join(v.format(region.path) for v in violations)
        raise AttentionLoadError(f"{region.path} fails validation (`kvlab validate` explains):\n{lines}")
    digest = hashlib.sha256(region.source.encode()).hexdigest()
    namespace: dict[str, Any] = {
        "__builtins__": dict(_SAFE_BUILTINS),
        "__name__": f"kvlab_attention_{digest[:12]}",
        "math": math,
        "torch": torch,
        "nn": nn,
        "F": F,
    }
    # Pad with newlines so tracebacks point at the file's own line numbers.
    code = compile("\n" * (region.first_line - 1) + region.source, str(region.path), "exec")
    try:
        exec(code, namespace)  # only def/class at the top level (validated): defines, runs nothing else
    except Exception as e:
        raise AttentionLoadError(f"{region.path}: defining the region failed: {type(e).__name__}: {e}") from e
    for name in (*REQUIRED_FUNCTIONS, REQUIRED_CLASS):
        if not callable(namespace.get(name)):
            raise AttentionLoadError(f"{region.path}: the region does not define {name}")
    if not (isinstance(namespace[REQUIRED_CLASS], type) and issubclass(namespace[REQUIRED_CLASS], nn.Module)):
        raise AttentionLoadError(f"{region.path}: {REQUIRED_CLASS} must subclass nn.Module")
    return LoadedAttention(region.path, digest, namespace)


def cache_interface(cls: type) -> str | None:
    """None when the class implements kvlab's cache interface, else why it does not.

    The interface (kvlab's KVStructure, reduced to what a region can write): `new_state(batch_size,
    max_len, device, dtype)` returns a dict of preallocated tensors -- everything the layer keeps for
    max_len tokens ({} for a layer that keeps nothing) -- and `forward(x, state=None, pos=0)` with a state
    treats x as the tokens at positions pos..pos+T-1: it writes what it keeps for them into the state's
    tensors at [pos, pos+T) and attends over positions 0..pos+T-1. Without a state it is seed 000's forward.
    """
    if not callable(getattr(cls, "new_state", None)):
        return f"{cls.__name__} defines no new_state(batch_size, max_len, device, dtype)"
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return f"{cls.__name__}.forward has no inspectable signature"
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not (takes_kwargs or {"state", "pos"} <= set(params)):
        return f"{cls.__name__}.forward takes no state= and pos= arguments"
    return None


class FileState:
    """One layer's cache: the dict its new_state returned (the layer writes into it); nbytes() counts
    every tensor in it when asked, so tensors a layer adds during forward are counted too."""

    def __init__(self, tensors: Any, layer_idx: int):
        if not (isinstance(tensors, dict) and all(isinstance(t, torch.Tensor) for t in tensors.values())):
            raise AttentionLoadError(
                f"layer {layer_idx}: new_state must return a dict of tensors, got {type(tensors).__name__}"
            )
        self.tensors = tensors

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def numbers(self) -> int:
        """Floating-point numbers held (what seed 000's accounting counts at 2 bytes each)."""
        return sum(t.numel() for t in self.tensors.values() if t.is_floating_point())

    def other_bytes(self) -> int:
        """Bytes of non-floating tensors (e.g. integer positions), counted as they are."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values() if not t.is_floating_point())


def seed_config(model_cfg: ModelConfig, **extra: Any) -> SimpleNamespace:
    """The `config` object the region's functions receive: nanoGPT's GPTConfig fields plus `extra`
    (e.g. kv_lora_rank=256 for the 124M pilot's MLA), read by attribute as in the seed."""
    fields = {k: getattr(model_cfg, k) for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")}
    return SimpleNamespace(**fields, dropout=model_cfg.dropout, bias=model_cfg.bias, **extra)


class SeedMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class SeedBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: nn.Module):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = attention
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = SeedMLP(cfg)

    def forward(self, x, state=None, pos: int = 0):
        h = self.ln_1(x)
        # the contract's call, forward(x), unless a cache is in use (kvlab's cache interface)
        x = x + (self.attn(h) if state is None else self.attn(h, state=state, pos=pos))
        return x + self.mlp(self.ln_2(x))


class SeedGPT(nn.Module):
    """Seed 000's frozen substrate around a loaded attention file (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, loaded: LoadedAttention, **extra: Any):
        super().__init__()
        if getattr(cfg, "family", "gpt2") != "gpt2":
            raise AttentionLoadError(
                f"seed 000's substrate is nanoGPT's GPT-2; family={cfg.family!r} does not apply to attention "
                "files (use a gpt2-family preset such as cpu-tiny, gpt2-124m or gpt2-345m)"
            )
        self.config = cfg
        self.seed_config = seed_config(cfg, **extra)
        self.attention_file = str(loaded.path)
        self.attention_sha256 = loaded.sha256
        cls = loaded.attention_class
        blocks = []
        for i in range(cfg.n_layer):
            try:
                blocks.append(SeedBlock(cfg, cls(self.seed_config, layer_idx=i)))
            except Exception as e:
                raise AttentionLoadError(
                    f"{loaded.path}: CausalSelfAttention(config, layer_idx={i}) failed: "
                    f"{type(e).__name__}: {e}"
                ) from e
        self.blocks = nn.ModuleList(blocks)
        flags = {bool(getattr(b.attn, "use_pos_emb", True)) for b in self.blocks}
        if len(flags) > 1:
            raise AttentionLoadError(
                f"{loaded.path}: layers disagree on use_pos_emb; set it the same in every layer"
            )
        self.uses_learned_positions = flags.pop()
        self.cache_unsupported = cache_interface(cls)  # None: the file implements kvlab's cache interface
        self._structure = f"{loaded.sha256}|{json.dumps(cfg.to_dict(), sort_keys=True)}|{extra!r}"
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if self.uses_learned_positions else None
        self.drop = nn.Dropout(cfg.dropout)
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # nanoGPT: residual projections scaled by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def supports_cache(self) -> bool:
        return self.cache_unsupported is None

    def new_cache(self, batch_size: int = 1, max_len: int | None = None, dtype=None, device=None) -> KVCache:
        """A cache of every layer's new_state (kvlab's cache interface), as kvlab's GPT.new_cache."""
        if self.cache_unsupported is not None:
            raise CacheError(f"{self.attention_file}: no cache: {self.cache_unsupported}")
        param = self.wte.weight
        max_len = max_len or self.config.block_size
        device = torch.device(device) if device is not None else param.device
        dtype = dtype or param.dtype
        states = [
            FileState(b.attn.new_state(batch_size, max_len, device, dtype), i)
            for i, b in enumerate(self.blocks)
        ]
        n = len(states)
        return KVCache(states, list(range(n)), batch_size, max_len, structure=self._structure, device=device)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab). The contract's forward has no cache; with one (a file that
        implements kvlab's cache interface) idx continues the cached tokens and is appended to them."""
        B, T = idx.shape
        pos = 0
        if cache is not None:
            if self.cache_unsupported is not None:
                raise CacheError(f"{self.attention_file}: no cache: {self.cache_unsupported}")
            cache.check_model(self._structure, idx.device)
            cache.check_append(B, T)
            pos = cache.pos
        # learned positions end at block_size; RoPE files may decode past it through a cache, as kvlab's GPT
        if (cache is None or self.wpe is not None) and pos + T > self.config.block_size:
            raise KvlabError(f"sequence length {pos + T} exceeds block_size={self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(pos, pos + T, device=idx.device))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache.states[i].tensors if cache is not None else None, pos)
        if cache is not None:
            cache.advance(T)
        return self.lm_head(self.ln_f(x))

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n

    def kv_metrics(self) -> dict[str, float]:
        """Seed 000's figures from the realized modules (harness.metrics.declared_metrics) under the keys of
        kvlab's GPT.kv_metrics, so kvlab.eval.evaluate reports them; layer_sharing_ratio counts the layers
        that do not declare share_across_layers as KV owners."""
        from kvlab.harness.metrics import declared_metrics

        declared = declared_metrics(self)
        owners = sum(1 for layer in declared["per_layer"] if not layer["share_across_layers"])
        keys = ("kv_bytes_per_token", "kv_bytes_per_token_total", "head_sharing_ratio", "latent_rank_ratio")
        return {
            **{k: declared[k] for k in keys},
            "layer_sharing_ratio": float(self.config.n_layer / max(1, owners)),
        }


def build_seed_model(path: str | Path, cfg: ModelConfig, **extra: Any) -> SeedGPT:
    """load_attention + SeedGPT in one call."""
    return SeedGPT(cfg, load_attention(path), **extra)
