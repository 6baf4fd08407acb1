"""KV structures: one module per structure behind the `KVStructure` interface, found by `kind`."""

# Registration order is the order presets are listed in.
from kvlab.attention import grouped  # noqa: F401, I001  (registers "gqa", mha/gqa/mqa/cla2/mlkv-N)
from kvlab.attention import mla  # noqa: F401
from kvlab.attention import matryoshka  # noqa: F401
from kvlab.attention import context  # noqa: F401
from kvlab.attention.base import (
    KVStructure,
    TensorState,
    causal_attention,
    get_variant,
    register,
    registered_kinds,
)

__all__ = ["KVStructure", "TensorState", "causal_attention", "get_variant", "register", "registered_kinds"]
