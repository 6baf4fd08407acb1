"""KV structures: one module per structure behind the `KVStructure` interface, found by `kind`."""

from kvlab.attention import (
    context,  # noqa: F401
    grouped,  # noqa: F401  (registers "gqa")
    matryoshka,  # noqa: F401
    mla,  # noqa: F401
)
from kvlab.attention.base import (
    KVStructure,
    TensorState,
    causal_attention,
    get_variant,
    register,
    registered_kinds,
)

__all__ = ["KVStructure", "TensorState", "causal_attention", "get_variant", "register", "registered_kinds"]
