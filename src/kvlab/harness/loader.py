"""Load an attention file's region and build seed 000's frozen nanoGPT substrate around it.

`load_attention(path)` validates the region, then runs it in a fresh namespace holding only math, torch,
nn, F and a reduced set of builtins. `SeedGPT` is nanoGPT's GPT-2 (learned positions unless the modules
set use_pos_emb False, pre-LN blocks, 4x GELU MLP, tied head, N(0, 0.02) init with residual projections
scaled by 1/sqrt(2 n_layer)) with the file's CausalSelfAttention in every block. It exposes kvlab's model
interface (`config`, `forward(idx) -> logits`) so kvlab's training loop and evaluations drive it.
"""

from __future__ import annotations

import builtins
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

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

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
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

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab); the contract's forward has no cache."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise KvlabError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n


def build_seed_model(path: str | Path, cfg: ModelConfig, **extra: Any) -> SeedGPT:
    """load_attention + SeedGPT in one call."""
    return SeedGPT(cfg, load_attention(path), **extra)
