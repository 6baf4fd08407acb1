"""Evaluation metrics checked against independent computations from their definitions.

lm-eval's `wikitext` (rolling log-likelihood, word/byte perplexity, bits per byte) and `lambada_openai`
(last-word accuracy and perplexity) are recomputed here with plain full forwards over the same model;
heldout_loss against a manual loop over non-overlapping windows; measured == analytic cache bytes.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kvlab import GPT, AttentionConfig
from kvlab.eval import (
    CONTRACT_KEYS,
    HeldoutCorpus,
    cloze_set_from_documents,
    document_perplexity,
    evaluate,
    format_report,
    heldout_loss,
    lambada_metrics,
    measure_cache_bytes,
    val_loss,
)
from kvlab.eval.cloze import encode_pair, split_cloze
from kvlab.eval.lm import get_rolling_token_windows, make_disjoint_window
from kvlab.eval.speed import LiveTensorTracker, peak_generation_memory, speed_shape

from conftest import VARIANTS, tiny_config

WORDS = (
    "the cat sat on a mat while the dog ran after the ball and the bird sang in the tree near the house "
    "where an old man read his book by the window every morning before the sun rose over the hills"
).split()


class ByteTokenizer:
    """UTF-8 bytes + end-of-text 256: every string round-trips, and ' word' is several tokens."""

    eot_token = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class WordTokenizer:
    """128 two-letter words, each with and without a leading space (ids 0-255), end-of-text 256: the
    lambada target " word" is one token, so a test can build passages the model gets right."""

    eot_token = 256
    vocab_size = 257
    WORDS = [a + b for a in "abcdefghijklmnop" for b in "abcdefgh"]

    def encode(self, text: str) -> list[int]:
        return [2 * self.WORDS.index(p.strip()) + p.startswith(" ") for p in re.findall(r" ?[a-p]+", text)]

    def decode(self, ids) -> str:
        return "".join(" " * (i % 2) + self.WORDS[i // 2] for i in ids if i < 256)


def _text(rng: np.random.Generator, n_words: int) -> str:
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), n_words)]
    # sentence punctuation and line breaks, so word counts (re.split on \s+) differ from ' ' splits
    return " ".join(w + (".\n" if i % 11 == 10 else "") for i, w in enumerate(words)).replace("\n ", "\n")


@pytest.fixture
def model() -> GPT:
    return GPT(tiny_config(VARIANTS["gqa"], vocab_size=257, block_size=32)).eval()


# ---- lm-eval definitions, written independently: every token scored by a plain full forward ----------
def _logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)  # (T, V)


def reference_rolling_ll(model, tokens: list[int], max_length: int, prefix: int) -> float:
    """Chunk [a, b) of max_length predictions reads the max_length tokens of [prefix] + tokens ending at b."""
    shifted = [prefix] + tokens
    total = 0.0
    for a in range(0, len(tokens), max_length):
        b = min(a + max_length, len(tokens))
        inp = shifted[max(0, b - max_length) : b]
        lp = _logprobs(model, inp)[len(inp) - (b - a) :]
        total += sum(lp[i, tokens[a + i]].item() for i in range(b - a))
    return total


def reference_lambada(model, tokenizer, passages):
    lls, hits = [], []
    for text in passages:
        words = text.split(" ")
        context, target = " ".join(words[:-1]), " " + words[-1]
        if context:
            context_ids = tokenizer.encode(context)
            target_ids = tokenizer.encode(context + target)[len(context_ids) :]
        else:  # lm-eval conditions an empty context on the end-of-text token
            context_ids, target_ids = [tokenizer.eot_token], tokenizer.encode(target)
        ids = context_ids + target_ids
        lp = _logprobs(model, ids[:-1])[-len(target_ids) :]
        lls.append(sum(lp[i, t].item() for i, t in enumerate(target_ids)))
        hits.append(all(lp[i].argmax().item() == t for i, t in enumerate(target_ids)))
    return sum(hits) / len(hits), math.exp(-sum(lls) / len(lls))


# ---- tests -------------------------------------------------------------------------------------------
def test_rolling_windows_match_lm_eval_gold():
    """lm-eval's own test case (34 tokens, max_seq_len 10, context_len 1)."""
    gold = [
        ([-100, 0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ([9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]),
        ([19, 20, 21, 22, 23, 24, 25, 26, 27, 28], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]),
        ([23, 24, 25, 26, 27, 28, 29, 30, 31, 32], [30, 31, 32, 33]),
    ]
    assert list(get_rolling_token_windows(list(range(34)), -100, 10, 1)) == gold
    assert make_disjoint_window(gold[-1]) == ([23, 24, 25, 26, 27, 28, 29], [30, 31, 32, 33])


def test_wikitext_metrics_equal_lm_eval_definitions(model):
    rng = np.random.default_rng(0)
    tok = ByteTokenizer()
    # 40-200 words -> 150-1000 byte tokens per document: several rolling windows of 32, a short tail
    # a blank document, as WikiText has: lm-eval scores no tokens of it but counts one word
    docs = [_text(rng, int(n)) for n in (40, 7, 120, 200)] + [""]
    got = document_perplexity(model, tok, docs, max_length=32, batch_size=5)
    assert got["documents"] == 5
    lls = [reference_rolling_ll(model, tok.encode(d), 32, tok.eot_token) for d in docs]
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    n_bytes = sum(len(d.encode()) for d in docs)
    assert words != sum(len(d.split(" ")) for d in docs)  # the fixture exercises the \s+ word count
    assert got["word_perplexity"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-5)
    assert got["byte_perplexity"] == pytest.approx(math.exp(-sum(lls) / n_bytes), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(-sum(lls) / n_bytes / math.log(2), rel=1e-5)
    assert got["document_tokens"] == n_bytes


def test_lambada_metrics_equal_lm_eval_definitions(model):
    tok = WordTokenizer()
    gen = torch.Generator().manual_seed(1)
    passages = []
    for i in range(16):  # contexts of 1-20 words; half the targets are the model's own greedy word
        n_words = int(torch.randint(1, 21, (1,), generator=gen))
        context = " ".join(tok.WORDS[w] for w in torch.randint(0, 128, (n_words,), generator=gen))
        logits = _logprobs(model, tok.encode(context))[-1]
        spaced = logits[1::2].argmax().item() * 2 + 1  # best " word" token; a hit if it is the overall argmax
        target = spaced if i % 2 == 0 else int(torch.randint(0, 128, (1,), generator=gen)) * 2 + 1
        passages.append(context + tok.decode([target]))
    passages += [
        "ab",
        "ac ad ae af ag ah ba bb bc bd be bf bg bh ca cb cc cd ce cf cg ch da db dc dd de df dg dh",
    ]
    got = lambada_metrics(model, tok, passages, max_length=32, batch_size=4)
    acc, ppl = reference_lambada(model, tok, passages)
    assert 0 < acc < 1
    assert got["lambada_passages"] == len(passages) == 18
    assert got["lambada_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert got["lambada_perplexity"] == pytest.approx(ppl, rel=1e-5)


def test_lambada_on_a_uniform_model():
    """All logits equal: every target token has p = 1/257 and argmax is token 0, so nothing is a hit."""
    tok = ByteTokenizer()
    model = GPT(tiny_config(VARIANTS["mha"], vocab_size=257, block_size=32)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied to wte: all logits equal -> argmax is token 0
    got = lambada_metrics(model, tok, ["x y", "a b"], max_length=32)
    assert got["lambada_accuracy"] == 0.0
    assert got["lambada_perplexity"] == pytest.approx(257.0**2, rel=1e-5)  # 2 target tokens at p = 1/257


def test_encode_pair_moves_trailing_space_to_the_target():
    tok = ByteTokenizer()
    assert encode_pair(tok, "hello ", "world") == (tok.encode("hello"), tok.encode(" world"))
    assert split_cloze("he said hello") == ("he said", " hello")


def test_heldout_loss_is_ce_over_non_overlapping_windows(model):
    tokens = np.random.default_rng(2).integers(0, 257, 32 * 5 + 7)
    got = heldout_loss(model, tokens, block_size=32, batch_size=2)
    losses = []
    with torch.no_grad():
        for w in range(5):  # 5 full windows; the 7-token tail (6 predictable) is dropped
            x = torch.tensor(tokens[w * 32 : w * 32 + 32])[None]
            y = torch.tensor(tokens[w * 32 + 1 : w * 32 + 33])
            losses.append(F.cross_entropy(model(x)[0], y).item())
    assert got == pytest.approx(sum(losses) / 5, rel=1e-6)


def test_val_loss_is_nanogpt_estimate(model):
    tokens = np.random.default_rng(3).integers(0, 257, 500)
    got = val_loss(model, tokens, 16, batch_size=3, eval_iters=4, generator=torch.Generator().manual_seed(7))
    g, data, losses = torch.Generator().manual_seed(7), torch.tensor(tokens), []
    starts = torch.randint(len(data) - 16 - 1, (4 * 3,), generator=g).view(4, 3)  # drawn at once, as training
    with torch.no_grad():
        for ix in starts:
            x = torch.stack([data[i : i + 16] for i in ix])
            y = torch.stack([data[i + 1 : i + 17] for i in ix])
            losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    assert got == pytest.approx(sum(losses) / 4, rel=1e-6)


def test_cloze_set_follows_the_lambada_rule():
    rng = np.random.default_rng(4)
    docs = [_text(rng, 300) for _ in range(3)] + ["1 2 3 ... !!! ?? " * 30]  # the last has no valid target
    passages = cloze_set_from_documents(docs, n=20, min_context_words=10, seed=5)
    assert 0 < len(passages) <= 20
    assert passages == cloze_set_from_documents(docs, n=20, min_context_words=10, seed=5)  # deterministic
    assert passages != cloze_set_from_documents(docs, n=20, min_context_words=10, seed=6)
    normalised = [" ".join(d.split()) for d in docs]
    for p in passages:
        context, target = split_cloze(p)
        word = target[1:]
        assert re.fullmatch(r"[A-Za-z][A-Za-z'\-]*[A-Za-z]", word)  # no punctuation, digits or 1-letter
        assert 10 <= len(context.split(" ")) <= 20
        assert word.lower() in [w.strip(".").lower() for w in context.split(" ")]  # guessable from context
        assert any(p in d or (p + ".") in d for d in normalised)  # a real run of the text
    with_all = cloze_set_from_documents(docs, n=500, min_context_words=10, seed=5, target_in_context=False)
    assert len(with_all) > len(passages)
    assert not cloze_set_from_documents(docs[-1:], n=5, min_context_words=3, target_in_context=False)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_measured_cache_bytes_equal_analytic(name):
    model = GPT(tiny_config(VARIANTS[name])).eval()
    tokens = torch.randint(0, 97, (200,))
    got = measure_cache_bytes(model, tokens, prompt_len=40)
    assert got["measured_cache_bytes"] == got["analytic_cache_bytes"]
    assert got["cache_tokens"] == model.config.block_size
    if not name.startswith("context"):  # Context-KV's cache is bounded, not per_token x tokens
        per_token = sum(b.attn.kv_bytes_per_token(torch.float32) for b in model.blocks)
        assert got["measured_cache_bytes"] == per_token * model.config.block_size  # batch 1


@pytest.mark.parametrize(
    "name, expected",
    [
        ("gqa", 2 * 2 * 8 * 2),  # K and V, 2 KV heads x head_dim 8, 2 bytes: kv_bytes_per_token itself
        ("cla2", 2 * 4 * 8 * 2 / 2),  # every 2nd layer borrows: 4 heads' K/V in half the layers
        ("explicit-owners", 2 * 2 * 8 * 2 / 2),  # owners [0, 0, 2, 0]: 2 of 4 layers keep K/V
        ("mla", (16 + 4) * 2),  # latent rank 16 + RoPE key 4
    ],
)
def test_measured_cache_bytes_per_token_equal_the_asymptotic_figure(name, expected):
    model = GPT(tiny_config(VARIANTS[name])).eval()
    got = measure_cache_bytes(model, torch.randint(0, 97, (200,)), batch_size=2)
    # a cache that grows by the same bytes every token: bf16 nbytes / (2 x 64 tokens) / 4 layers
    assert got["measured_cache_bytes_per_token"] == model.kv_metrics()["kv_bytes_per_token"] == expected
    assert got["measured_cache_bytes"] == expected * 2 * 64 * 4 * 2  # float32: twice the bf16 bytes


def test_measured_cache_bytes_per_token_of_context_kv_include_the_current_chunk():
    # interval 4, up to 32 slots; a 16-token cache: 3 completed slots, the chunk's last 3 raw K/V, the
    # ContextBlock's recurrent state (context_dim 16, 4 KV heads x head_dim 8), bf16, per batch row
    model = GPT(tiny_config(AttentionConfig(kind="context", interval=4), block_size=16)).eval()
    attn = model.blocks[0].attn
    assert (attn.context_dim, attn.n_kv_heads, attn.head_dim, attn.local_window) == (16, 4, 8, 4)
    slots, chunk, state = 3 * 16, 2 * 3 * 4 * 8, 16
    by_hand = (slots + chunk + state) * 2 / 16  # per token and layer: 32.0
    got = measure_cache_bytes(model, torch.randint(0, 97, (100,)), batch_size=3)
    assert got["measured_cache_bytes_per_token"] == by_hand == 32.0
    asymptotic = model.kv_metrics()["kv_bytes_per_token"]
    assert asymptotic == 16 * 2 / 4 == 8.0 and got["measured_cache_bytes_per_token"] > asymptotic


def test_live_tensor_tracker_counts_peak_bytes():
    tracker = LiveTensorTracker()
    with tracker:
        a = torch.ones(1000, 250)  # 1,000,000 bytes
        b = a[:10]  # a view: same storage, counted once
        c = a * 2  # another 1,000,000
        del a, b, c
        d = torch.ones(10)
    assert tracker.peak == 2_000_000
    assert tracker.current == d.nbytes


def test_peak_generation_memory_covers_weights_and_cache(model):
    tokens = torch.randint(0, 257, (100,))
    got = peak_generation_memory(model, tokens, prompt_len=8, new_tokens=8)
    weights = sum(p.numel() * 4 for p in model.parameters())
    cache = model.kv_cache_bytes(batch_size=1, max_len=16, dtype=torch.float32)
    assert got["peak_memory_kind"] == "cpu_live_tensor_bytes"
    # weights + cache + at least the (1, 8, 257) float32 logits of the prefill
    assert weights + cache + 8 * 257 * 4 <= got["peak_memory_bytes"] < weights + cache + 2_000_000


def test_speed_shape_crops_to_block_size():
    assert speed_shape(1024) == (128, 128)
    assert speed_shape(64) == (32, 32)
    assert sum(speed_shape(100, 128, 64)) == 100


def test_evaluate_model_reports_contract_keys(model):
    rng = np.random.default_rng(5)
    tok = ByteTokenizer()
    docs = [_text(rng, 60) for _ in range(4)]
    tokens = np.concatenate([tok.encode(d) + [tok.eot_token] for d in docs])
    passages = cloze_set_from_documents(docs, n=8, min_context_words=5)
    corpus = HeldoutCorpus("toy", tokens, docs, passages, "toy cloze")
    got = evaluate(
        model, [corpus], tokenizer=tok, val_tokens=tokens, eval_iters=2, batch_size=2, nocache=True
    )
    assert set(CONTRACT_KEYS) <= set(got)
    assert got["heldout_loss"] == pytest.approx(heldout_loss(model, tokens, 32, batch_size=2), rel=1e-6)
    assert got["measured_cache_bytes"] == got["analytic_cache_bytes"]
    assert got["generation_toks_per_s"] > 0 and got["nocache_toks_per_s"] > 0
    details = got["corpora"]["toy"]
    assert details["word_perplexity"] == pytest.approx(
        document_perplexity(model, tok, docs, 32)["word_perplexity"], rel=1e-6
    )
    assert details["lambada_passages"] == len(passages)
    table = format_report(got)
    assert "word perplexity" in table and "cpu_live_tensor_bytes" in table


# ---- run directories and the CLI ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A saved tiny run: BPE tokenizer trained here, a dataset dir in the kvlab.data layout."""
    from kvlab.checkpoint import save_model
    from kvlab.data import train_bpe

    root = tmp_path_factory.mktemp("eval_run")
    rng = np.random.default_rng(6)
    docs = {
        split: [_text(rng, 150) for _ in range(n)] for split, n in (("train", 4), ("val", 2), ("heldout", 3))
    }
    tok = train_bpe(docs["train"], vocab_size=300)
    data = root / "data"
    data.mkdir()
    for split, texts in docs.items():
        ids = [i for t in texts for i in tok.encode(t) + [tok.eot_token]]
        np.asarray(ids, dtype=np.uint16).tofile(data / f"{split}.bin")
    with open(data / "heldout.jsonl", "w") as f:
        for i, t in enumerate(docs["heldout"]):
            f.write(json.dumps({"title": f"doc {i}", "text": t}) + "\n")
    (data / "meta.json").write_text(
        json.dumps({"dtype": "uint16", "vocab_size": 300, "tokenizer": "bpe-300"})
    )
    run = root / "run"
    model = GPT(tiny_config(VARIANTS["gqa+cla2"], vocab_size=300, block_size=64)).eval()
    save_model(run, model, {"data": {"dir": str(data)}, "train": {"eval_iters": 3, "batch_size": 2}})
    tok.save(run)
    return run


def test_kvlab_eval_json_has_the_contract_keys(run_dir, capsys):
    from kvlab.checkpoint import load_model
    from kvlab.cli import main
    from kvlab.data import heldout_documents, load_tokenizer, open_split

    assert main(["eval", str(run_dir), "--json", "--limit", "40"]) == 0
    out = capsys.readouterr().out
    got = json.loads(out)  # the whole of stdout is one JSON object
    assert set(CONTRACT_KEYS) <= set(got)
    assert got["measured_cache_bytes"] == got["analytic_cache_bytes"] > 0
    assert got["generation_toks_per_s"] > 0
    assert got["heldout_corpus"] == "heldout"
    model, data = load_model(run_dir), json.loads((run_dir / "config.json").read_text())["data"]["dir"]
    assert got["kv_bytes_per_token"] == model.kv_metrics()["kv_bytes_per_token"]
    assert got["heldout_loss"] == pytest.approx(
        heldout_loss(model, open_split(data, "heldout"), 64), rel=1e-6
    )
    tok = load_tokenizer(run_dir)
    expected = document_perplexity(model, tok, heldout_documents(data), 64)
    details = got["corpora"]["heldout"]
    assert details["word_perplexity"] == pytest.approx(expected["word_perplexity"], rel=1e-6)
    assert details["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=1e-6)
    assert 0 < details["lambada_passages"] <= 40 and 0 <= details["lambada_accuracy"] <= 1


def test_kvlab_eval_table(run_dir, capsys):
    from kvlab.cli import main

    assert main(["eval", str(run_dir), "--no-speed", "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and "word perplexity" in out and "measured cache bytes" in out


def test_kvlab_eval_errors_are_one_line(run_dir, tmp_path, capsys):
    from kvlab.cli import main

    assert main(["eval", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.json not found" in err and "\n" not in err
    assert main(["eval", str(run_dir), "--heldout", "no-such-corpus", "--no-speed"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no-such-corpus" in err and "known corpora" in err and "\n" not in err


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_batched_scoring_equals_one_request_at_a_time(name):
    """Right padding in a batch must not change any score: every structure is causal."""
    from kvlab.eval import loglikelihood_tokens

    model = GPT(tiny_config(VARIANTS[name])).eval()
    g = torch.Generator().manual_seed(8)
    requests = [
        (torch.randint(0, 97, (c,), generator=g).tolist(), torch.randint(0, 97, (k,), generator=g).tolist())
        for c, k in ((3, 2), (40, 5), (70, 9), (1, 1), (17, 30))  # (70, 9) is left-truncated to 64
    ]
    batched = loglikelihood_tokens(model, requests, max_length=64, batch_size=5)
    single = [loglikelihood_tokens(model, [r], max_length=64, batch_size=1)[0] for r in requests]
    for (a, ga), (b, gb) in zip(batched, single):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5) and ga == gb


def test_kvlab_eval_val_loss_is_the_training_val_loss(run_dir, tmp_path):
    """One definition and one sampler: eval scores the batches training scored, so the numbers agree."""
    from kvlab.eval import evaluate
    from kvlab.train import train
    from kvlab.train.checkpointing import read_metrics
    from test_train import tiny_model, tiny_train

    run = train(
        tiny_model(vocab_size=300),
        tiny_train(max_iters=4, eval_interval=4, eval_iters=3, batch_size=2),
        run_dir.parent / "data",
        tmp_path / "trained",
        progress=False,
    )
    got = evaluate(run, speed=False, limit=4)
    assert got["val_loss"] == read_metrics(run)[-1]["val_loss"]
