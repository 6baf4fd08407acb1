"""`AttentionConfig`: one KV structure along the orthogonal axes of design.md (KV heads, KV owner per
layer, latent rank, nested ranks, time-axis compression) plus per-layer overrides, its kv_share
language, and the named attention presets. Re-exported by kvlab.config."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from kvlab._validation import ConfigError


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
