"""The decode fast path: one token per sequence per step over a KVCache, for `kvlab.generate`.

`Decoder.step` computes what `GPT.forward(token, cache=cache)` computes for one token in eval mode, with
less work per token: the input checks run once per generation (`check`), not per token (the tokens come
from sampling), the residual stream stays (B, C), linears are plain mm/addmm calls, and each KV
structure's lean `decode` (kvlab.attention) does the attention. A batch-1 step is a chain of GEMVs plus
one read of the cache, so the weights are read in the layout that streams fastest: on CPU in float32,
every Linear whose output is wider than its input (the LM head, the MLP up-projection, K/V projections)
from an (in, out) contiguous copy, which MKL's GEMV reads 1.3-2.2x faster than the (out, in) parameter
with its short rows (benchmarks/README.md, "What changed"). The copies live as long as the Decoder, about
the size of those weights again; build a new Decoder after changing the weights. Making them costs about
as much as 14-18 steps save (a transposing copy runs at ~1 GB/s), so `generate` skips them for short
generations (kvlab.generate.RELAYOUT_MIN_STEPS). The invariant tests
check Decoder.step == GPT.forward for every structure and family.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext

import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from kvlab.attention.base import Linears, StaticDecodeError, StaticPosition, StepPosition
from kvlab.attention.rope import rotaries
from kvlab.cache import CacheError, KVCache
from kvlab.model import _CACHED_SDPA_BACKENDS, GPT


class DecodeLinears(Linears):
    """Linears that read W^T (in, out) from a table built on first use: a contiguous copy when the output is
    wider than the input and `relayout` is set, else a view of the parameter."""

    def __init__(self, relayout: bool):
        self.relayout = relayout
        self.table: dict[object, tuple[torch.Tensor, torch.Tensor | None]] = {}  # layer -> (W^T, bias)

    def _held(self, layer, relayout: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        held = self.table.get(layer)
        if held is None:
            w = layer.weight.detach()
            copy = relayout and self.relayout and w.shape[0] > w.shape[1]
            held = self.table[layer] = (w.t().contiguous() if copy else w.t(), layer.bias)
        return held

    def hold_all(self, model: nn.Module) -> None:
        """Put every Linear of model in the table, as a view of its weight where the steps so far have not
        used it (no copy: MLA's kv_b, for one, is read only through views of its weight). A compiled step
        guards on the table, so a Linear first used inside it would recompile the step."""
        for module in model.modules():
            if isinstance(module, nn.Linear):
                self._held(module, relayout=False)

    def weight(self, layer) -> torch.Tensor:
        return self._held(layer)[0].t()  # (out, in), strided as the copy

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        w_t, bias = self._held(layer)
        if x.dim() != 2:  # e.g. Context-KV's slots (B, n, d)
            return F.linear(x, w_t.t(), bias)
        return torch.mm(x, w_t) if bias is None else torch.addmm(bias, x, w_t)


class Decoder:
    """`step(token, cache)` for a kvlab GPT; any other model with GPT's cache interface (the harness's
    SeedGPT) is stepped through its own forward."""

    def __init__(
        self, model: nn.Module, relayout: bool | None = None, compile: bool = False, static: bool = False
    ):
        """`compile`: torch.compile the one-token step (dynamic shapes: one graph for every position).
        `static`: each step reads the whole preallocated cache with a mask and writes through index_copy_,
        the position a device tensor (`StaticPosition`), so the step's shapes never change; compiled, it is
        captured as CUDA graphs on a GPU (mode "reduce-overhead", gpt-fast's static cache). A static step
        reads max_len positions whatever the context, so it pays off where launches, not bytes, bound
        the step (small models on GPUs)."""
        self.model = model
        self.fast = isinstance(model, GPT)
        self.static = static
        if not self.fast:
            if static:
                raise StaticDecodeError(
                    "static decoding needs a kvlab GPT (this model steps its own forward)"
                )
            return
        weight = model.wte.weight
        cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
        # Measured on CPU float32 (MKL GEMV); GPUs and other dtypes read the parameters as they are.
        self.relayout = cpu_fp32 if relayout is None else relayout
        # F.gelu on a float32 CPU tensor runs oneDNN's eltwise primitive, about 9 us of setup per call
        # whatever the size: the step turns oneDNN off (ATen's own vectorised kernel takes 2-3 us).
        self._no_onednn = cpu_fp32 and torch.backends.mkldnn.is_available()
        self.linear = DecodeLinears(self.relayout)
        self._structure = model._structure_key()
        # The first step runs eagerly (it fills the weight table, which compiled code then reads as fixed).
        self._step = self._forward
        self._cuda = weight.device.type == "cuda"
        self._graphs = compile and static and self._cuda
        self._compiled = None
        if compile and static:
            mode = "reduce-overhead" if self._graphs else None
            self._compiled = torch.compile(self._forward, dynamic=False, fullgraph=True, mode=mode)
        elif compile:
            self._compiled = torch.compile(self._forward, dynamic=True)
        self._pos = torch.zeros(1, dtype=torch.long, device=weight.device)  # a static step's position
        # RoPE tables, grown to a cache's max_len before compiled steps use it (`_reserve_rope`)
        self._rotaries = rotaries(model)
        self._rope_len = 0
        self._static_caches: weakref.WeakSet[KVCache] = weakref.WeakSet()  # caches marked for CUDA graphs

    def check(self, cache: KVCache, batch_size: int) -> None:
        """Once per generation: the cache belongs to this model and has room (step() checks only room)."""
        if self.fast:
            cache.check_model(self._structure, self.model.wte.weight.device)
        cache.check_append(batch_size, 1)

    def step(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """token (B, 1) -> logits (B, V) of the next position; appends the token to the cache."""
        if cache.pos >= cache.max_len:
            raise CacheError(f"the cache is full ({cache.max_len} tokens); create it with a larger max_len")
        model = self.model
        if not self.fast or model.training:  # training: dropout is live, only the forward applies it
            return model(token, cache=cache)[:, -1]
        if self._no_onednn:
            onednn = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
        if self._step is self._compiled and cache.max_len > self._rope_len:
            self._reserve_rope(cache.max_len)
        pos: int | torch.Tensor = cache.pos
        if self.static:
            pos = self._pos.fill_(cache.pos)
        graphed = self._graphs and self._step is self._compiled
        if graphed and cache not in self._static_caches:
            self.mark_static(cache)
        # On CUDA the step keeps GPT.forward's SDPA backends: cuDNN's would build a plan per key length.
        backends = sdpa_kernel(_CACHED_SDPA_BACKENDS) if self._cuda else nullcontext()
        try:
            if graphed:
                torch.compiler.cudagraph_mark_step_begin()
            with backends:
                logits = self._step(token.view(-1), cache.states, pos, cache.max_len)
        finally:
            if self._no_onednn:
                torch._C._set_mkldnn_enabled(onednn)
        if graphed:
            logits = logits.clone()  # a CUDA graph's output is overwritten by its next replay
        if self._compiled is not None and self._step is not self._compiled:
            self._reserve_rope(cache.max_len)  # the eager step has built the tables in the step's dtypes
            self.linear.hold_all(model)  # also the Linears it skipped (Context-KV's block before a slot)
            self._step = self._compiled
        cache.advance(1)
        return logits

    def _reserve_rope(self, max_len: int) -> None:
        """Grow every RoPE table to max_len positions, outside the compiled step: a table that grew inside
        it would recompile the step at each doubling of the position (64, 128, ...) and soon reach dynamo's
        recompile limit, after which the step silently runs eagerly."""
        for rotary in self._rotaries:
            rotary.reserve(max_len)
        self._rope_len = max(self._rope_len, max_len)

    def mark_static(self, cache: KVCache) -> None:
        """Mark every tensor a step reads in place as a static address, so CUDA graphs read it where it is
        instead of copying it into the graph's own input buffers at every replay: the cache's tensors
        (written in place every step), the step's position, the weight table's views and the plain tensor
        attributes modules keep (RoPE tables, Matryoshka's cached bases and masks). Parameters are
        static already. Called before the first graphed step with a cache (after the eager first step
        has filled the weight table and the RoPE tables)."""
        tensors = [self._pos]
        for state in cache.states:
            if state is not None:
                tensors += _tensors_in(getattr(state, "tensors", None) or vars(state))
        for w_t, bias in self.linear.table.values():
            tensors += [w_t, bias]
        for module in self.model.modules():
            attrs = {
                k: v for k, v in vars(module).items() if k not in ("_parameters", "_buffers", "_modules")
            }
            tensors += _tensors_in(attrs)
        for t in tensors:
            if isinstance(t, torch.Tensor):
                # unguarded: a new cache's addresses re-record the graphs instead of recompiling the step
                torch._dynamo.mark_static_address(t, guard=False)
        self._static_caches.add(cache)

    def _forward(
        self, token: torch.Tensor, states: list, pos: int | torch.Tensor, max_len: int
    ) -> torch.Tensor:
        """token (B,) at position pos (an int, or a (1,) tensor for a static step) -> logits (B, V)."""
        model, linear = self.model, self.linear
        at = StaticPosition(pos, max_len) if isinstance(pos, torch.Tensor) else StepPosition(pos)
        x = model.wte.weight[token]  # (B, C)
        if model.wpe is not None:
            x = x + model.wpe.weight[pos]  # (C,), or (1, C) at a tensor position
        owners = model.owners
        for i, block in enumerate(model.blocks):
            a = block.attn.decode(block.ln_1(x), at, states[owners[i]], linear)  # (B, C)
            if block.parallel_residual:  # GPT-NeoX: attention and MLP both read x
                x = x + a + self._mlp(block.mlp, block.ln_2(x))
            else:
                x = x + a
                x = x + self._mlp(block.mlp, block.ln_2(x))
        return linear(model.lm_head, model.ln_f(x))  # (B, V)

    def _mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        linear = self.linear
        h = linear(mlp.c_fc, x)
        h = mlp.act(linear(mlp.c_gate, x)) * h if mlp.c_gate is not None else mlp.act(h)
        return linear(mlp.c_proj, h)


def _tensors_in(value, depth: int = 4) -> list[torch.Tensor]:
    """The tensors inside value: itself, or inside its tuples, lists, dicts and plain objects' attributes
    (e.g. a Rotary's tables), `depth` levels down; never into modules (model.modules() visits those)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth == 0 or isinstance(value, (nn.Module, type, str, bytes, int, float, bool, type(None))):
        return []
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (tuple, list, set, frozenset)):
        items = list(value)
    elif hasattr(value, "__dict__"):
        items = list(vars(value).values())
    else:
        return []
    return [t for item in items for t in _tensors_in(item, depth - 1)]
