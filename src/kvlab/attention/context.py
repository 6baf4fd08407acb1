"""Context-KV attention (seed 001), with chunk-aligned slots so the cache really shrinks.

Slot j summarises tokens [j*interval, (j+1)*interval) through a recurrent ContextBlock (a GRU cell that
restarts at every chunk). A query at position t (chunk c = t // interval) attends to the completed slots
j in [c - max_contexts, c), projected to n_kv_heads K/V heads, plus the raw K/V of the last
`local_window` tokens of its own chunk. The cache keeps only a ring of context vectors, the current
chunk's raw K/V and the ContextBlock's recurrent state, so it stops growing once max_contexts slots exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvlab.attention.base import (
    PLAIN_LINEARS,
    KVStructure,
    Linears,
    StepPosition,
    register,
    register_preset,
)
from kvlab.attention.context_decode import gathered_step, static_step
from kvlab.config import AttentionConfig, ConfigError, ModelConfig, ModelShape
from kvlab.errors import KvlabError

DEFAULT_INTERVAL = 32  # seed 001: context_interval = 32
DEFAULT_MAX_CONTEXTS = 32  # seed 001: max_contexts = 32


@dataclass
class ContextOptions:
    n_kv_heads: int | None = None  # K/V heads of the raw tokens and the slots (None = n_head)
    interval: int | None = None  # tokens summarised by one context slot (None = 32, seed 001)
    max_contexts: int | None = None  # completed slots a query may attend to (None = 32)
    local_window: int | None = None  # raw tokens kept: the current chunk (None = interval; <= interval)
    context_dim: int | None = None  # width of a context vector (None = n_embd // 2, seed 001)


@dataclass(frozen=True)
class ContextShape:
    """The resolved sizes of one Context-KV layer (config fields with their defaults filled in)."""

    interval: int
    max_contexts: int
    local_window: int
    context_dim: int
    n_kv_heads: int


def resolve(cfg: AttentionConfig, model_cfg: ModelConfig) -> ContextShape:
    interval = DEFAULT_INTERVAL if cfg.interval is None else cfg.interval
    return ContextShape(
        interval=interval,
        max_contexts=DEFAULT_MAX_CONTEXTS if cfg.max_contexts is None else cfg.max_contexts,
        local_window=interval if cfg.local_window is None else cfg.local_window,
        # seed 001 uses 256 of 512 (half the width): a context vector is a compressed token.
        context_dim=max(1, model_cfg.n_embd // 2) if cfg.context_dim is None else cfg.context_dim,
        n_kv_heads=model_cfg.n_head if cfg.n_kv_heads is None else cfg.n_kv_heads,
    )


class ContextState:
    """One layer's Context-KV cache; every tensor is preallocated and counted by `nbytes()`.

    slots: ring of the last completed context vectors, slot j at index j % n_slots   (B, n_slots, d)
    raw_k, raw_v: ring of the current chunk's raw K/V, position t at t % n_raw         (B, H_kv, n_raw, D)
    h: the ContextBlock's recurrent state for the chunk in progress                    (B, d) or (B, 0)
    """

    def __init__(self, slots: torch.Tensor, raw_k: torch.Tensor, raw_v: torch.Tensor, h: torch.Tensor):
        self.slots, self.raw_k, self.raw_v, self.h = slots, raw_k, raw_v, h

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.slots, self.raw_k, self.raw_v, self.h))


@register("context")
class ContextAttention(KVStructure):
    """Attention over strided context slots plus the current chunk's raw tokens."""

    kv_share_unsupported = "its cache is a bounded ring of slots and the current chunk, not every token"
    Options = ContextOptions

    def __init__(self, cfg: AttentionConfig, model_cfg: ModelConfig, layer_idx: int, owns_kv: bool):
        super().__init__(cfg, model_cfg, layer_idx, owns_kv)
        shape = resolve(cfg, model_cfg)
        self.interval = shape.interval
        self.max_contexts = shape.max_contexts
        self.local_window = shape.local_window
        self.context_dim = shape.context_dim
        self.n_kv_heads = shape.n_kv_heads
        kv_width = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(self.n_embd, self.n_embd, bias=model_cfg.bias)
        self.kv_proj = nn.Linear(self.n_embd, 2 * kv_width, bias=model_cfg.bias)  # raw tokens
        # The ContextBlock (phase 1 of seed 001 trains only parameters named "context_block").
        self.context_block = nn.GRUCell(self.n_embd, self.context_dim, bias=True)
        self.context_norm = nn.LayerNorm(self.context_dim, bias=model_cfg.bias)
        self.slot_kv_proj = nn.Linear(self.context_dim, 2 * kv_width, bias=model_cfg.bias)  # slots
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=model_cfg.bias)
        self.record_contexts = False  # set by collect_contexts(): keep this forward's context vectors
        self.last_contexts: torch.Tensor | None = None

    # ---- configuration --------------------------------------------------------------------------
    @classmethod
    def validate(cls, cfg: AttentionConfig, model_cfg: ModelConfig) -> None:
        s = resolve(cfg, model_cfg)
        if s.interval < 1:
            raise ConfigError(f"interval={s.interval} must be >= 1 (tokens per context slot); try 32")
        if s.interval > model_cfg.block_size:
            raise ConfigError(
                f"interval={s.interval} exceeds block_size={model_cfg.block_size}, so no context slot would "
                "ever complete; use interval <= block_size"
            )
        if s.max_contexts < 1:
            raise ConfigError(f"max_contexts={s.max_contexts} must be >= 1 (completed slots a query sees)")
        if not 1 <= s.local_window <= s.interval:
            raise ConfigError(
                f"local_window={s.local_window} must be between 1 and interval={s.interval} (raw tokens "
                "of the current chunk); leave it unset to use interval"
            )
        if s.context_dim < 1:
            raise ConfigError(f"context_dim={s.context_dim} must be >= 1; try n_embd // 2")

    def reset_parameters(self) -> None:
        self.context_block.reset_parameters()  # PyTorch's GRU init (uniform +-1/sqrt(d)), not N(0, 0.02)
        self.context_norm.reset_parameters()

    # ---- sizes ----------------------------------------------------------------------------------
    def _ring_sizes(self, max_len: int) -> tuple[int, int, int]:
        """(n_slots, n_raw, n_state) for a cache of max_len tokens, each the min of its bounds.

        A query at t <= max_len - 1 sees at most (max_len - 1) // interval completed slots; the raw ring
        holds the earlier tokens of its window (its own token comes with the call), at most
        local_window - 1 and never more than max_len - 1; the recurrent state only matters if a slot can
        ever be read from the cache.
        """
        n_slots = min(self.max_contexts, (max_len - 1) // self.interval)
        n_raw = min(self.local_window - 1, max_len - 1)
        return n_slots, n_raw, self.context_dim if n_slots > 0 else 0

    def new_state(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        n_slots, n_raw, n_state = self._ring_sizes(max_len)
        raw_shape = (batch_size, self.n_kv_heads, n_raw, self.head_dim)
        return ContextState(
            slots=torch.zeros(batch_size, n_slots, self.context_dim, device=device, dtype=dtype),
            raw_k=torch.zeros(raw_shape, device=device, dtype=dtype),
            raw_v=torch.zeros(raw_shape, device=device, dtype=dtype),
            h=torch.zeros(batch_size, n_state, device=device, dtype=dtype),
        )

    def cache_bytes(self, batch_size: int, max_len: int, dtype: torch.dtype) -> int:
        n_slots, n_raw, n_state = self._ring_sizes(max_len)
        elements = n_slots * self.context_dim + 2 * n_raw * self.n_kv_heads * self.head_dim + n_state
        return batch_size * elements * dtype.itemsize

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> float:
        """One context vector per `interval` tokens (design.md); the bounded window adds nothing per token."""
        return self.context_dim * dtype.itemsize / self.interval

    @property
    def kv_heads(self) -> float:
        return float(self.n_kv_heads)

    # ---- the ContextBlock -----------------------------------------------------------------------
    def summarise(
        self, x: torch.Tensor, pos: int, h0: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the ContextBlock over x (positions pos..pos+T-1), continuing the chunk in progress from h0.

        Returns (contexts of the chunks completed in this call (B, n_done, d), recurrent state of the
        chunk still in progress (B, d), zeros when the call ends on a chunk boundary). The GRU runs as one
        fused recurrent op (`torch.gru`: cuDNN on a GPU, its input projections batched over every token)
        with the chunks as its batch, each restarting from zero; the chunk in progress at pos goes first,
        from h0. It is the same cell the cached path runs token by token.
        """
        B, T, C = x.shape
        d, interval, offset = self.context_dim, self.interval, pos % self.interval
        contexts, h_end, start = [], x.new_zeros(B, d), 0
        if offset:  # the chunk in progress: its remaining tokens, continued from h0
            start = min(T, interval - offset)
            h = h0.to(x.dtype) if h0 is not None else x.new_zeros(B, d)
            states = self._gru(x[:, :start], h)  # (B, start, d)
            if offset + start == interval:
                contexts.append(states[:, -1:])
            else:
                h_end = states[:, -1]
        rest = T - start
        if rest > 0:  # whole chunks from zero, the last one padded at its end (its later states unused)
            n_chunks, tail = -(-rest // interval), rest % interval
            xr = F.pad(x[:, start:], (0, 0, 0, n_chunks * interval - rest))  # (B, n_chunks * I, C)
            states = self._gru(xr.reshape(B * n_chunks, interval, C), x.new_zeros(B * n_chunks, d))
            states = states.view(B, n_chunks, interval, d)
            contexts.append(states[:, : rest // interval, -1])
            if tail:
                h_end = states[:, -1, tail - 1]
        return (torch.cat(contexts, dim=1) if contexts else x.new_zeros(B, 0, d)), h_end

    def _gru(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The ContextBlock over sequences x (N, L, C) from states h (N, d): every state, (N, L, d)."""
        cell = self.context_block
        weights = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
        # torch.gru(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        return torch.gru(x, h[None], weights, True, 1, 0.0, self.training, False, True)[0]

    # ---- attention ------------------------------------------------------------------------------
    def _mask(self, pos: int, T: int, slot_ids: torch.Tensor, raw_pos: torch.Tensor) -> torch.Tensor:
        """(T, n_slots + n_raw) True where query pos+t may read the slot / raw token."""
        t = torch.arange(pos, pos + T, device=raw_pos.device)[:, None]  # (T, 1)
        c = t // self.interval
        slot_ok = (slot_ids[None, :] < c) & (slot_ids[None, :] >= c - self.max_contexts)
        raw_ok = (raw_pos[None, :] // self.interval == c) & (raw_pos[None, :] <= t)
        raw_ok &= raw_pos[None, :] > t - self.local_window
        return torch.cat([slot_ok, raw_ok], dim=1)

    def forward(self, x: torch.Tensor, pos: int = 0, state=None, kv=None):
        """x: (B, T, C) at positions pos..pos+T-1; one code path for the full forward (state None, pos 0)
        and cached prefill/decode. Returns (y, None): Context-KV layers lend their KV to nobody."""
        if not self.owns_kv:
            raise RuntimeError(f"layer {self.layer_idx}: Context-KV layers cannot borrow KV")
        B, T, _ = x.shape
        interval, device, dtype = self.interval, x.device, x.dtype
        first_chunk = pos // interval  # chunk in progress at pos
        end_chunk = (pos + T) // interval  # chunks [first_chunk, end_chunk) complete in this call

        n_slots = n_raw = 0
        if state is not None:
            n_slots, n_raw = state.slots.shape[1], state.raw_k.shape[2]
        h0 = state.h if state is not None and state.h.shape[1] > 0 else None
        new_ctx, h_end = self.summarise(x, pos, h0)  # (B, end_chunk - first_chunk, d), (B, d)
        if self.record_contexts:
            self.last_contexts = new_ctx

        # Slots: held ones from the ring, then those completed now; ids are contiguous.
        old_first = max(0, first_chunk - n_slots)
        old_ids = torch.arange(old_first, first_chunk, device=device)
        old_ctx = state.slots[:, old_ids % n_slots].to(dtype) if len(old_ids) else new_ctx[:, :0]
        ctx = torch.cat([old_ctx, new_ctx], dim=1)  # (B, S, d)
        slot_k, slot_v = (
            self.slot_kv_proj(self.context_norm(ctx))
            .view(B, -1, 2, self.n_kv_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)  # (2, B, H_kv, S, D)
        )
        if self.rotary is not None:  # a slot sits at the last position of its chunk
            slot_k = self.rotary.at(
                slot_k,
                (torch.arange(old_first, end_chunk, device=device) + 1) * interval - 1,
                end=end_chunk * interval,
            )
        # Raw tokens: the held part of the current chunk's window, then the new tokens.
        k_new, v_new = self.kv_proj(x).view(B, T, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            k_new = self.rotary(k_new, pos)  # cached post-RoPE
        raw_first = max(first_chunk * interval, pos - self.local_window + 1, pos - n_raw)
        held = torch.arange(raw_first, pos, device=device) % max(n_raw, 1)
        raw_k = torch.cat([state.raw_k[:, :, held].to(dtype), k_new], dim=2) if len(held) else k_new
        raw_v = torch.cat([state.raw_v[:, :, held].to(dtype), v_new], dim=2) if len(held) else v_new

        slot_ids = torch.arange(old_first, end_chunk, device=device)
        mask = self._mask(pos, T, slot_ids, torch.arange(raw_first, pos + T, device=device))
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if self.rotary is not None:
            q = self.rotary(q, pos)
        y = F.scaled_dot_product_attention(
            q,
            torch.cat([slot_k, raw_k], dim=2),  # (B, H_kv, S + R, D)
            torch.cat([slot_v, raw_v], dim=2),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_head,
        )  # (B, H, T, D)
        y = self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_embd))

        if state is not None:
            self._update(state, pos, T, new_ctx, k_new, v_new, h_end)
        return y, None

    def decode(
        self, x: torch.Tensor, at: StepPosition, state, linear: Linears = PLAIN_LINEARS
    ) -> torch.Tensor:
        """One token per sequence, x (B, C) at `at`: forward's cached path for T = 1 without its mask
        (`context_decode.gathered_step`). A compiled or static step runs `context_decode.static_step`,
        whose shapes and control flow do not depend on the position."""
        if at.static or torch.compiler.is_compiling():
            return static_step(self, x, at.tensor(x.device), state, linear, end=at.end)
        return gathered_step(self, x, at.pos, state, linear)

    def _gate(self, which: str) -> _GRUWeights:
        """The ContextBlock's input ("ih") or hidden ("hh") weights as a layer that `Linears` can hold."""
        key = f"_gru_{which}"
        held = self.__dict__.get(key)
        if held is None:
            held = self.__dict__[key] = _GRUWeights(self.context_block, which)
        return held

    @torch.no_grad()
    def _update(self, state: ContextState, pos: int, T: int, new_ctx, k_new, v_new, h_end) -> None:
        """Keep what later queries need: the last slots, the window before pos+T, the recurrent state."""
        interval, end = self.interval, pos + T
        n_slots, n_raw = state.slots.shape[1], state.raw_k.shape[2]
        first_chunk, end_chunk = pos // interval, end // interval
        if n_slots:
            ids = torch.arange(max(first_chunk, end_chunk - n_slots), end_chunk, device=new_ctx.device)
            state.slots[:, ids % n_slots] = new_ctx[:, ids - first_chunk].to(state.slots.dtype)
        if n_raw:
            keep = torch.arange(max(end_chunk * interval, end - n_raw, pos), end, device=k_new.device)
            state.raw_k[:, :, keep % n_raw] = k_new[:, :, keep - pos].to(state.raw_k.dtype)
            state.raw_v[:, :, keep % n_raw] = v_new[:, :, keep - pos].to(state.raw_v.dtype)
        if state.h.shape[1]:
            state.h.copy_(h_end)


class _GRUWeights:
    """A GRUCell's weight_ih/bias_ih (or _hh) seen as one layer (`.weight`, `.bias`), read at call time."""

    def __init__(self, cell: nn.GRUCell, which: str):
        self.cell, self.which = cell, which

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.cell, f"weight_{self.which}")

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.cell, f"bias_{self.which}")


def context_layers(model: nn.Module) -> list[ContextAttention]:
    return [m for m in model.modules() if isinstance(m, ContextAttention)]


def collect_contexts(model: nn.Module, idx: torch.Tensor) -> list[torch.Tensor]:
    """Run model(idx) and return each Context-KV layer's context vectors (B, T // interval, context_dim),
    with gradients, for the OACD loss of seed 001's phase 1 (`kvlab.losses.oacd_loss`)."""
    layers = context_layers(model)
    if not layers:
        raise KvlabError(
            "the model has no Context-KV layer; use attention kind='context' (e.g. 'context-32')"
        )
    for layer in layers:
        layer.record_contexts = True
    try:
        model(idx)
        contexts = [layer.last_contexts for layer in layers]
    finally:
        for layer in layers:
            layer.record_contexts, layer.last_contexts = False, None
    if any(c.shape[1] == 0 for c in contexts):
        raise KvlabError(
            f"input of {idx.shape[1]} tokens completes no context slot (interval "
            f"{max(layer.interval for layer in layers)}); pass sequences at least one interval long"
        )
    return contexts


def context_block_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters seed 001's phase 1 trains (and phase 2 freezes): every `context_block`."""
    return [p for name, p in model.named_parameters() if ".context_block." in name]


@register_preset(r"context-(\d+)", "context-<I>")
def _context(shape: ModelShape, interval: int) -> AttentionConfig:
    return AttentionConfig(kind="context", interval=interval)
