"""Every converter in every family: exact at its no-op setting (logits and cached decoding), the original
left untouched, shapes/bytes as claimed at reduced settings, and one-line errors for bad requests."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from kvlab import GPT, AttentionConfig
from kvlab.config import ConfigError
from kvlab.convert.grouped import to_gqa, to_kv_share
from kvlab.convert.layers import replace_layers
from kvlab.convert.matryoshka import to_matryoshka
from kvlab.convert.mla import mla_rank_bound, to_mla
from kvlab.errors import KvlabError
from kvlab.retrofit.structures import convert

from conftest import FAMILIES, tiny_config

FAMS = sorted(FAMILIES)
TIGHT = dict(rtol=1e-5, atol=1e-5)


def _trained_like(family: str, n_kv_heads: int = 4) -> GPT:
    """A tiny model of a family with every tensor perturbed (biases and norms too), as after training."""
    model = GPT(tiny_config(AttentionConfig(kind="gqa", n_kv_heads=n_kv_heads), **FAMILIES[family])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _check_exact(model: GPT, converted: GPT) -> None:
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        want = model(idx)
        assert_close(converted(idx), want, **TIGHT)
        cache = converted.new_cache(2, 32)
        got = torch.cat([converted(idx[:, :13], cache=cache), converted(idx[:, 13:], cache=cache)], dim=1)
    assert_close(got, want, **TIGHT)
    assert cache.nbytes() == converted.kv_cache_bytes(2, 32)


def _snapshot(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: GPT, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("family", FAMS)
def test_grouped_converters_noop_exact_every_family(family):
    model = _trained_like(family, n_kv_heads=2)
    before = _snapshot(model)
    _check_exact(model, to_gqa(model, 2))
    _check_exact(model, to_kv_share(model, "none"))
    _check_exact(model, to_kv_share(model, "none", merge="owner"))
    _unchanged(model, before)


@pytest.mark.parametrize("family", FAMS)
def test_kv_share_owner_merge_keeps_owner_projection(family):
    model = _trained_like(family)
    shared = to_kv_share(model, "every:2", merge="owner")
    mean = to_kv_share(model, "every:2")
    w = lambda m, i: m.blocks[i].attn.kv_proj.weight  # noqa: E731
    assert torch.equal(w(shared, 2), w(model, 2))
    assert_close(w(mean, 2), (w(model, 2) + w(model, 3)) / 2)
    assert shared.blocks[3].attn.kv_proj is None
    assert shared.kv_metrics()["kv_bytes_per_token"] == model.kv_metrics()["kv_bytes_per_token"] / 2


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("method", ["svd", "pca"])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_to_mla_full_rank_is_exact_every_family(family, method, n_kv_heads):
    model = _trained_like(family, n_kv_heads)
    before = _snapshot(model)
    calib = [torch.randint(0, 97, (2, 32))]
    converted = to_mla(model, mla_rank_bound(model), method=method, calibration=calib)
    assert converted.config.attention.kind == "mla"
    _check_exact(model, converted)
    # At full rank the cache is exactly as large as the source's K/V.
    assert converted.kv_metrics()["kv_bytes_per_token"] == model.kv_metrics()["kv_bytes_per_token"]
    _unchanged(model, before)


@pytest.mark.parametrize("family", ["neox", "llama"])
def test_to_mla_reduced_rank_and_partial_rope(family):
    model = _trained_like(family)
    calib = [torch.randint(0, 97, (2, 32))]
    rank = mla_rank_bound(model, rope_dim=2) // 2
    small = to_mla(model, rank, rope_dim=2, method="pca", calibration=calib)
    att = small.blocks[0].attn
    assert att.kv_rank == rank and att.rope_dim == 2 and att.rope_heads == 4
    # bf16 bytes per token: the latent plus one 2-dim RoPE key per KV head.
    assert small.kv_metrics()["kv_bytes_per_token"] == (rank + 4 * 2) * 2
    _check_cached_matches_full(small)
    # The PCA basis keeps more of the activations' energy than the weights' SVD at the same rank.
    idx = torch.cat(calib)
    with torch.no_grad():
        want = model(idx).log_softmax(-1)
        by_pca = small(idx).log_softmax(-1)
        by_svd = to_mla(model, rank, rope_dim=2, method="svd")(idx).log_softmax(-1)
    kl = lambda p: torch.nn.functional.kl_div(p, want, log_target=True, reduction="batchmean")  # noqa: E731
    assert kl(by_pca) < kl(by_svd)


def _check_cached_matches_full(model: GPT) -> None:
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, 20)
        got = torch.cat([model(idx[:, :9], cache=cache), model(idx[:, 9:], cache=cache)], dim=1)
    assert_close(got, full, **TIGHT)


def test_to_mla_partial_rope_keeps_the_pairs_with_largest_norm():
    model = _trained_like("llama")
    with torch.no_grad():  # make frequency pair 3 dominate every key and query head of layer 1
        for name in ("q_proj", "kv_proj"):
            w = getattr(model.blocks[1].attn, name).weight
            heads = w.view(-1, 8, w.shape[-1])
            heads[:, [3, 7]] *= 20
    converted = to_mla(model, 8, rope_dim=2, calibration=[torch.randint(0, 97, (2, 32))])
    assert converted.blocks[1].attn.cfg.rope_pairs == [3]
    # Without calibration: the highest frequencies (MHA2MLA's S_high).
    assert to_mla(model, 8, rope_dim=2).blocks[1].attn.cfg.rope_pairs == [0]


@pytest.mark.parametrize("family", FAMS)
def test_to_matryoshka_full_rank_is_exact_every_family(family):
    model = _trained_like(family, n_kv_heads=2)
    before = _snapshot(model)
    converted = to_matryoshka(model, calibration=[torch.randint(0, 97, (2, 32))])
    _check_exact(model, converted)
    _unchanged(model, before)


@pytest.mark.parametrize("family", FAMS)
def test_replace_layers_noop_exact_and_context_carries_projections(family):
    model = _trained_like(family)
    before = _snapshot(model)
    _check_exact(model, replace_layers(model, {1: AttentionConfig(kind="gqa", n_kv_heads=4)}))
    ctx = replace_layers(model, {0: AttentionConfig(kind="context", interval=4, max_contexts=2)})
    assert ctx.blocks[0].attn.kind == "context" and ctx.blocks[1].attn.kind == "gqa"
    for name in ("q_proj", "kv_proj", "c_proj"):
        assert torch.equal(
            getattr(ctx.blocks[0].attn, name).weight, getattr(model.blocks[0].attn, name).weight
        )
    assert torch.equal(ctx.blocks[1].attn.kv_proj.weight, model.blocks[1].attn.kv_proj.weight)
    _check_cached_matches_full(ctx)
    assert ctx.kv_cache_bytes(1, 64) < model.kv_cache_bytes(1, 64)
    _unchanged(model, before)


def test_bad_requests_are_one_line_errors():
    model = _trained_like("llama")
    cases = [
        (lambda: to_gqa(model, 3), "must divide"),
        (lambda: to_mla(model, 10_000), "kv_rank=10000 must be between 1 and"),
        (lambda: to_mla(model, 8, rope_dim=10), "rope_dim=10"),
        (lambda: to_mla(model, 8, method="pca"), "needs calibration"),
        (lambda: to_mla(_trained_like("gpt2"), 8, rope_dim=2), "learned positions"),
        (lambda: to_matryoshka(model, ranks=9), "rank"),
        (lambda: replace_layers(model, {4: AttentionConfig(kind="context")}), "out of range"),
        (lambda: to_kv_share(model, "every:2", merge="last"), "merge='last'"),
    ]
    for fn, words in cases:
        with pytest.raises(ConfigError, match=words) as e:
            fn()
        assert "\n" not in str(e.value)


def test_matryoshka_search_beats_uniform_ranks_at_the_same_bytes():
    """`matryoshka+search:0.5` (PCA bases, greedy ranks at half the KV bytes) keeps the model closer than
    `matryoshka:D/2` (every head at half rank, the same bytes) when heads differ in how much they carry:
    here KV head 0 of every layer has rank-1 K and V projections, which the search cuts first."""
    from kvlab.search import final_hidden

    model = _trained_like("llama", n_kv_heads=2)
    D = model.config.head_dim
    with torch.no_grad():
        for block in model.blocks:
            w = block.attn.kv_proj.weight.view(2, 2, D, -1)  # (K/V, H_kv, D, C)
            for kv in range(2):
                w[kv, 0] = torch.outer(torch.randn(D), torch.randn(w.shape[-1]))
    calib = [torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(3))]
    searched = convert(model, "matryoshka+search:0.5:0.25", calib)
    uniform = convert(model, f"matryoshka:{D // 2}", calib)
    full_bytes = model.kv_metrics()["kv_bytes_per_token"]
    assert searched.kv_metrics()["kv_bytes_per_token"] <= 0.5 * full_bytes
    assert uniform.kv_metrics()["kv_bytes_per_token"] == 0.5 * full_bytes
    held_out = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref_h, ref_p = final_hidden(model, held_out), model(held_out).log_softmax(-1)

        def err(m):
            return (final_hidden(m, held_out) - ref_h).norm() / ref_h.norm()

        def kl(m):
            p = m(held_out).log_softmax(-1)
            return torch.nn.functional.kl_div(p, ref_p, log_target=True, reduction="batchmean")

    assert err(searched) < 0.5 * err(uniform) and kl(searched) < kl(uniform)
    assert all(b.attn.v_ranks[0] == 1 for b in searched.blocks)  # the rank-1 values: cut to rank 1, free
    assert model.config.attention.kind == "gqa"  # the source is untouched


def test_search_step_errors_are_one_line():
    model = _trained_like("llama", n_kv_heads=2)
    calib = [torch.randint(0, 97, (2, 16))]
    cases = [
        ("search:0.5", "put a matryoshka step first"),
        ("matryoshka+search", "write search:BUDGET"),
        ("matryoshka+search:half", "budget 'half' must be a number"),
        ("matryoshka+search:0.01", "below the smallest reachable ratio"),
    ]
    for spec, words in cases:
        with pytest.raises(KvlabError, match=words) as e:
            convert(model, spec, calib)
        assert "\n" not in str(e.value)
    with pytest.raises(KvlabError, match="needs calibration"):
        convert(model, "matryoshka+search:0.5", [])
