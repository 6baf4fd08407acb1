"""HF GPT-2 import and grouped/cross-layer KV conversions: exact at no-op settings, pooling rule by value."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from kvlab import GPT, AttentionConfig, ModelConfig
from kvlab.config import ConfigError
from kvlab.convert.grouped import to_gqa, to_kv_share

from conftest import tiny_config

transformers = pytest.importorskip("transformers")

TIGHT = dict(rtol=1e-5, atol=1e-5)


def _hf_model(**overrides):
    fields = dict(
        n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=101,
        resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    fields.update(overrides)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(**fields)).eval()
    with torch.no_grad():  # HF zero-inits biases and unit-inits LayerNorms: randomise them so they are tested
        for name, p in m.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


def _trained_like(att: AttentionConfig, **overrides) -> GPT:
    """A tiny model with every tensor random (biases and LayerNorms too), as after training."""
    model = GPT(tiny_config(att, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_activation_is_validated():
    with pytest.raises(ConfigError, match="activation='relu'"):
        tiny_config("mha", activation="relu")


# ---- to_gqa ------------------------------------------------------------------------------------------
def test_to_gqa_noop_is_exact_and_copies():
    model = _trained_like(AttentionConfig(kind="gqa"))
    idx = torch.randint(0, 97, (2, 20))
    conv = to_gqa(model, 4)
    with torch.no_grad():
        assert_close(conv(idx), model(idx), rtol=0, atol=0)
    assert conv.blocks[0].attn.kv_proj.weight.data_ptr() != model.blocks[0].attn.kv_proj.weight.data_ptr()


def test_to_gqa_pools_head_groups_by_mean():
    model = _trained_like(AttentionConfig(kind="gqa"))  # 4 KV heads, head_dim 8, C = 32
    conv = to_gqa(model, 2)
    D = 8
    for src, dst in zip(model.blocks, conv.blocks, strict=True):
        w, b = src.attn.kv_proj.weight, src.attn.kv_proj.bias
        # rows: K heads 0..3 then V heads 0..3, D rows each; new head j = mean(old 2j, 2j+1)
        for kv in range(2):
            for j in range(2):
                rows = [slice((kv * 4 + h) * D, (kv * 4 + h + 1) * D) for h in (2 * j, 2 * j + 1)]
                new = slice((kv * 2 + j) * D, (kv * 2 + j + 1) * D)
                assert_close(dst.attn.kv_proj.weight[new], (w[rows[0]] + w[rows[1]]) / 2, rtol=0, atol=1e-7)
                assert_close(dst.attn.kv_proj.bias[new], (b[rows[0]] + b[rows[1]]) / 2, rtol=0, atol=1e-7)
        assert torch.equal(dst.attn.q_proj.weight, src.attn.q_proj.weight)
        assert torch.equal(dst.mlp.c_fc.weight, src.mlp.c_fc.weight)


def test_to_gqa_identical_heads_are_lossless_and_bytes_shrink():
    model = _trained_like(AttentionConfig(kind="gqa"))
    with torch.no_grad():  # make heads 2j and 2j+1 identical: pooling them to one head changes nothing
        for blk in model.blocks:
            for t in (blk.attn.kv_proj.weight, blk.attn.kv_proj.bias):
                v = t.view(2, 2, 2, 8, *t.shape[1:])  # (K|V, pair, member, D, [C])
                v[:, :, 1] = v[:, :, 0]
    conv = to_gqa(model, 2)
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert_close(conv(idx), model(idx), **TIGHT)
        mqa = to_gqa(model, 1)
        cache = mqa.new_cache(batch_size=2, max_len=20)
        mqa(idx, cache=cache)
    assert model.kv_cache_bytes(2, 20) == 4 * (2 * 2 * 20 * 4 * 8 * 4)  # layers * (K,V * B * T * H * D * 4B)
    assert conv.kv_cache_bytes(2, 20) * 2 == model.kv_cache_bytes(2, 20)
    assert cache.nbytes() == mqa.kv_cache_bytes(2, 20) == model.kv_cache_bytes(2, 20) // 4
    assert mqa.kv_metrics()["head_sharing_ratio"] == 4.0


def test_to_gqa_errors():
    model = _trained_like(AttentionConfig(kind="gqa", n_kv_heads=2))
    with pytest.raises(ConfigError, match="must divide the model's n_kv_heads=2"):
        to_gqa(model, 4)
    with pytest.raises(ConfigError, match="kind='gqa'"):
        to_gqa(GPT(tiny_config(AttentionConfig(kind="mla", kv_rank=16, rope_dim=4))), 1)


# ---- to_kv_share -------------------------------------------------------------------------------------
def test_to_kv_share_noop_is_exact():
    model = _trained_like(AttentionConfig(kind="gqa", n_kv_heads=2))
    idx = torch.randint(0, 97, (2, 20))
    conv = to_kv_share(model, "none")
    with torch.no_grad():
        assert_close(conv(idx), model(idx), rtol=0, atol=0)


def test_to_kv_share_owner_gets_uniform_mean_of_its_group():
    model = _trained_like(AttentionConfig(kind="gqa"))
    conv = to_kv_share(model, "groups:2")  # 4 layers: owners 0 and 2
    assert conv.owners == [0, 0, 2, 2]
    for o, group in ((0, (0, 1)), (2, (2, 3))):
        for p in ("weight", "bias"):
            want = sum(getattr(model.blocks[i].attn.kv_proj, p) for i in group) / 2
            assert_close(getattr(conv.blocks[o].attn.kv_proj, p), want, rtol=0, atol=1e-7)
    for i in (1, 3):
        assert conv.blocks[i].attn.kv_proj is None
        assert torch.equal(conv.blocks[i].attn.q_proj.weight, model.blocks[i].attn.q_proj.weight)
        assert torch.equal(conv.blocks[i].mlp.c_proj.bias, model.blocks[i].mlp.c_proj.bias)
    m = conv.kv_metrics()
    assert m["layer_sharing_ratio"] == 2.0
    assert conv.kv_cache_bytes(1, 16) * 2 == model.kv_cache_bytes(1, 16) == 4 * 2 * 16 * 32 * 4
    uneven = to_kv_share(model, [0, 0, 0, 3])
    want = sum(model.blocks[i].attn.kv_proj.weight for i in (0, 1, 2)) / 3
    assert_close(uneven.blocks[0].attn.kv_proj.weight, want, rtol=0, atol=1e-7)
    assert torch.equal(uneven.blocks[3].attn.kv_proj.weight, model.blocks[3].attn.kv_proj.weight)


def test_to_kv_share_errors():
    shared = _trained_like(AttentionConfig(kind="gqa", kv_share="every:2"))
    with pytest.raises(ConfigError, match="kv_share='none'"):
        to_kv_share(shared, "every:4")
    with pytest.raises(ConfigError, match="kv_share="):
        to_kv_share(_trained_like(AttentionConfig(kind="gqa")), "every:9")


def test_composition_mqa_then_cla2_matches_hand_built_model():
    model = _trained_like(AttentionConfig(kind="gqa"))  # 4 KV heads
    conv = to_kv_share(to_gqa(model, 1), "every:2")
    # Hand-built: owner o in {0, 2} gets the mean over its 2 layers and all 4 heads of K (and of V).
    cfg = ModelConfig(
        **{
            **model.config.to_dict(),
            "attention": AttentionConfig(kind="gqa", n_kv_heads=1, kv_share="every:2"),
        }
    )
    expect = GPT(cfg).eval()
    state = {k: v for k, v in model.state_dict().items() if ".kv_proj." not in k}
    for o in (0, 2):
        for p in ("weight", "bias"):
            t = torch.stack([getattr(model.blocks[i].attn.kv_proj, p) for i in (o, o + 1)])  # (2, 2*4*8, [C])
            state[f"blocks.{o}.attn.kv_proj.{p}"] = (
                t.reshape(2, 2, 4, 8, *t.shape[2:]).mean(dim=(0, 2)).flatten(0, 1)
            )
    expect.load_state_dict(state, strict=True)
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        want = expect(idx)
        assert_close(conv(idx), want, **TIGHT)
        cache = conv.new_cache(batch_size=2, max_len=24)
        cached = torch.cat(
            [conv(idx[:, :16], cache=cache)] + [conv(idx[:, t : t + 1], cache=cache) for t in range(16, 24)],
            1,
        )
    assert_close(cached, want, **TIGHT)
    assert cache.nbytes() == conv.kv_cache_bytes(2, 24) == 2 * (2 * 2 * 24 * 1 * 8 * 4)
    assert conv.kv_cache_bytes(2, 24) * 8 == model.kv_cache_bytes(2, 24)
    assert conv.kv_metrics()["kv_bytes_per_token"] == 2 * 1 * 8 * 2 * 2 / 4  # bf16, 2 owners of 4 layers
