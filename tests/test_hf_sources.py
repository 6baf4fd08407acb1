"""Commands that take a run directory also take hf:DIR: `kvlab eval` and `kvlab generate` on a tiny random
HF Llama saved with its tokenizer give transformers' numbers; a tokenizer that does not fit its model is
one line at load (not blamed on a corpus later); `kvlab data prepare --tokenizer hf:DIR` makes token files
for it. Nothing is downloaded."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer as HFTokenizer

from kvlab import GPT
from kvlab.checkpoint import save_model
from kvlab.cli import main
from kvlab.convert.hf_load import quiet_transformers
from kvlab.data import load_documents, train_bpe

from conftest import tiny_config

VOCAB = 300  # the model's; its tokenizer has TOKENS (a vocabulary padded past the tokenizer's is fine)
TOKENS = 280
WORDS = "the quick brown fox jumps over a lazy dog while seven old owls sing of time and rain".split()


def _texts(directory):
    """A local corpus: 12 documents of random words (kvlab holds whole documents out)."""
    directory.mkdir()
    rng = random.Random(0)
    for i in range(12):
        paragraphs = (" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(3))
        (directory / f"doc{i:02d}.txt").write_text("\n\n".join(paragraphs) + "\n")
    return directory


def _tokenizer(n_tokens: int):
    """A byte-level BPE of n_tokens (the HF `tokenizers` object, as a model directory's tokenizer.json)."""
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(50)]
    return train_bpe(texts, n_tokens)._tok


def _hf_llama(directory, tokens: int = TOKENS, vocab: int = VOCAB):
    """A tiny random LlamaForCausalLM saved with save_pretrained, plus a tokenizer.json of `tokens`."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                                   max_position_embeddings=64)  # fmt: skip
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with quiet_transformers():  # no progress bar in the captured output
        hf.save_pretrained(directory)
    _tokenizer(tokens).save(str(directory / "tokenizer.json"))
    return hf


def _one_error_line(capsys, stdout: bool = False) -> str:
    """The one line on stderr (and nothing on stdout unless the command reports progress there)."""
    out, err = capsys.readouterr()
    assert (stdout or out == "") and len(err.strip().splitlines()) == 1, (out, err)
    return err.strip()


@torch.no_grad()
def test_eval_hf_dir_json_equals_transformers_loss(tmp_path, capsys):
    hf = _hf_llama(tmp_path / "llama")
    texts = _texts(tmp_path / "texts")
    assert main(["eval", f"hf:{tmp_path / 'llama'}", "--json", "--no-speed", "--heldout", str(texts)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    # The same held-out documents, encoded by the `tokenizers` library, scored by transformers' model in
    # the non-overlapping 64-token windows of max_position_embeddings.
    tok = HFTokenizer.from_file(str(tmp_path / "llama" / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    ids = [i for doc in load_documents(str(texts), split="heldout") for i in [*tok.encode(doc).ids, eot]]
    data = torch.tensor(ids)
    n = (len(data) - 1) // 64
    x, y = data[: n * 64].view(n, 64), data[1 : n * 64 + 1].view(n, 64)
    want = F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
    assert n >= 2 and metrics["corpora"][str(texts)]["heldout_tokens"] == len(ids)
    assert metrics["heldout_loss"] == pytest.approx(want, rel=1e-5)
    assert metrics["block_size"] == 64 and metrics["run_dir"] == f"hf:{tmp_path / 'llama'}"
    assert metrics["kv_bytes_per_token"] == 2 * 2 * 8 * 2  # K and V, 2 KV heads of 8 dims, bf16
    assert metrics["measured_cache_bytes"] == metrics["analytic_cache_bytes"]


def test_eval_hf_dir_without_heldout_says_what_to_pass(tmp_path, capsys):
    _hf_llama(tmp_path / "llama")
    assert main(["eval", f"hf:{tmp_path / 'llama'}", "--no-speed"]) == 2
    err = _one_error_line(capsys)
    assert "is a pretrained model with no dataset of its own; name what to score with --heldout" in err
    assert "config.json names no data.dir" not in err  # a run's message, not an HF model's


@torch.no_grad()
def test_generate_hf_dir_is_transformers_greedy_decoding(tmp_path, capsys):
    hf = _hf_llama(tmp_path / "llama")
    tok = HFTokenizer.from_file(str(tmp_path / "llama" / "tokenizer.json"))
    prompt = "the quick brown fox"
    assert main(["generate", f"hf:{tmp_path / 'llama'}", "--prompt", prompt, "--max-new-tokens", "12"]) == 0
    text, stats = capsys.readouterr().out.splitlines()
    ids = tok.encode(prompt).ids
    new = []
    for _ in range(12):  # greedy without a cache, stopping after end-of-text as kvlab does
        new.append(int(hf(torch.tensor([ids + new])).logits[0, -1].argmax()))
        if new[-1] == tok.token_to_id("<|endoftext|>"):
            break
    assert len(set(new)) > 1  # a continuation worth comparing
    assert text == prompt + tok.decode(new, skip_special_tokens=False)
    assert stats.startswith(f"[{len(new)} tokens, prefill")


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_tokenizer_larger_than_the_models_vocabulary_is_one_line_at_load(tmp_path, capsys, command):
    """A tokenizer with more tokens than vocab_size belongs to another model: ids past the embeddings.
    Before, eval ran until a corpus held id >= vocab_size and blamed the corpus."""
    _hf_llama(tmp_path / "llama", tokens=TOKENS, vocab=270)
    args = {
        "eval": ["--no-speed", "--heldout", str(_texts(tmp_path / "texts"))],
        "generate": ["--prompt", "x"],
    }
    assert main([command, f"hf:{tmp_path / 'llama'}", *args[command]]) == 2
    err = _one_error_line(capsys)
    where = tmp_path / "llama"
    assert err.endswith(
        f"{where}: its tokenizer has 280 tokens but the model's vocabulary has 270 (vocab_size), so the "
        f"tokenizer belongs to another model; put the model's own tokenizer files in {where}"
    ), err
    assert "corpus" not in err


def test_export_refuses_a_tokenizer_that_does_not_fit_and_writes_nothing(tmp_path, capsys):
    _hf_llama(tmp_path / "llama", tokens=TOKENS, vocab=270)
    for fmt in ("hf", "kvlab"):
        assert main(["export", f"hf:{tmp_path / 'llama'}", "--format", fmt, str(tmp_path / fmt)]) == 2
        assert "its tokenizer has 280 tokens but the model's vocabulary has 270" in _one_error_line(capsys)
        assert not (tmp_path / fmt).exists()
    _tokenizer(260).save(str(tmp_path / "llama" / "tokenizer.json"))  # one that fits: exported with it
    assert main(["export", f"hf:{tmp_path / 'llama'}", "--format", "hf", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (
        tmp_path / "llama" / "tokenizer.json"
    ).read_bytes()


def test_run_whose_tokenizer_differs_from_its_training_data_is_one_line(tmp_path, capsys):
    """In a run directory the tokenizer must be the one its data was made with (config.json data.vocab_size),
    even when it is smaller than the model's vocabulary."""
    run = tmp_path / "run"
    save_model(
        run, GPT(tiny_config("gqa", vocab_size=320)), {"data": {"tokenizer": "bpe-300", "vocab_size": 300}}
    )
    train_bpe([" ".join(WORDS)] * 20, 270, "bpe-270").save(run)  # another tokenizer copied over the run's
    assert main(["generate", str(run), "--prompt", "the fox"]) == 2
    err = _one_error_line(capsys)
    assert (
        "its tokenizer has 270 tokens but the run was trained on data tokenized with bpe-300 (300 tokens)"
        in err
    )
    assert "restore the run's tokenizer from its dataset" in err
    train_bpe([" ".join(WORDS)] * 20, 300, "bpe-300").save(run)  # the right size: generates
    assert main(["generate", str(run), "--prompt", "the fox", "--max-new-tokens", "3"]) == 0


def test_data_prepare_with_an_hf_dirs_tokenizer(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KVLAB_DATA", str(tmp_path / "data"))
    _hf_llama(tmp_path / "llama")
    texts = _texts(tmp_path / "texts")
    assert main(["data", "prepare", "--corpus", str(texts), "--tokenizer", f"hf:{tmp_path / 'llama'}"]) == 0
    (dataset,) = (tmp_path / "data" / "datasets").iterdir()
    assert dataset.name.startswith("texts-") and "-hf-llama-" in dataset.name  # no slashes from the path
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["tokenizer"] == f"hf:{(tmp_path / 'llama').resolve()}" and meta["vocab_size"] == TOKENS
    tok = HFTokenizer.from_file(str(tmp_path / "llama" / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    want = [i for doc in load_documents(str(texts), split="heldout") for i in [*tok.encode(doc).ids, eot]]
    assert np.fromfile(dataset / "heldout.bin", dtype=np.uint16).tolist() == want
    capsys.readouterr()
    # A tokenizer larger than its model's vocabulary is refused before anything is written.
    _hf_llama(tmp_path / "small", tokens=TOKENS, vocab=260)
    assert main(["data", "prepare", "--corpus", str(texts), "--tokenizer", f"hf:{tmp_path / 'small'}"]) == 2
    err = _one_error_line(capsys, stdout=True)
    assert "tokenizer.json has 280 tokens but the model's vocab_size is 260 (config.json)" in err
    assert [d.name for d in (tmp_path / "data" / "datasets").iterdir()] == [dataset.name]


def test_hf_tokenizer_without_endoftext_uses_the_models_eos(tmp_path, capsys):
    """A Llama-style tokenizer ends text with </s>, the model's eos_token_id, not <|endoftext|>."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from kvlab.data import load_tokenizer

    _hf_llama(tmp_path / "llama")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=270, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=alphabet, show_progress=False)  # fmt: skip
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer=trainer)
    tok.save(str(tmp_path / "llama" / "tokenizer.json"))
    assert load_tokenizer(tmp_path / "llama").eot_token == 2 == tok.token_to_id("</s>")
    assert load_tokenizer(f"hf:{tmp_path / 'llama'}").eot_token == 2
    assert main(["generate", f"hf:{tmp_path / 'llama'}", "--prompt", "the fox", "--max-new-tokens", "3"]) == 0
