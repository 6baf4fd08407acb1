"""KVCache: the stack of per-layer states, for KV-owning layers only, with an explicit position.

Each layer's state is allocated by its own KV structure (`new_state`), so the cache never assumes a
`[B, H, T, D]` layout; borrowing layers hold nothing. `nbytes()` counts every tensor the cache holds.
"""

from __future__ import annotations

from kvlab.errors import KvlabError


class CacheError(KvlabError):
    """Misuse of a cache (overflow, wrong batch size); the message says how to fix it."""


class KVCache:
    def __init__(
        self,
        states: list,
        owners: list[int],
        batch_size: int,
        max_len: int,
        structure: str | None = None,
        device=None,
    ):
        self.states = states  # states[i] is layer i's state, or None where layer i borrows
        self.owners = owners  # owners[i]: the layer whose state layer i reads
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0  # tokens written so far; the next call's first token sits here
        self.structure = structure  # the model shape + attention config the states were built for
        self.device = device

    def check_model(self, structure: str, device) -> None:
        """Refuse a cache built by a model of another structure, or on another device."""
        if self.structure is not None and structure != self.structure:
            raise CacheError(
                "this cache was built for a model with another shape or attention structure; "
                "create it with this model's new_cache(...)"
            )
        d = self.device
        if d is not None and (d.type != device.type or (None not in (d.index, device.index) and d != device)):
            raise CacheError(
                f"the cache lives on {self.device} but the input is on {device}; create the cache with "
                "new_cache(device=...) on the input's device, or move the input"
            )

    def state_for(self, layer: int):
        """The state layer `layer` reads (its owner's)."""
        return self.states[self.owners[layer]]

    def check_append(self, batch_size: int, n_new: int) -> None:
        if batch_size != self.batch_size:
            raise CacheError(
                f"input batch size {batch_size} does not match the cache's batch_size={self.batch_size}; "
                "create the cache with model.new_cache(batch_size=...)"
            )
        if self.pos + n_new > self.max_len:
            raise CacheError(
                f"{self.pos} cached + {n_new} new tokens exceed the cache's max_len={self.max_len}; "
                "create the cache with a larger max_len or shorten the prompt"
            )

    def advance(self, n_new: int) -> None:
        self.pos += n_new

    def reset(self) -> None:
        """Forget the cached tokens (the buffers are reused; stale entries are overwritten)."""
        self.pos = 0

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.states if s is not None)

    def __repr__(self) -> str:
        owners = sum(s is not None for s in self.states)
        return (
            f"KVCache(batch_size={self.batch_size}, max_len={self.max_len}, pos={self.pos}, "
            f"owner_layers={owners}/{len(self.states)}, nbytes={self.nbytes()})"
        )
