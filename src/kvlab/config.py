"""Model and attention configuration: plain dataclasses, presets, and validation.

`ModelConfig` keeps nanoGPT's field names; `AttentionConfig` describes one KV structure along the
orthogonal axes of design.md (KV heads, KV owner per layer, latent rank, nested ranks, time-axis
compression) plus per-layer overrides. Every mistake is reported as a one-line `ConfigError` that names
the field and the fix.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from kvlab.errors import KvlabError


class ConfigError(KvlabError):
    """A user mistake in a configuration; the message is one line naming the field and the fix."""


def _reject_unknown_fields(cls, d: dict[str, Any], what: str) -> None:
    """One-line ConfigError for keys of d that are not fields of dataclass cls (a typo in a JSON config)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {what} field(s) {unknown}; known fields: {sorted(known)}")


def _divisors(n: int) -> str:
    ds = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, ds[:-1])) + f" or {ds[-1]}" if len(ds) > 1 else str(n)


@dataclass
class AttentionConfig:
    """One KV structure. Fields that a kind does not use are ignored by it (and validated as unset)."""

    kind: str = "gqa"  # registry name: gqa (MHA/GQA/MQA), mla, matryoshka, context
    n_kv_heads: int | None = None  # KV heads per layer; None = n_head (MHA). Must divide n_head.
    # Which layer owns the KV each layer attends to: "none", "every:K" (CLA-K), "groups:N" (MLKV with N
    # owners evenly spaced from layer 0), or an explicit list owner[i] <= i. Borrowers cache nothing.
    kv_share: str | list[int] = "none"
    kv_rank: int | None = None  # MLA: latent width c_kv cached per token
    rope_dim: int | None = None  # MLA: width of the decoupled RoPE key shared by all heads
    q_rank: int | None = None  # MLA: optional low-rank query (None = full-rank query projection)
    rope_theta: float = 10000.0  # RoPE base wherever RoPE is used
    ranks: int | None = None  # Matryoshka: K and V rank of every head (None = head_dim, full rank)
    # Matryoshka: per-head ranks (list of n_kv_heads ints) overriding `ranks`; per layer via `layers`.
    k_ranks: list[int] | None = None
    v_ranks: list[int] | None = None
    interval: int | None = None  # Context-KV: tokens summarised by one context slot
    max_contexts: int | None = None  # Context-KV: completed slots a query may attend to
    local_window: int | None = None  # Context-KV: raw tokens kept (the current chunk; <= interval)
    context_dim: int | None = None  # Context-KV: width of a context vector
    # Per-layer overrides: {layer index: AttentionConfig}. An override replaces the whole structure of
    # that layer (kv_share and layers stay model-wide). Seed 001 replaces layer 0 only.
    layers: dict[int, AttentionConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = {
            int(i): (AttentionConfig.from_dict(c) if isinstance(c, dict) else c)
            for i, c in self.layers.items()
        }
        for i, c in self.layers.items():
            if c.layers:
                raise ConfigError(f"layers[{i}] has its own `layers`; per-layer overrides cannot nest")
            if c.kv_share != "none":
                raise ConfigError(
                    f"layers[{i}].kv_share={c.kv_share!r}: kv_share is model-wide; set it on the top-level "
                    "AttentionConfig"
                )

    # ---- per-layer view -------------------------------------------------------------------------
    def for_layer(self, i: int) -> AttentionConfig:
        """The structure of layer i: its override if any, else this config (without model-wide fields)."""
        base = self.layers.get(i, self)
        return dataclasses.replace(base, layers={}, kv_share="none")

    def owners(self, n_layer: int) -> list[int]:
        """owner[i] = the layer whose KV layer i attends to (owner[i] == i: layer i caches its own)."""
        return parse_kv_share(self.kv_share, n_layer)

    # ---- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = {str(i): c.to_dict() for i, c in self.layers.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttentionConfig:
        _reject_unknown_fields(cls, d, "attention")
        d = dict(d)
        d["layers"] = {int(i): cls.from_dict(c) for i, c in d.get("layers", {}).items()}
        return cls(**d)


def parse_kv_share(kv_share: str | list[int], n_layer: int) -> list[int]:
    """Resolve a kv_share spec to an owner map (see AttentionConfig.kv_share)."""
    if isinstance(kv_share, (list, tuple)):
        owners = [int(o) for o in kv_share]
        if len(owners) != n_layer:
            raise ConfigError(f"kv_share list has {len(owners)} entries; it needs one per layer ({n_layer})")
        for i, o in enumerate(owners):
            if not 0 <= o <= i:
                raise ConfigError(
                    f"kv_share[{i}]={o}: a layer can only borrow KV from itself or an earlier layer"
                )
            if owners[o] != o:
                raise ConfigError(
                    f"kv_share[{i}]={o} but layer {o} itself borrows from {owners[o]}; "
                    f"point layer {i} at {owners[o]}"
                )
        return owners
    spec = str(kv_share).strip()
    if spec == "none":
        return list(range(n_layer))
    m = re.fullmatch(r"(every|groups):(\d+)", spec)
    if not m:
        raise ConfigError(
            f"kv_share={spec!r} not understood; use 'none', 'every:K', 'groups:N' or a list owner[i] <= i"
        )
    k = int(m.group(2))
    if m.group(1) == "every":
        if not 1 <= k <= n_layer:
            raise ConfigError(f"kv_share='every:{k}': K must be between 1 and n_layer={n_layer}")
        return [(i // k) * k for i in range(n_layer)]
    if not 1 <= k <= n_layer:
        raise ConfigError(f"kv_share='groups:{k}': N must be between 1 and n_layer={n_layer}")
    owner_layers = sorted({0} | {int((j + 1) * n_layer / k) for j in range(k - 1)})  # MLKV spacing
    return [max(o for o in owner_layers if o <= i) for i in range(n_layer)]


def attention_preset(name: str, n_layer: int, n_head: int, n_embd: int) -> AttentionConfig:
    """Named attention structures (seed 000 baselines plus kvlab's): mha, gqa, mqa, mla, cla2, mlkv-N,
    matryoshka-R, context-I."""
    head_dim = n_embd // n_head
    if name == "mha":
        return AttentionConfig(kind="gqa", n_kv_heads=n_head)
    if name == "gqa":
        return AttentionConfig(kind="gqa", n_kv_heads=max(1, n_head // 4))
    if name == "mqa":
        return AttentionConfig(kind="gqa", n_kv_heads=1)
    if name == "cla2":
        return AttentionConfig(kind="gqa", n_kv_heads=n_head, kv_share="every:2")
    if name == "mla":  # seed 000: kv_rank = 4 * head_dim, rope_dim = head_dim, q_rank = min(C, 12 * hd)
        return AttentionConfig(
            kind="mla", kv_rank=4 * head_dim, rope_dim=head_dim, q_rank=min(n_embd, 12 * head_dim)
        )
    m = re.fullmatch(r"(mlkv|matryoshka|context)-(\d+)", name)
    if m:
        kind, k = m.group(1), int(m.group(2))
        if kind == "mlkv":
            return AttentionConfig(kind="gqa", n_kv_heads=1, kv_share=f"groups:{k}")
        if kind == "matryoshka":
            return AttentionConfig(kind="matryoshka", ranks=k)
        return AttentionConfig(kind="context", interval=k)
    raise ConfigError(f"unknown attention preset {name!r}; choose one of {', '.join(ATTENTION_PRESET_NAMES)}")


ATTENTION_PRESET_NAMES = ("mha", "gqa", "mqa", "mla", "cla2", "mlkv-<N>", "matryoshka-<R>", "context-<I>")


@dataclass
class ModelConfig:
    """A GPT-style model. Field names follow nanoGPT so its configs read the same here."""

    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # query heads per layer
    n_embd: int = 768  # residual width; head_dim = n_embd // n_head
    block_size: int = 1024  # longest context the model is trained for (learned positions stop here)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for fast matmuls
    bias: bool = False  # biases in Linear/LayerNorm (GPT-2 checkpoints: True; nanoGPT default: False)
    dropout: float = 0.0  # 0 for pretraining (nanoGPT); try 0.1 when fine-tuning
    family: str = "gpt2"  # block layout: gpt2 = learned positions, pre-LN, GELU MLP, tied head
    # MLP nonlinearity: "gelu" exact as nanoGPT; "gelu_tanh" as GPT-2 checkpoints (HF's gelu_new), so
    # imported weights reproduce their logits.
    activation: str = "gelu"
    attention: AttentionConfig | str = field(default_factory=AttentionConfig)

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name}={v!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}; try n_head in "
                f"{_divisors(self.n_embd)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"activation={self.activation!r} unknown; choose one of {', '.join(ACTIVATIONS)}"
            )
        if self.family not in FAMILIES:
            raise ConfigError(f"family={self.family!r} unknown; choose one of {', '.join(FAMILIES)}")
        if isinstance(self.attention, str):
            self.attention = attention_preset(self.attention, self.n_layer, self.n_head, self.n_embd)
        elif isinstance(self.attention, dict):
            self.attention = AttentionConfig.from_dict(self.attention)
        self.validate_attention()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate_attention(self) -> None:
        """Check every layer's structure with its variant's own rules, and the owner map."""
        from kvlab.attention import get_variant  # late import: the registry imports this module

        att = self.attention
        for i in att.layers:
            if not 0 <= i < self.n_layer:
                raise ConfigError(f"attention.layers has layer {i}; valid layers are 0..{self.n_layer - 1}")
        owners = att.owners(self.n_layer)
        for i in range(self.n_layer):
            layer = att.for_layer(i)
            variant = get_variant(layer.kind)
            variant.check_config(layer, self)
            if owners[i] != i and variant.kv_share_unsupported:
                raise ConfigError(
                    f"kv_share makes layer {i} borrow layer {owners[i]}'s KV, but kind={layer.kind!r} layers "
                    f"cannot share KV ({variant.kv_share_unsupported}); use kv_share only among other kinds"
                )
            if owners[i] != i and layer != att.for_layer(owners[i]):
                raise ConfigError(
                    f"layer {i} borrows KV from layer {owners[i]} but their attention structures differ; "
                    "give both layers the same `layers` entry"
                )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["attention"] = self.attention.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        _reject_unknown_fields(cls, d, "model")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named model with any field overridden, e.g. preset("gpt2-124m", attention="gqa")."""
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
        fields = {**MODEL_PRESETS[name], **overrides}
        return cls.from_dict(fields)


FAMILIES = ("gpt2",)
ACTIVATIONS = ("gelu", "gelu_tanh")

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small as nanoGPT trains it (seed 000): 124M parameters.
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    # GPT-2 medium (seed 000's later 345M runs).
    "gpt2-345m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50304),
    # Trains usefully on 2 CPU cores in minutes. 8 heads so gqa (2 KV heads) and mqa (1) differ; 4 layers
    # so cla2 and mlkv-2 halve the owners. vocab_size is replaced by the data's tokenizer at train time.
    "cpu-tiny": dict(n_layer=4, n_head=8, n_embd=128, block_size=256, vocab_size=8192),
}


@dataclass
class TrainConfig:
    """One training run (seed 000's nanoGPT loop). Names follow nanoGPT's train.py."""

    max_iters: int = 5000  # optimizer steps; the LR schedule spans exactly these
    eval_interval: int = 250  # evaluate + checkpoint every this many steps (and at the last step)
    eval_iters: int = 200  # val batches per evaluation (seed 000: 200); the same batches every time
    log_interval: int = 10  # steps between progress-bar updates (each costs a device sync)
    batch_size: int = 12  # sequences per micro-batch (global, summed over DDP ranks)
    grad_accum: int = 5  # micro-batches per optimizer step; under DDP split across ranks (must divide)
    lr: float = 6e-4  # peak learning rate after warmup
    min_lr: float | None = None  # end of the cosine; None = lr / 10 (seed 000)
    warmup_frac: float = 0.04  # linear warmup over this fraction of max_iters (seed 000: 4%)
    weight_decay: float = 0.1  # AdamW decay, applied to parameters with dim >= 2 only
    beta1: float = 0.9  # AdamW betas (0.9, 0.95): the GPT-3 / nanoGPT choice
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip the global grad norm; 0 disables
    seed: int = 42  # seeds init, batch sampling, dropout and hooks; saved and restored on resume
    device: str = "auto"  # auto = cuda if available else cpu (DDP: cuda:LOCAL_RANK)
    dtype: str = "auto"  # autocast dtype: auto = bfloat16 on GPU, float32 on CPU (bit-exact resume)
    compile: bool = False  # torch.compile the model (GPU runs; slow to start on CPU)
    tensorboard: bool = True  # also log to RUN_DIR/tb when tensorboard is installed (JSON lines always)

    def __post_init__(self) -> None:
        for name in ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size", "grad_accum"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"train.{name}={v!r} must be a positive integer")
        if not self.lr > 0:
            raise ConfigError(f"train.lr={self.lr} must be positive")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(
                f"train.min_lr={self.min_lr} must be in [0, lr={self.lr}]; or unset it for lr/10"
            )
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ConfigError(f"train.warmup_frac={self.warmup_frac} must be in [0, 1)")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"train.dtype={self.dtype!r} unknown; use auto, float32 or bfloat16")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("train.grad_clip and train.weight_decay must be >= 0")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def warmup_iters(self) -> int:
        return int(round(self.warmup_frac * self.max_iters))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        _reject_unknown_fields(cls, d, "train")
        return cls(**d)
