"""Context-KV's one-token decode steps (kvlab.decode's fast path), as functions of the layer.

`gathered_step` gathers exactly the ring entries a query reads (eager decoding); `static_step` attends
over whole rings with a mask computed from pos, so its shapes and branches do not depend on pos (the
compiled step). Both equal ContextAttention.forward's cached path for one token (tests/test_context.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlab.attention.base import Linears, decode_attention


def gathered_step(layer, x: torch.Tensor, pos: int, state, linear: Linears) -> torch.Tensor:
    """One token per sequence, x (B, C) at `pos`: forward's cached path for T = 1, without its mask.

    A query in chunk c reads the completed slots [c - n_slots, c) and the raw tokens of its own chunk
    inside the window, exactly what the ring holds, so every gathered key is valid; a slot the token
    completes is stored for later queries but not read now (slot ids must be < c). With no slot ring
    (a cache too short for a slot ever to complete) the ContextBlock does not run at all. The gathers'
    sizes and the branches depend on pos, so a compiled step runs `static_step` instead.
    """
    B = x.shape[0]
    interval, H_kv, D = layer.interval, layer.n_kv_heads, layer.head_dim
    n_slots, n_raw = state.slots.shape[1], state.raw_k.shape[2]
    chunk, offset = divmod(pos, interval)
    dtype = x.dtype
    keys, values = [], []
    old_first = max(0, chunk - n_slots)
    if chunk > old_first:  # the held slots, each at the last position of its chunk
        ids = torch.arange(old_first, chunk, device=x.device)
        ctx = state.slots[:, ids % n_slots].to(dtype)  # (B, n_old, d)
        slot_kv = linear(layer.slot_kv_proj, layer.context_norm(ctx)).view(B, -1, 2, H_kv, D)
        slot_k, slot_v = slot_kv.permute(2, 0, 3, 1, 4)  # (B, H_kv, n_old, D) each
        if layer.rotary is not None:
            slot_k = layer.rotary.at(slot_k, (ids + 1) * interval - 1, end=chunk * interval)
        keys.append(slot_k)
        values.append(slot_v)
    raw_first = max(chunk * interval, pos - layer.local_window + 1, pos - n_raw)
    if pos > raw_first:  # the window's earlier tokens, from the raw ring
        held = torch.arange(raw_first, pos, device=x.device) % n_raw
        keys.append(state.raw_k[:, :, held].to(dtype))
        values.append(state.raw_v[:, :, held].to(dtype))
    kv = linear(layer.kv_proj, x).view(B, 2, H_kv, 1, D)  # (B, 2, H_kv, 1, D)
    k_new = kv[:, 0] if layer.rotary is None else layer.rotary(kv[:, 0], pos)  # post-RoPE
    v_new = kv[:, 1]
    keys.append(k_new)
    values.append(v_new)
    q = linear(layer.q_proj, x).view(B, layer.n_head, 1, D)  # (B, H, 1, D)
    if layer.rotary is not None:
        q = layer.rotary(q, pos)
    k = torch.cat(keys, dim=2) if len(keys) > 1 else k_new  # (B, H_kv, S, D)
    v = torch.cat(values, dim=2) if len(values) > 1 else v_new
    y = decode_attention(q.view(B, H_kv, -1, D), k, v)  # (B, H_kv, G, D)
    y = linear(layer.c_proj, y.reshape(B, layer.n_embd))

    # Keep what later queries need (as _update): the slot this token completes, its raw K/V (unless
    # it closes the chunk), the recurrent state of the chunk in progress.
    if n_slots:
        h0 = state.h.to(dtype) if offset else x.new_zeros(B, layer.context_dim)
        cell = layer.context_block
        h = torch.gru_cell(
            x, h0, linear.weight(layer._gate("ih")), linear.weight(layer._gate("hh")), cell.bias_ih,
            cell.bias_hh,
        )  # fmt: skip
        if offset == interval - 1:
            state.slots[:, chunk % n_slots] = h.to(state.slots.dtype)
            state.h.zero_()
        else:
            state.h.copy_(h)
    if n_raw and offset < interval - 1:
        state.raw_k[:, :, pos % n_raw] = k_new[:, :, 0].to(state.raw_k.dtype)
        state.raw_v[:, :, pos % n_raw] = v_new[:, :, 0].to(state.raw_v.dtype)
    return y


def static_step(layer, x: torch.Tensor, t: torch.Tensor, state, linear: Linears, end: int) -> torch.Tensor:
    """`gathered_step` with shapes and control flow that do not depend on the position, t (1,) int64
    (positions below `end` index the RoPE tables), for a compiled or static step.

    It attends over the whole slot ring, the whole raw ring and the new token, with a mask of the
    entries the query may read, computed from pos as a tensor: ring entry j holds the latest chunk
    (slots) or position (raw tokens) below the query's that is congruent to j. The writes are
    `torch.where`s through `index_copy_` at ring indices computed from pos. Every Python branch is on
    the ring sizes, so a step compiled with dynamic shapes is one graph for every position. Eager
    decoding keeps `gathered_step`, which reads only the valid entries and runs fewer ops (this one is
    15-25% slower uncompiled at cpu-tiny).
    """
    B = x.shape[0]
    interval, H_kv, D = layer.interval, layer.n_kv_heads, layer.head_dim
    n_slots, n_raw = state.slots.shape[1], state.raw_k.shape[2]
    dtype, device = x.dtype, x.device
    chunk_t, offset_t = t // interval, t % interval
    kv = linear(layer.kv_proj, x).view(B, 2, H_kv, 1, D)  # (B, 2, H_kv, 1, D)
    k_new = kv[:, 0] if layer.rotary is None else layer.rotary.at(kv[:, 0], t, end=end)  # post-RoPE
    v_new = kv[:, 1]
    keys, values, masks = [], [], []
    if n_slots:  # ring entry j: chunk id chunk - 1 - ((chunk - 1 - j) mod n_slots), valid if >= 0
        ids = chunk_t - 1 - (chunk_t - 1 - torch.arange(n_slots, device=device)) % n_slots
        ctx = state.slots.to(dtype)  # (B, n_slots, d)
        slot_kv = linear(layer.slot_kv_proj, layer.context_norm(ctx)).view(B, n_slots, 2, H_kv, D)
        slot_k, slot_v = slot_kv.permute(2, 0, 3, 1, 4)  # (B, H_kv, n_slots, D) each
        if layer.rotary is not None:  # at the last position of its chunk (< pos for a valid slot)
            slot_k = layer.rotary.at(slot_k, ((ids + 1) * interval - 1).clamp(min=0), end=end)
        keys.append(slot_k)
        values.append(slot_v)
        masks.append(ids >= 0)
    if n_raw:  # ring entry i: position pos - 1 - ((pos - 1 - i) mod n_raw), valid inside the window
        raw_pos = t - 1 - (t - 1 - torch.arange(n_raw, device=device)) % n_raw
        ok = (raw_pos >= chunk_t * interval) & (raw_pos > t - layer.local_window) & (raw_pos >= 0)
        keys.append(state.raw_k.to(dtype))
        values.append(state.raw_v.to(dtype))
        masks.append(ok)
    keys.append(k_new)
    values.append(v_new)
    masks.append(torch.ones(1, dtype=torch.bool, device=device))
    q = linear(layer.q_proj, x).view(B, layer.n_head, 1, D)  # (B, H, 1, D)
    if layer.rotary is not None:
        q = layer.rotary.at(q, t, end=end)
    y = F.scaled_dot_product_attention(
        q.view(B, H_kv, -1, D),
        torch.cat(keys, dim=2),
        torch.cat(values, dim=2),
        attn_mask=torch.cat(masks)[None],
    )  # (B, H_kv, G, D)
    y = linear(layer.c_proj, y.reshape(B, layer.n_embd))

    closes = offset_t == interval - 1  # (1,): this token completes its chunk's slot
    if n_slots:
        h0 = torch.where(offset_t != 0, state.h.to(dtype), 0.0)  # a new chunk restarts the recurrence
        cell = layer.context_block
        h = torch.gru_cell(
            x, h0, linear.weight(layer._gate("ih")), linear.weight(layer._gate("hh")), cell.bias_ih,
            cell.bias_hh,
        )  # fmt: skip
        # Ring indices as tensors: a view at a symbolic offset makes inductor guard on offset > 0
        slot = chunk_t % n_slots
        held = state.slots.index_select(1, slot)  # (B, 1, d)
        state.slots.index_copy_(1, slot, torch.where(closes, h.to(held.dtype)[:, None], held))
        state.h.copy_(torch.where(closes, 0.0, h.to(state.h.dtype)))
    if n_raw:  # its raw K/V, unless it closes the chunk
        entry = t % n_raw
        for ring, new in ((state.raw_k, k_new), (state.raw_v, v_new)):
            held = ring.index_select(2, entry)  # (B, H_kv, 1, D)
            ring.index_copy_(2, entry, torch.where(closes, held, new.to(ring.dtype)))
    return y
