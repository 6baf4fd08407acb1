"""Context-KV attention (seed 001 with chunk-aligned slots) and the OACD loss.

Checked by values: the layer against a naive per-query reference of the definition, cached decoding
across many chunks against the full forward, exact cache bytes, bounded cache growth, eviction of old
chunks, the OACD loss against a hand computation, and one-line config errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvlab import GPT, AttentionConfig, ConfigError, ModelConfig
from kvlab.attention.context import ContextAttention, collect_contexts, context_block_parameters
from kvlab.decode import Decoder
from kvlab.errors import KvlabError
from kvlab.generate import generate
from kvlab.losses import oacd_loss, oacd_term

from conftest import FAMILIES, tiny_config

MANY_CHUNKS = AttentionConfig(kind="context", interval=4, max_contexts=3)


def _reference_layer(layer: ContextAttention, x: torch.Tensor) -> torch.Tensor:
    """The definition, one query at a time: slot j = GRU over chunk j from zero; query t (chunk c) reads
    slots [c - max_contexts, c) and raw tokens t' of chunk c with t - local_window < t' <= t."""
    B, T, C = x.shape
    interval, hd, n_kv = layer.interval, layer.head_dim, layer.n_kv_heads
    contexts = []
    for j in range(T // interval):
        h = x.new_zeros(B, layer.context_dim)
        for t in range(j * interval, (j + 1) * interval):
            h = layer.context_block(x[:, t], h)
        contexts.append(h)
    q = layer.q_proj(x).view(B, T, layer.n_head, hd)
    raw_k, raw_v = layer.kv_proj(x).view(B, T, 2, n_kv, hd).unbind(2)  # (B, T, H_kv, D)
    out = []
    for t in range(T):
        c = t // interval
        ks, vs = [], []
        for j in range(max(0, c - layer.max_contexts), c):
            sk, sv = layer.slot_kv_proj(layer.context_norm(contexts[j])).view(B, 2, n_kv, hd).unbind(1)
            ks.append(sk)
            vs.append(sv)
        for s in range(max(c * interval, t - layer.local_window + 1), t + 1):
            ks.append(raw_k[:, s])
            vs.append(raw_v[:, s])
        k = torch.stack(ks, dim=2).repeat_interleave(layer.n_head // n_kv, dim=1)  # (B, H, S, D)
        v = torch.stack(vs, dim=2).repeat_interleave(layer.n_head // n_kv, dim=1)
        att = torch.softmax(q[:, t, :, None, :] @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)  # (B, H, 1, S)
        out.append((att @ v).reshape(B, C))
    return layer.c_proj(torch.stack(out, dim=1))


@torch.no_grad()
@pytest.mark.parametrize(
    "att",
    [
        AttentionConfig(kind="context", interval=3, max_contexts=2, local_window=2, n_kv_heads=2),
        AttentionConfig(kind="context", interval=4, max_contexts=3, context_dim=8, n_kv_heads=1),
    ],
)
def test_layer_matches_reference_definition(att):
    layer = GPT(tiny_config(att)).blocks[0].attn
    x = torch.randn(2, 17, 32)
    y, payload = layer(x)
    assert payload is None
    torch.testing.assert_close(y, _reference_layer(layer, x), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
@pytest.mark.parametrize("t0", [1, 6, 8, 13, 39])  # mid-chunk and chunk-aligned prefills
def test_cached_decode_over_many_chunks_matches_full_forward(t0):
    model = GPT(tiny_config(MANY_CHUNKS)).eval()
    idx = torch.randint(0, 97, (2, 40))
    full = model(idx)
    cache = model.new_cache(batch_size=2, max_len=40, dtype=torch.float32)
    steps = [model(idx[:, :t0], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(t0, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    # 10 chunks went through a 3-slot ring: the cache really held only the bounded state.
    assert cache.nbytes() == model.kv_cache_bytes(batch_size=2, max_len=40, dtype=torch.float32)


@torch.inference_mode()
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "att",
    [MANY_CHUNKS, AttentionConfig(kind="context", interval=5, max_contexts=2, local_window=3, n_kv_heads=2)],
)
def test_static_decode_step_matches_full_forward_and_eager_state(att, family):
    """`static_step` (what compiled and static steps run: whole rings, a mask from the position, where-writes)
    gives the full forward's logits across many chunks and ring evictions, and leaves the cache holding
    what the eager step leaves in every entry a later query can read."""
    fam = FAMILIES[family]
    model = GPT(tiny_config(att, **fam)).eval()
    idx = torch.randint(0, 97, (2, 41))
    full = model(idx)
    outs, states = [], []
    for static in (False, True):
        cache = model.new_cache(batch_size=2, max_len=41, dtype=torch.float32)
        decoder = Decoder(model, static=static)
        steps = [model(idx[:, :3], cache=cache)]
        steps += [decoder.step(idx[:, t : t + 1], cache)[:, None] for t in range(3, 41)]
        outs.append(torch.cat(steps, dim=1))
        states.append(cache.states[0])
    for out in outs:
        torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
    eager, static = states
    torch.testing.assert_close(static.slots, eager.slots, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(static.h, eager.h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(static.raw_k, eager.raw_k, rtol=1e-5, atol=1e-6)


@torch.inference_mode()
def test_chunked_appends_and_greedy_tokens_match():
    model = GPT(
        tiny_config(AttentionConfig(kind="context", interval=5, max_contexts=2, local_window=3))
    ).eval()
    idx = torch.randint(0, 97, (1, 45))
    cache = model.new_cache(batch_size=1, max_len=45, dtype=torch.float32)
    parts = [model(idx[:, a:b], cache=cache) for a, b in ((0, 7), (7, 9), (9, 23), (23, 24), (24, 45))]
    torch.testing.assert_close(torch.cat(parts, dim=1), model(idx), rtol=1e-5, atol=1e-5)

    prompt = idx[:, :6]
    cached = generate(model, prompt, max_new_tokens=25).tokens
    ref = prompt
    for _ in range(25):
        ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ref)


@torch.inference_mode()
def test_old_chunks_are_forgotten():
    """One layer, interval 4, 3 slots: a token's influence ends once its chunk leaves the window."""
    model = GPT(tiny_config(MANY_CHUNKS, n_layer=1)).eval()
    idx = torch.randint(0, 97, (1, 32))
    changed = idx.clone()
    changed[0, 1] = (idx[0, 1] + 1) % 97  # chunk 0
    diff = (model(idx) - model(changed)).abs().amax(dim=-1)[0]  # (T,)
    assert (diff[1:16] > 1e-4).all()  # chunk 0 itself, then as slot 0 for chunks 1..3
    assert (diff[16:] == 0).all()  # chunk 4 reads slots 1..3 only


def test_cache_bytes_exact_and_bounded():
    model = GPT(tiny_config(AttentionConfig(kind="context", interval=4, max_contexts=3, local_window=3)))
    layer = model.blocks[0].attn  # head_dim 8, n_kv_heads 4, context_dim 16
    for max_len in (1, 2, 4, 5, 9, 13, 40, 64):
        for dtype in (torch.float32, torch.bfloat16):
            cache = model.new_cache(batch_size=2, max_len=max_len, dtype=dtype)
            assert cache.nbytes() == model.kv_cache_bytes(batch_size=2, max_len=max_len, dtype=dtype)
    # By hand, 64 tokens, bf16, batch 2: 3 slots x 16 + raw 2 tokens x K,V x 4 heads x 8 + state 16.
    assert layer.cache_bytes(2, 64, torch.bfloat16) == 2 * (3 * 16 + 2 * 2 * 4 * 8 + 16) * 2
    # 5 tokens: one slot can complete before the last query; 4 tokens: none, so no slot and no state.
    assert layer.cache_bytes(1, 5, torch.float32) == (1 * 16 + 2 * 2 * 32 + 16) * 4
    assert layer.cache_bytes(1, 4, torch.float32) == (2 * 2 * 32) * 4
    assert model.kv_cache_bytes(1, 64) == model.kv_cache_bytes(1, 13)  # saturated: no growth
    assert layer.kv_bytes_per_token(torch.bfloat16) == 16 * 2 / 4
    assert layer.kv_heads == 4


def _meta_gpt(attention) -> GPT:
    with torch.device("meta"):  # structure only: GPT-2 124M without allocating its weights
        return GPT(ModelConfig.preset("gpt2-124m", attention=attention))


def test_gpt2_124m_context32_footprint():
    ctx, mha = _meta_gpt("context-32"), _meta_gpt("mha")
    metrics = ctx.kv_metrics()
    assert metrics["kv_bytes_per_token"] == 384 * 2 / 32  # context_dim = n_embd // 2, one slot per 32
    assert metrics["kv_bytes_per_token"] <= 192  # issue 3: at most a sixteenth of MHA's 3072
    assert metrics["head_sharing_ratio"] == 1.0
    growth = ctx.kv_cache_bytes(1, 512, torch.bfloat16) - ctx.kv_cache_bytes(1, 256, torch.bfloat16)
    mha_growth = mha.kv_cache_bytes(1, 512, torch.bfloat16) - mha.kv_cache_bytes(1, 256, torch.bfloat16)
    assert 0 < growth <= mha_growth / 32
    assert ctx.kv_cache_bytes(1, 1024, torch.bfloat16) < mha.kv_cache_bytes(1, 1024, torch.bfloat16) / 16


@torch.inference_mode()
def test_layer0_context_with_gqa_elsewhere():
    ctx0 = AttentionConfig(kind="context", interval=4, max_contexts=2, context_dim=12)
    att = AttentionConfig(kind="gqa", n_kv_heads=2, layers={0: ctx0})
    model = GPT(tiny_config(att)).eval()
    assert [type(b.attn).__name__ for b in model.blocks] == ["ContextAttention"] + ["GroupedAttention"] * 3
    idx = torch.randint(0, 97, (2, 30))
    cache = model.new_cache(batch_size=2, max_len=30, dtype=torch.float32)
    steps = [model(idx[:, :10], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(10, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), model(idx), rtol=1e-5, atol=1e-5)
    gqa_layer = 2 * 2 * 30 * 2 * 8  # batch x (K, V) x tokens x heads x head_dim
    ctx_layer = 2 * (2 * 12 + 2 * 3 * 4 * 8 + 12)
    assert cache.nbytes() == 4 * (3 * gqa_layer + ctx_layer)
    per_token = [12 * 2 / 4] + [2 * 2 * 8 * 2] * 3
    assert model.kv_metrics()["kv_bytes_per_token"] == sum(per_token) / 4


def test_oacd_loss_matches_hand_computation():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0]])
    # mean (2, 1); X - mean = [[-1, -1], [1, -1], [0, 2]] -> Frobenius sqrt(8); ||mean||^2 = 5.
    expected = -math.sqrt(8) / 3 + 0.1 * 5
    torch.testing.assert_close(oacd_loss(x), torch.tensor(expected))
    torch.testing.assert_close(
        oacd_loss(x.view(1, 3, 2), centroid_weight=0.0), torch.tensor(-math.sqrt(8) / 3)
    )
    with pytest.raises(KvlabError, match="no context vectors"):
        oacd_loss(torch.empty(0, 4))


def test_collect_contexts_feeds_phase1_training():
    model = GPT(tiny_config(AttentionConfig(kind="gqa", layers={0: MANY_CHUNKS, 2: MANY_CHUNKS})))
    idx = torch.randint(0, 97, (2, 14))
    contexts = collect_contexts(model, idx)
    assert [tuple(c.shape) for c in contexts] == [(2, 3, 16), (2, 3, 16)]  # 14 // 4 slots each
    # Layer 0's contexts are the GRU over ln_1(embeddings) of each chunk, from a zero state.
    with torch.no_grad():
        x = model.blocks[0].ln_1(model.wte(idx) + model.wpe(torch.arange(14)))
        h = torch.zeros(2, 16)
        for t in range(4, 8):
            h = model.blocks[0].attn.context_block(x[:, t], h)
    torch.testing.assert_close(contexts[0][:, 1], h)
    assert all(layer.last_contexts is None for layer in (model.blocks[0].attn, model.blocks[2].attn))

    params = context_block_parameters(model)
    assert len(params) == 8  # GRUCell: weight_ih, weight_hh, bias_ih, bias_hh in 2 layers
    loss, logged = oacd_term(model, idx, None, None)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    # Nothing after the last ContextBlock gets a gradient (phase 1 freezes the rest by name anyway).
    assert model.blocks[2].attn.q_proj.weight.grad is None and model.blocks[3].mlp.c_fc.weight.grad is None
    torch.testing.assert_close(logged["oacd"], (oacd_loss(contexts[0]) + oacd_loss(contexts[1])).detach() / 2)


def test_collect_contexts_errors():
    with pytest.raises(KvlabError, match="no Context-KV layer"):
        collect_contexts(GPT(tiny_config("mha")), torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(KvlabError, match="completes no context slot"):
        collect_contexts(GPT(tiny_config(MANY_CHUNKS)), torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize(
    "att, match",
    [
        (AttentionConfig(kind="context", interval=0), "interval=0 must be >= 1"),
        (AttentionConfig(kind="context", interval=128), "interval=128 exceeds block_size=64"),
        (AttentionConfig(kind="context", interval=4, local_window=5), "local_window=5 must be between 1 and"),
        (AttentionConfig(kind="context", interval=4, local_window=0), "local_window=0"),
        (AttentionConfig(kind="context", max_contexts=0), "max_contexts=0 must be >= 1"),
        (AttentionConfig(kind="context", context_dim=0), "context_dim=0 must be >= 1"),
        (AttentionConfig(kind="context", n_kv_heads=3), "n_kv_heads=3 must divide n_head=4; try 1, 2 or 4"),
        (dict(kind="context", kv_rank=8), "kv_rank is not an option of attention kind='context'"),
        (AttentionConfig(kind="context", interval=4, kv_share="every:2"), "cannot share KV"),
    ],
)
def test_config_errors_name_the_field(att, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(AttentionConfig(**att) if isinstance(att, dict) else att)


def test_preset_defaults():
    layer = GPT(tiny_config("context-8")).blocks[1].attn
    assert (layer.interval, layer.max_contexts, layer.local_window, layer.context_dim) == (8, 32, 8, 16)
    assert layer.n_kv_heads == 4 and layer.kv_bytes_per_token(torch.float32) == 16 * 4 / 8
