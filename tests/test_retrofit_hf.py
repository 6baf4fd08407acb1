"""Step-0 losses of converted models against an independent computation in transformers alone: where a
conversion has an HF counterpart (fewer KV heads: LlamaForCausalLM with num_key_value_heads, its K/V
weights mean-pooled here from HF's own tensors; the no-op settings: the source itself), kvlab's held-out
loss of the converted model equals transformers' loss of that model. Tiny random HF models, no hub; the
same check on the real SmolLM2 is in test_smollm2.py."""

from __future__ import annotations

import pytest
import torch
import transformers

from kvlab.convert import from_hf
from kvlab.convert.mla import mla_rank_bound
from kvlab.eval.lm import heldout_loss
from kvlab.retrofit.structures import convert

VOCAB, T, N_WINDOWS = 101, 16, 6


def _llama(n_kv_heads: int, **kw) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, intermediate_size=48, max_position_embeddings=64, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # perturb every tensor (HF inits norms to one) so each one is tested
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def mean_pooled_kv_heads(hf: transformers.LlamaForCausalLM, n_kv_heads: int) -> transformers.LlamaForCausalLM:
    """MLKV's rule written on transformers' tensors: each new KV head is the mean of the old heads it
    replaces (k_proj/v_proj rows grouped per head), every other tensor copied."""
    cfg = hf.config.to_dict()
    old = cfg["num_key_value_heads"]
    cfg["num_key_value_heads"] = n_kv_heads
    new = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(cfg)).eval()
    hd = hf.config.hidden_size // hf.config.num_attention_heads
    state = hf.state_dict()
    for name, w in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = w.view(n_kv_heads, old // n_kv_heads, hd, -1).mean(1).reshape(n_kv_heads * hd, -1)
    new.load_state_dict(state)
    return new


@torch.no_grad()
def transformers_loss(hf, tokens: torch.Tensor) -> float:
    """Mean next-token cross-entropy over non-overlapping T-token windows, by transformers' own loss (it
    shifts labels itself: T - 1 predictions per window, plus the window's last token scored here)."""
    losses = []
    for w in range(N_WINDOWS):
        window = tokens[None, w * T : w * T + T + 1]
        out = hf(window[:, :-1], labels=window[:, :-1])
        last = torch.nn.functional.cross_entropy(out.logits[0, -1:], window[0, -1:])
        losses.append((out.loss * (T - 1) + last) / T)
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize("n_kv_heads,to,target", [(4, "gqa:2", 2), (4, "mqa", 1), (2, "mqa", 1)])
def test_fewer_kv_heads_step0_equals_transformers(n_kv_heads, to, target):
    hf = _llama(n_kv_heads)
    tokens = torch.randint(0, VOCAB, (N_WINDOWS * T + 1,), generator=torch.Generator().manual_seed(1))
    converted = convert(from_hf(hf), to, [])
    got = heldout_loss(converted, tokens, block_size=T, batch_size=2, max_windows=N_WINDOWS)
    want = transformers_loss(mean_pooled_kv_heads(hf, target), tokens)
    assert got == pytest.approx(want, abs=1e-5)
    assert got != pytest.approx(transformers_loss(hf, tokens), abs=1e-3)  # the conversion changed the model


@pytest.mark.parametrize("to", ["none", "gqa:2", "mla:FULL", "matryoshka", "share:none"])
def test_noop_conversions_step0_equals_the_source_in_transformers(to):
    hf = _llama(2)
    tokens = torch.randint(0, VOCAB, (N_WINDOWS * T + 1,), generator=torch.Generator().manual_seed(2))
    model = from_hf(hf)
    to = to.replace("FULL", str(mla_rank_bound(model)))
    calib = [tokens[: 2 * T].view(2, T)]
    got = heldout_loss(convert(model, to, calib), tokens, block_size=T, batch_size=2, max_windows=N_WINDOWS)
    assert got == pytest.approx(transformers_loss(hf, tokens), abs=1e-5)
