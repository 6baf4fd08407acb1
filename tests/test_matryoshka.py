"""MatryoshkaKV: bytes per token, full-rank equivalence with grouped KV, unpadded mixed-rank caches,
cached == full forward at reduced ranks, an independent low-rank oracle, the rank API, PCA init."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvlab import GPT, AttentionConfig, CacheError, ConfigError, ModelConfig
from kvlab.attention.matryoshka import (
    cayley,
    get_ranks,
    matryoshka_layers,
    projection_parameters,
    rank_choices,
    ranks_config,
    sample_ranks_,
    set_ranks,
)
from kvlab.checkpoint import load_model, save_model
from kvlab.convert.matryoshka import pca_init_, to_matryoshka

from conftest import tiny_config

D = 8  # head_dim of tiny_config (n_embd 32, n_head 4)
MIXED = dict(k_ranks=[8, 3, 5, 1], v_ranks=[2, 8, 4, 6])


def _randomize_projections_(model: GPT, generator: torch.Generator) -> None:
    """Random orthogonal bases, a random Cayley rotation on top, random means: nothing is identity."""
    with torch.no_grad():
        for _, attn in matryoshka_layers(model):
            H = attn.n_kv_heads
            u_k = torch.linalg.qr(torch.randn(H, D, D, generator=generator))[0]
            u_v = torch.linalg.qr(torch.randn(H, D, D, generator=generator))[0]
            attn.set_bases_(u_k, u_v)
            for p in (attn.k_skew, attn.v_skew):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
            for p in (attn.k_mean, attn.v_mean):
                p.copy_(torch.randn(p.shape, generator=generator))


def _random_model(attention: AttentionConfig, seed: int = 0) -> GPT:
    model = GPT(tiny_config(attention)).eval()
    _randomize_projections_(model, torch.Generator().manual_seed(seed))
    return model


def _cached_logits(model: GPT, idx: torch.Tensor, t0: int) -> torch.Tensor:
    cache = model.new_cache(batch_size=idx.shape[0], max_len=idx.shape[1], dtype=torch.float32)
    steps = [model(idx[:, :t0], cache=cache)]
    steps += [model(idx[:, t : t + 1], cache=cache) for t in range(t0, idx.shape[1])]
    return torch.cat(steps, dim=1)


def test_gpt2_124m_matryoshka_32_is_1536_bytes_per_token():
    with torch.device("meta"):
        model = GPT(ModelConfig.preset("gpt2-124m", attention="matryoshka-32"))
    m = model.kv_metrics()
    assert m["kv_bytes_per_token"] == 1536  # (12 K ranks + 12 V ranks) * 32 * 2 bytes
    assert m["kv_bytes_per_token_total"] == 12 * 1536
    assert m["latent_rank_ratio"] == 0.5  # 32 / 64
    assert m["head_sharing_ratio"] == 1.0
    set_ranks(model, k=64, v=16)
    assert model.kv_metrics()["kv_bytes_per_token"] == (12 * 64 + 12 * 16) * 2


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@torch.inference_mode()
def test_full_rank_with_random_projections_equals_grouped_model(n_kv_heads):
    grouped = GPT(tiny_config(AttentionConfig(kind="gqa", n_kv_heads=n_kv_heads))).eval()
    model = GPT(tiny_config(AttentionConfig(kind="matryoshka", n_kv_heads=n_kv_heads))).eval()
    missing, unexpected = model.load_state_dict(grouped.state_dict(), strict=False)
    assert unexpected == [] and all(k.rsplit(".", 1)[-1][2:] in ("base", "skew", "mean") for k in missing)
    _randomize_projections_(model, torch.Generator().manual_seed(n_kv_heads))
    idx = torch.randint(0, 97, (2, 19))
    expected = grouped(idx)
    torch.testing.assert_close(model(idx), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_cached_logits(model, idx, 7), expected, rtol=1e-5, atol=1e-5)
    set_ranks(model, k=D - 1)  # sanity: dropping directions changes the logits (K barely matters at init)
    assert (model(idx) - expected).abs().max() > 1e-5
    set_ranks(model, v=D // 2)
    assert (model(idx) - expected).abs().max() > 1e-2


@torch.inference_mode()
def test_converter_at_full_rank_reproduces_the_original():
    grouped = GPT(tiny_config("gqa")).eval()
    converted = to_matryoshka(grouped)
    idx = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(converted(idx), grouped(idx), rtol=1e-5, atol=1e-5)
    assert get_ranks(converted)["k"] == [[D]] * 4
    calibrated = to_matryoshka(grouped, calibration=[torch.randint(0, 97, (4, 32))])
    torch.testing.assert_close(calibrated(idx), grouped(idx), rtol=1e-5, atol=1e-5)
    assert matryoshka_layers(calibrated)[0][1].k_mean.abs().max() > 0  # PCA actually ran
    with pytest.raises(ConfigError, match="kv_share"):
        to_matryoshka(GPT(tiny_config(AttentionConfig(kind="gqa", kv_share="every:2"))))


@pytest.mark.parametrize(
    "attention",
    [
        AttentionConfig(kind="matryoshka", ranks=3),
        AttentionConfig(kind="matryoshka", **MIXED),
        AttentionConfig(kind="matryoshka", n_kv_heads=2, k_ranks=[7, 2], v_ranks=[1, 5]),
        AttentionConfig(kind="matryoshka", k_ranks=[3, 5, 3, 5], v_ranks=[2, 2, 2, 2]),
        AttentionConfig(kind="gqa", layers={1: AttentionConfig(kind="matryoshka", **MIXED)}),
    ],
    ids=["uniform-3", "mixed", "gqa2-mixed", "interleaved-groups", "layer1-only"],
)
@torch.inference_mode()
def test_cached_decode_matches_full_forward_at_reduced_ranks(attention):
    """The cached path attends from coefficients per head; the full path reconstructs masked K/V."""
    model = _random_model(attention)
    idx = torch.randint(0, 97, (2, 21))
    torch.testing.assert_close(_cached_logits(model, idx, 6), model(idx), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_truncation_equals_grouped_model_with_projected_weights():
    """Independent oracle: rank-r K is P k + (I - P) mu with P = U_r U_r^T, i.e. a linear map of x, so
    a grouped model with kv_proj rewritten to (P W, P b + (I - P) mu) must give the same logits."""
    model = _random_model(AttentionConfig(kind="matryoshka", **MIXED))
    oracle = GPT(tiny_config(AttentionConfig(kind="gqa", n_kv_heads=4))).eval()
    oracle.load_state_dict(model.state_dict(), strict=False)
    for (_, attn), block in zip(matryoshka_layers(model), oracle.blocks):
        W = attn.kv_proj.weight.view(2, 4, D, -1)  # (K/V, H_kv, D, C)
        b = attn.kv_proj.bias.view(2, 4, D)
        new_w, new_b = W.clone(), b.clone()
        for j, (u, mean, ranks) in enumerate(
            zip(attn.bases(), (attn.k_mean, attn.v_mean), (attn.k_ranks, attn.v_ranks))
        ):
            for h, r in enumerate(ranks):
                P = u[h, :, :r] @ u[h, :, :r].T  # (D, D) projector onto the kept subspace
                new_w[j, h] = P @ W[j, h]
                new_b[j, h] = P @ b[j, h] + (torch.eye(D) - P) @ mean[h]
        block.attn.kv_proj.weight.copy_(new_w.view_as(block.attn.kv_proj.weight))
        block.attn.kv_proj.bias.copy_(new_b.view_as(block.attn.kv_proj.bias))
    idx = torch.randint(0, 97, (2, 17))
    torch.testing.assert_close(model(idx), oracle(idx), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_cached_logits(model, idx, 5), oracle(idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "ranks, shapes",
    [  # shapes: (heads, width) of the K groups then the V groups of one layer's cache
        (MIXED, [(1, 8), (1, 3), (1, 5), (1, 1), (1, 2), (1, 8), (1, 4), (1, 6)]),
        (dict(k_ranks=[3, 5, 3, 5], v_ranks=[2, 2, 2, 2]), [(2, 3), (2, 5), (2, 2), (2, 2)]),
    ],
    ids=["all-distinct", "two-groups"],
)
@torch.inference_mode()
def test_mixed_rank_cache_is_unpadded(ranks, shapes, dtype):
    model = _random_model(AttentionConfig(kind="matryoshka", **ranks))
    B, max_len = 3, 20
    cache = model.new_cache(batch_size=B, max_len=max_len, dtype=dtype)
    model(torch.randint(0, 97, (B, 9)), cache=cache)
    per_token = sum(ranks["k_ranks"]) + sum(ranks["v_ranks"])  # each head at its own K and V rank
    assert (
        cache.nbytes()
        == 4 * B * max_len * per_token * dtype.itemsize
        == model.kv_cache_bytes(B, max_len, dtype)
    )
    assert [t.shape for t in cache.states[0].tensors.values()] == [(B, h, max_len, r) for h, r in shapes]
    assert model.kv_metrics(dtype)["kv_bytes_per_token"] == per_token * dtype.itemsize


@torch.inference_mode()
def test_cache_must_be_created_after_setting_ranks():
    model = _random_model(AttentionConfig(kind="matryoshka"))
    idx = torch.randint(0, 97, (1, 8))
    cache = model.new_cache(batch_size=1, max_len=8)
    set_ranks(model, k=4, v=[[1, 2, 3, 4], 5, 6, [8, 8, 8, 8]])
    with pytest.raises(CacheError, match="new cache"):
        model(idx, cache=cache)
    cache = model.new_cache(batch_size=1, max_len=8)
    torch.testing.assert_close(model(idx, cache=cache), model(idx), rtol=1e-5, atol=1e-5)


def test_rank_api_round_trip_and_errors():
    model = _random_model(AttentionConfig(kind="matryoshka", ranks=6))
    assert get_ranks(model) == {"layers": [0, 1, 2, 3], "k": [[6] * 4] * 4, "v": [[6] * 4] * 4}
    k = [[1, 2, 3, 4], 5, [8, 7, 6, 5], 2]
    set_ranks(model, k=k)
    assert get_ranks(model)["k"] == [[1, 2, 3, 4], [5] * 4, [8, 7, 6, 5], [2] * 4]
    assert get_ranks(model)["v"] == [[6] * 4] * 4  # V untouched
    before = get_ranks(model)
    for bad in (dict(k=0), dict(k=9), dict(v=[1, 2, 3]), dict(v=[[1, 2], 3, 3, 3]), dict(k=2, v=[1.5] * 4)):
        with pytest.raises(ConfigError):
            set_ranks(model, **bad)
        assert get_ranks(model) == before  # a rejected assignment changes nothing
    other = _random_model(AttentionConfig(kind="matryoshka"))
    set_ranks(other, **get_ranks(model))
    assert get_ranks(other) == before
    with pytest.raises(ConfigError, match="no kind='matryoshka'"):
        get_ranks(GPT(tiny_config("mha")))


def test_sample_ranks_draws_each_head_independently_from_the_allowed_set():
    assert rank_choices(64) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert rank_choices(8) == list(range(1, 9))
    with torch.device("meta"):
        model = GPT(ModelConfig.preset("gpt2-124m", attention="matryoshka-64"))
    drawn = sample_ranks_(model, torch.Generator().manual_seed(3))
    assert drawn == get_ranks(model)
    values = [r for kv in ("k", "v") for layer in drawn[kv] for r in layer]
    assert len(values) == 2 * 12 * 12 and set(values) <= set(rank_choices(64))
    assert len(set(values)) == 8  # 288 independent draws hit every choice
    assert drawn["k"] != drawn["v"] and drawn["k"][0] != drawn["k"][1]
    assert model.kv_metrics()["kv_bytes_per_token"] == pytest.approx(sum(values) * 2 / 12)
    assert sample_ranks_(model, torch.Generator().manual_seed(4)) != drawn
    assert sample_ranks_(model, torch.Generator().manual_seed(3)) == drawn  # reproducible
    assert set(sum(sample_ranks_(model, choices=[16, 32])["k"], [])) == {16, 32}


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(ranks=0), "ranks=0"),
        (dict(ranks=9), "head_dim=8"),
        (dict(k_ranks=[8, 8]), "k_ranks"),
        (dict(v_ranks=[8, 8, 8, 0]), r"v_ranks\[3\]"),
        (dict(kv_rank=4), "kv_rank"),
        (dict(n_kv_heads=3), "n_kv_heads=3"),
        (dict(kv_share="every:2"), "the coefficients are only readable with the owner's projection"),
    ],
)
def test_bad_config_is_a_clear_error(fields, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(AttentionConfig(kind="matryoshka", **fields))


def test_ranks_config_and_checkpoint_round_trip(tmp_path):
    model = _random_model(AttentionConfig(kind="matryoshka"))
    set_ranks(model, k=[[1, 2, 3, 4], 5, 6, 7], v=3)
    cfg = dataclasses.replace(model.config, attention=ranks_config(model))
    rebuilt = GPT(ModelConfig.from_dict(cfg.to_dict())).eval()  # through JSON-able dicts, as config.json
    rebuilt.load_state_dict(model.state_dict())
    assert get_ranks(rebuilt) == get_ranks(model)
    save_model(tmp_path, rebuilt)
    loaded = load_model(tmp_path)
    idx = torch.randint(0, 97, (2, 12))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(idx), model(idx), rtol=1e-5, atol=1e-5)
    assert get_ranks(loaded) == get_ranks(model)


@torch.no_grad()
def test_pca_init_decorrelates_and_orders_coefficients():
    model = GPT(tiny_config(AttentionConfig(kind="matryoshka", ranks=2))).eval()
    calib = [torch.randint(0, 97, (4, 32)) for _ in range(3)]
    idx = torch.randint(0, 97, (2, 15))
    before = model(idx)
    set_ranks(model, k=D, v=D)
    full_before = model(idx)
    set_ranks(model, k=2, v=2)
    pca_init_(model, calib)
    assert get_ranks(model)["k"] == [[2] * 4] * 4  # ranks restored after calibrating at full rank
    set_ranks(model, k=D, v=D)
    torch.testing.assert_close(model(idx), full_before, rtol=1e-5, atol=1e-5)  # full rank: basis-free
    # Layer 0's K on the calibration tokens, projected on the PCA basis: zero mean, diagonal, descending.
    attn = matryoshka_layers(model)[0][1]
    x = torch.cat([model.blocks[0].ln_1(model.wte(i) + model.wpe(torch.arange(32))) for i in calib])
    k, _ = attn.full_kv(x, 0)  # (B, H_kv, T, D)
    u_k, _ = attn.bases()
    c = ((k - attn.k_mean[:, None, :]) @ u_k).transpose(0, 1).flatten(1, 2)  # (H_kv, N, D)
    assert c.mean(1).abs().max() < 1e-5
    cov = c.transpose(1, 2) @ c / c.shape[1]  # (H_kv, D, D)
    var = cov.diagonal(dim1=1, dim2=2)
    torch.testing.assert_close(cov, torch.diag_embed(var), rtol=0, atol=1e-6)
    assert (var[:, :-1] >= var[:, 1:]).all()
    # Rank 2 on the PCA basis keeps more of K than rank 2 on the identity basis (error = dropped variance).
    k_c = (k - attn.k_mean[:, None, :]).transpose(0, 1).flatten(1, 2)  # (H_kv, N, D)
    identity_err = k_c[..., 2:].pow(2).sum()
    pca_err = c[..., 2:].pow(2).sum()
    assert pca_err < 0.8 * identity_err
    set_ranks(model, k=2, v=2)
    assert (model(idx) - before).abs().max() > 1e-4


def test_projections_train_and_stay_orthogonal():
    model = GPT(tiny_config(AttentionConfig(kind="matryoshka", n_kv_heads=2))).train()
    params = projection_parameters(model)
    assert len(params) == 4 * 4
    opt = torch.optim.AdamW([{"params": params, "lr": 5e-2}], weight_decay=0.0)
    idx = torch.randint(0, 97, (4, 17))
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        sample_ranks_(model, gen)
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        opt.step()
    for _, attn in matryoshka_layers(model):
        for u in attn.bases():
            assert (u - torch.eye(D)).abs().max() > 1e-2  # it moved ...
            torch.testing.assert_close(u.transpose(1, 2) @ u, torch.eye(D).expand(2, D, D), atol=1e-5, rtol=0)


def test_rank_masks_follow_the_ranks_and_serve_training_after_inference():
    """The training path's rank masks follow a change of ranks (a sampler's draw), also one made under
    inference_mode, and the ranks set there serve a later backward."""
    cfg = tiny_config(AttentionConfig(kind="matryoshka", n_kv_heads=2, ranks=3))
    model = GPT(cfg).train()
    idx = torch.randint(0, 97, (2, 12))
    model(idx)  # builds the masks for ranks 3
    set_ranks(model, k=[[5, 2]] * 4, v=[[1, 8]] * 4)
    with torch.inference_mode():
        model(idx)  # rebuilds them for the new ranks, under inference mode
    fresh = GPT(dataclasses.replace(cfg, attention=cfg.attention.replace(k_ranks=[5, 2], v_ranks=[1, 8])))
    fresh.load_state_dict(model.state_dict())
    logits = model(idx)
    torch.testing.assert_close(logits, fresh.train()(idx), rtol=0, atol=0)
    logits.sum().backward()  # reuses those masks: they were made outside inference mode
    attn = matryoshka_layers(model)[0][1]
    expected = torch.tensor([[[1.0] * 5 + [0.0] * 3, [1.0] * 2 + [0.0] * 6], [[1.0] + [0.0] * 7, [1.0] * 8]])
    torch.testing.assert_close(attn._rank_masks(torch.float32), expected)
    assert attn.rank_table.tolist() == [[5, 2], [1, 8]]
    attn.v_ranks[0] = 3  # in place, past the setter (kvlab.search does this): an eager forward sees it
    assert attn._rank_masks(torch.float32)[1, 0].tolist() == [1.0] * 3 + [0.0] * 5


def test_inference_reuses_bases_only_until_a_parameter_changes():
    model = GPT(tiny_config(AttentionConfig(kind="matryoshka", v_ranks=[2, 3, 4, 5]))).eval()
    idx = torch.randint(0, 97, (1, 10))
    with torch.inference_mode():
        first = model(idx)
        attn = matryoshka_layers(model)[0][1]
        assert attn.bases()[0] is attn.bases()[0]  # cached between calls
        attn.v_skew.add_(0.5 * torch.randn_like(attn.v_skew))  # in place: the version counter moves
        second = model(idx)
    assert (second - first).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(attn.bases()[1], attn.v_base @ cayley(attn.v_skew))
        model.load_state_dict(GPT(tiny_config(model.config.attention)).state_dict())
        torch.testing.assert_close(attn.bases()[1], torch.eye(D).expand(4, D, D))


@torch.inference_mode()
def test_bf16_autocast_cache_decodes_like_the_full_forward():
    """bf16 cache + CPU autocast: mixed rank groups combine outputs of different dtypes without error."""
    model = _random_model(AttentionConfig(kind="matryoshka", k_ranks=[3, 5, 3, 8], v_ranks=[2, 2, 6, 2]))
    idx = torch.randint(0, 97, (2, 14))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(idx).float()
        cache = model.new_cache(batch_size=2, max_len=14, dtype=torch.bfloat16)
        steps = [model(idx[:, :5], cache=cache)] + [
            model(idx[:, t : t + 1], cache=cache) for t in range(5, 14)
        ]
    assert cache.nbytes() == 4 * 2 * 14 * (19 + 12) * 2
    torch.testing.assert_close(
        torch.cat(steps, dim=1).float(), full, rtol=0, atol=0.05 * full.abs().max().item()
    )


def test_save_model_writes_the_live_ranks(tmp_path):
    """save_model after set_ranks (no ranks_config by hand): the reloaded model has those ranks and logits."""
    model = _random_model(AttentionConfig(kind="matryoshka")).eval()
    set_ranks(model, k=2, v=3)
    save_model(tmp_path, model)
    loaded = load_model(tmp_path)
    assert get_ranks(loaded) == get_ranks(model)
    idx = torch.randint(0, 97, (2, 12))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)


@pytest.mark.slow  # torch.compile of a training forward and backward
def test_compiled_training_forward_is_one_graph_under_a_rank_sampler():
    """Seed 003 draws new ranks every step. The training path reads them as a tensor (`rank_table`),
    so a compiled forward does not guard on them: one graph for every draw (it used to recompile every
    step until dynamo's recompile limit, then run eagerly), with the eager losses and gradients."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = GPT(tiny_config(AttentionConfig(kind="matryoshka", k_ranks=[8, 3, 5, 1], v_ranks=[2, 8, 4, 6])))
    compiled = torch.compile(model)
    idx = torch.randint(0, 97, (2, 16))
    generator = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    seen = set()
    for _ in range(4):
        draw = sample_ranks_(model, generator)
        seen.add(str(draw))
        for forward in (model, compiled):
            model.zero_grad()
            loss = forward(idx).float().logsumexp(-1).mean()
            loss.backward()
            if forward is model:
                eager = (loss.detach(), model.blocks[0].attn.v_mean.grad.clone())
        torch.testing.assert_close(loss.detach(), eager[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.blocks[0].attn.v_mean.grad, eager[1], rtol=1e-4, atol=1e-6)
    assert len(seen) == 4
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
