"""Latent KV attention (MLA): seed-000 metrics, cache contents and bytes, absorbed == unabsorbed decoding,
an independent per-head oracle, composition with cross-layer sharing, and config validation."""

from __future__ import annotations

import math

import pytest
import torch

from kvlab import GPT, AttentionConfig, ConfigError, ModelConfig
from kvlab.attention.mla import LatentAttention
from kvlab.generate import generate

from conftest import VARIANTS, tiny_config

MLA_IDS = ["mla", "mla+cla2", "mla-no-qrank"]


def _model(name: str, **overrides) -> GPT:
    return GPT(tiny_config(VARIANTS[name], **overrides)).eval()


def _set_absorb(model: GPT, absorb: bool | None) -> None:
    for block in model.blocks:
        block.attn.absorb = absorb


def _randomise_(module: torch.nn.Module) -> None:
    """Random norm gains and biases too, so the oracle sees every parameter do something."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)


# ---- structural metrics (seed 000) ------------------------------------------------------------------
def test_gpt2_124m_mla_metrics():
    with torch.device("meta"):
        model = GPT(ModelConfig.preset("gpt2-124m", attention="mla"))
    m = model.kv_metrics(torch.bfloat16)
    assert m["kv_bytes_per_token"] == 640  # (kv_rank 256 + rope_dim 64) * 2 bytes
    assert m["kv_bytes_per_token_total"] == 12 * 640
    assert m["latent_rank_ratio"] == 2.0  # 256 / (64 + 64)
    assert m["head_sharing_ratio"] == 12.0
    assert m["layer_sharing_ratio"] == 1.0
    assert model.wpe is None and not model.uses_learned_positions
    assert model.kv_cache_bytes(batch_size=2, max_len=1024, dtype=torch.bfloat16) == 2 * 1024 * 12 * 640
    attn = model.blocks[0].attn
    assert (attn.kv_rank, attn.rope_dim, attn.q_rank) == (256, 64, 768)


def test_gpt2_124m_mla_with_cla2_halves_bytes():
    with torch.device("meta"):
        cfg = ModelConfig.preset("gpt2-124m", attention="mla")
        cfg = ModelConfig.preset("gpt2-124m", attention=cfg.attention.replace(kv_share="every:2"))
        model = GPT(cfg)
    m = model.kv_metrics(torch.bfloat16)
    assert m["kv_bytes_per_token"] == 320
    assert m["layer_sharing_ratio"] == 2.0
    assert m["head_sharing_ratio"] == 12.0 and m["latent_rank_ratio"] == 2.0


# ---- cached decoding ----------------------------------------------------------------------------------
@pytest.mark.parametrize("absorb", [None, True, False])
@pytest.mark.parametrize("name", MLA_IDS)
@torch.inference_mode()
def test_cached_decode_matches_full_forward(name, absorb):
    model = _model(name)
    _set_absorb(model, absorb)
    B, T, t0 = 2, 20, 7
    idx = torch.randint(0, model.config.vocab_size, (B, T))
    full = model(idx)
    cache = model.new_cache(batch_size=B, max_len=T, dtype=torch.float32)
    steps = [model(idx[:, :t0], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(t0, T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.nbytes() == model.kv_cache_bytes(batch_size=B, max_len=T, dtype=torch.float32)

    prompt = idx[:1, :5]
    cached = generate(model, prompt, max_new_tokens=10).tokens
    ref = prompt
    for _ in range(10):
        ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ref)


@pytest.mark.parametrize("name", MLA_IDS)
@torch.inference_mode()
def test_absorbed_equals_unabsorbed_on_same_cached_call(name):
    model = _model(name)
    with torch.no_grad():  # nonzero biases: the absorbed path must carry kv_b's V bias through
        for block in model.blocks:
            block.attn.kv_b.bias.normal_(0.0, 0.5)
    idx = torch.randint(0, model.config.vocab_size, (2, 24))
    cache = model.new_cache(batch_size=2, max_len=24, dtype=torch.float32)
    model(idx[:, :8], cache=cache)
    for a, b in ((8, 9), (9, 10), (10, 16), (16, 17), (17, 24)):  # decode steps and mid-sequence chunks
        out = {}
        for absorb in (True, False):
            _set_absorb(model, absorb)
            cache.pos = a  # rerun the same call; it rewrites identical payload at a..b
            out[absorb] = model(idx[:, a:b], cache=cache)
        torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5)
        assert out[True].abs().max() > 0.1  # real logits, not a degenerate zero
    assert cache.pos == 24


@torch.inference_mode()
def test_decode_steps_absorb_and_read_only_the_latent():
    """Auto mode: prefill from 0 decompresses (kv_b runs), decode steps never call kv_b on the cache."""
    model = _model("mla")
    kv_b_rows = []
    for block in model.blocks:
        block.attn.kv_b.register_forward_hook(lambda mod, inp, out: kv_b_rows.append(inp[0].shape[1]))
    idx = torch.randint(0, model.config.vocab_size, (1, 12))
    cache = model.new_cache(batch_size=1, max_len=12)
    model(idx[:, :8], cache=cache)
    assert kv_b_rows == [8] * 4  # unabsorbed prefill: every layer decompresses the 8 prompt latents
    kv_b_rows.clear()
    for t in range(8, 12):
        model(idx[:, t : t + 1], cache=cache)
    assert kv_b_rows == []  # absorbed: per-head K/V of the past are never materialised
    attn = model.blocks[0].attn  # head_dim 8, kv_rank 16: absorbing pays off for chunks of < 16 tokens
    assert attn.use_absorbed(pos=8, n_new=1) and attn.use_absorbed(pos=8, n_new=15)
    assert not attn.use_absorbed(pos=8, n_new=16) and not attn.use_absorbed(pos=0, n_new=1)


def test_training_gradients_agree_between_paths():
    model = GPT(tiny_config(VARIANTS["mla+cla2"])).train()
    idx = torch.randint(0, model.config.vocab_size, (2, 17))
    grads, losses = {}, {}
    for absorb in (False, True):
        _set_absorb(model, absorb)
        model.zero_grad()
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        losses[absorb] = loss.item()
        grads[absorb] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-4, atol=1e-6, msg=n)
    assert grads[False]["blocks.1.attn.kv_b.weight"].abs().sum() > 0  # the borrower's up-projection learns


# ---- an independent oracle --------------------------------------------------------------------------
def _rope_pairs(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE written as explicit 2-D rotations of pairs (i, i + d/2)."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half).double() * 2 / x.shape[-1])  # (d/2,)
    angle = positions[:, None].double() * inv_freq  # (T, d/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def _oracle(attn: LatentAttention, x: torch.Tensor, owner: LatentAttention) -> torch.Tensor:
    """MLA from the formulas, one head at a time, explicit softmax and causal mask."""
    B, T, _ = x.shape
    hd, rd, r, H = attn.head_dim, attn.rope_dim, attn.kv_rank, attn.n_head
    pos = torch.arange(T)
    q = attn.q_b(_rms(attn.q_a(x), attn.q_norm.weight)) if attn.q_rank else attn.q_proj(x)
    latent = owner.kv_a(x)
    c_kv = _rms(latent[..., :r], owner.kv_norm.weight)
    k_rope = _rope_pairs(latent[..., r:], pos, attn.rope_theta)
    heads = []
    for h in range(H):
        qh = q[..., h * (hd + rd) : (h + 1) * (hd + rd)]
        q_nope, q_rope = qh[..., :hd], _rope_pairs(qh[..., hd:], pos, attn.rope_theta)
        w = attn.kv_b.weight[h * 2 * hd : (h + 1) * 2 * hd]
        bias = attn.kv_b.bias[h * 2 * hd : (h + 1) * 2 * hd]
        k_nope = c_kv @ w[:hd].T + bias[:hd]
        v = c_kv @ w[hd:].T + bias[hd:]
        scores = (q_nope @ k_nope.transpose(1, 2) + q_rope @ k_rope.transpose(1, 2)) / math.sqrt(hd + rd)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(scores.softmax(-1) @ v)
    return attn.c_proj(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("name", MLA_IDS)
@torch.no_grad()
def test_layer_matches_oracle_and_caches_post_rope_latent(name):
    model = _model(name)
    owner, borrower = model.blocks[0].attn, model.blocks[1].attn
    _randomise_(owner)
    _randomise_(borrower)
    x = torch.randn(2, 11, model.config.n_embd)
    payload = owner.project_kv(x, 0)
    torch.testing.assert_close(owner(x)[0], _oracle(owner, x, owner), rtol=1e-4, atol=1e-5)
    out = borrower(x, kv=payload)[0] if not borrower.owns_kv else borrower(x)[0]
    torch.testing.assert_close(out, _oracle(borrower, x, owner if not borrower.owns_kv else borrower))

    # Cached in two chunks: the state holds exactly the normalised latent and the key rotated to its
    # absolute position, for every absorb setting.
    for absorb in (None, True, False):
        owner.absorb = absorb
        state = owner.new_state(2, 11, x.device, torch.float32)
        y = torch.cat([owner(x[:, :6], 0, state)[0], owner(x[:, 6:], 6, state)[0]], dim=1)
        torch.testing.assert_close(y, _oracle(owner, x, owner), rtol=1e-4, atol=1e-5)
        latent = owner.kv_a(x)
        (held,) = state.read(11)  # one contiguous buffer: c_kv ++ k_rope
        c_kv, k_rope = held.split([owner.kv_rank, owner.rope_dim], dim=-1)
        torch.testing.assert_close(c_kv, _rms(latent[..., : owner.kv_rank], owner.kv_norm.weight))
        torch.testing.assert_close(k_rope, _rope_pairs(latent[..., owner.kv_rank :], torch.arange(11), 1e4))
        assert state.nbytes() == 2 * 11 * (owner.kv_rank + owner.rope_dim) * 4  # nothing else is stored


# ---- composition with cross-layer sharing ------------------------------------------------------------
@torch.inference_mode()
def test_cla2_borrower_keeps_its_own_query_and_up_projection_and_stores_nothing():
    model = _model("mla+cla2")
    assert model.owners == [0, 0, 2, 2]
    borrower = model.blocks[1].attn
    assert not borrower.owns_kv and not hasattr(borrower, "kv_a") and not hasattr(borrower, "kv_norm")
    assert borrower.kv_bytes_per_token(torch.float32) == 0
    cache = model.new_cache(batch_size=3, max_len=10, dtype=torch.float32)
    assert cache.states[1] is None and cache.states[3] is None
    assert cache.nbytes() == 2 * 3 * 10 * (16 + 4) * 4  # two owner layers, latent 16 + rope key 4, fp32
    m = model.kv_metrics(torch.bfloat16)
    assert m["kv_bytes_per_token"] == (16 + 4) * 2 / 2 and m["layer_sharing_ratio"] == 2.0

    idx = torch.randint(0, model.config.vocab_size, (1, 9))
    before = model(idx)
    with torch.no_grad():
        borrower.kv_b.weight.mul_(3.0)  # its own up-projection of the owner's latent is really used
    assert (model(idx) - before).abs().max() > 1e-3
    assert model.new_cache(batch_size=3, max_len=10, dtype=torch.float32).nbytes() == cache.nbytes()


def test_mla_with_a_gqa_layer_keeps_learned_positions():
    """Only an all-RoPE model drops wpe; a gqa override in layer 0 needs the learned positions back."""
    att = AttentionConfig(kind="mla", kv_rank=16, rope_dim=4, layers={0: AttentionConfig(kind="gqa")})
    model = GPT(tiny_config(att)).eval()
    assert model.wpe is not None
    assert model.kv_metrics(torch.bfloat16)["kv_bytes_per_token"] == (2 * 4 * 8 * 2 + 3 * (16 + 4) * 2) / 4
    assert _model("mla").wpe is None and "wpe.weight" not in _model("mla").state_dict()


# ---- validation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(rope_dim=4), "kv_rank"),
        (dict(kv_rank=16), "rope_dim"),
        (dict(kv_rank=0, rope_dim=4), "kv_rank"),
        (dict(kv_rank=16, rope_dim=3), "rope_dim"),
        (dict(kv_rank=16, rope_dim=4, q_rank=0), "q_rank"),
        (dict(kv_rank=16, rope_dim=4, n_kv_heads=2), "n_kv_heads"),
        (dict(kv_rank=16, rope_dim=4, ranks=4), "ranks"),
        (dict(kv_rank=16, rope_dim=4, rope_theta=0.0), "rope_theta"),
    ],
)
def test_bad_config_gives_one_line_error(fields, field):
    with pytest.raises(ConfigError) as err:
        tiny_config(AttentionConfig(kind="mla", **fields))
    msg = str(err.value)
    assert msg.startswith(f"{field}=") or msg.startswith(f"{field} is not an option"), msg
    assert "\n" not in msg
