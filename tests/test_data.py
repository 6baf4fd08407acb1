"""kvlab.data: token files and meta, whole-document splits, tokenizers, local corpora and clear errors.

Every corpus here is written to tmp_path by the test; nothing is downloaded (the GPT-2 test skips when no
vocabulary file is on this machine, and the Shakespeare test skips when the corpus was never fetched).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from kvlab.cli import main
from kvlab.data import (
    DataError,
    Document,
    check_compatible,
    check_split_length,
    gpt2_vocab_file,
    heldout_documents,
    load_corpus,
    load_documents,
    load_tokenizer,
    open_split,
    prepare,
    read_meta,
    split_documents,
    token_dtype,
    train_bpe,
    unigram_entropy,
)
from kvlab.data import tokenfiles as tokenfiles_module
from kvlab.data.corpora import clean_text
from kvlab.data.files import group_wikitext
from kvlab.data.tokenizers import bpe_vocab_size

WORDS = "the king queen crown sword night day love death fair foul speak hath doth thou art my lord".split()


def _text(rng: random.Random, n_lines: int) -> str:
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "."
        for _ in range(n_lines)
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus_dir(tmp_path, monkeypatch):
    """24 small works (a few KB in all) with distinct first lines, so every document is unique."""
    monkeypatch.setenv("KVLAB_DATA", str(tmp_path / "root"))
    rng = random.Random(0)
    folder = tmp_path / "works"
    folder.mkdir()
    for i in range(24):
        (folder / f"work_{i:02d}.txt").write_text(f"WORK NUMBER {i}\n\n" + _text(rng, 12))
    return folder


@pytest.fixture
def prepared(corpus_dir, tmp_path):
    return prepare(corpus_dir, "bpe-300", root=tmp_path / "root")


def _documents_in(tokens: np.ndarray, eot: int) -> list[np.ndarray]:
    ends = np.flatnonzero(tokens == eot)
    return np.split(tokens, ends + 1)[:-1]


def test_prepare_writes_files_whose_counts_match_meta(prepared, corpus_dir):
    meta = read_meta(prepared)
    assert prepared.name.startswith("works-") and prepared.name.endswith("-bpe-300")
    assert meta["tokenizer"] == "bpe-300" and meta["vocab_size"] == 300 and meta["dtype"] == "uint16"
    assert sum(s["documents"] for s in meta["splits"].values()) == 24
    for split, info in meta["splits"].items():
        tokens = open_split(prepared, split)
        assert tokens.dtype == np.uint16 and len(tokens) == info["tokens"]
        # one EOT after every document, and nowhere else
        assert (
            tokens[-1] == meta["eot_token"] and int((tokens == meta["eot_token"]).sum()) == info["documents"]
        )
        assert int(tokens.max()) < 300
    assert meta["splits"]["val"]["documents"] >= 1 and meta["splits"]["heldout"]["documents"] >= 1


def test_token_files_decode_to_the_documents_and_heldout_never_in_train(prepared, corpus_dir):
    tok = load_tokenizer(prepared)
    originals = {clean_text(p.read_text()) for p in corpus_dir.glob("*.txt")}
    decoded = {
        split: [
            tok.decode(d[:-1].tolist()) for d in _documents_in(np.asarray(open_split(prepared, split)), 0)
        ]
        for split in ("train", "val", "heldout")
    }
    assert set(decoded["train"]) | set(decoded["val"]) | set(decoded["heldout"]) == originals
    assert set(heldout_documents(prepared)) == set(decoded["heldout"])
    assert not set(decoded["heldout"]) & set(decoded["train"])
    assert not set(decoded["val"]) & (set(decoded["train"]) | set(decoded["heldout"]))
    meta = read_meta(prepared)
    titles = [json.loads(line)["title"] for line in (prepared / "heldout.jsonl").read_text().splitlines()]
    assert titles == meta["titles"]["heldout"]


def test_unigram_entropy_matches_numpy(prepared):
    tokens = np.asarray(open_split(prepared, "train")).astype(np.int64)
    p = np.unique(tokens, return_counts=True)[1] / tokens.size
    expected = float(-(p * np.log(p)).sum())
    assert read_meta(prepared)["unigram_entropy"] == pytest.approx(expected, rel=1e-12)
    assert unigram_entropy(np.array([1, 1, 2, 3])) == pytest.approx(-(0.5 * np.log(0.5) + 0.5 * np.log(0.25)))


def test_prepare_reuses_a_complete_dataset_and_force_rebuilds(prepared, corpus_dir, tmp_path):
    stamp = (prepared / "meta.json").stat().st_mtime_ns
    assert prepare(corpus_dir, "bpe-300", root=tmp_path / "root") == prepared
    assert (prepared / "meta.json").stat().st_mtime_ns == stamp
    (prepared / "val.bin").write_bytes(b"")  # damaged: no longer complete, so it is rebuilt
    prepare(corpus_dir, "bpe-300", root=tmp_path / "root")
    assert len(open_split(prepared, "val")) == read_meta(prepared)["splits"]["val"]["tokens"] > 0


def test_bpe_trains_to_requested_size_roundtrips_and_saves(tmp_path):
    texts = [_text(random.Random(i), 30) for i in range(4)]
    tok = train_bpe(texts, 320, "bpe-320")
    assert tok.vocab_size == 320 and tok.eot_token == 0
    sample = "Thou art my lord, hath the KING spoken?  Ünïcode ✓\n\tdone"
    assert tok.decode(tok.encode(sample)) == sample  # byte-level: lossless even for unseen characters
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 2  # merges were learned
    restored = load_tokenizer(tok.save(tmp_path / "run"))
    assert (restored.name, restored.vocab_size, restored.eot_token) == ("bpe-320", 320, 0)
    assert restored.encode_batch(texts) == tok.encode_batch(texts)
    assert (bpe_vocab_size("bpe-8k"), bpe_vocab_size("bpe-2048"), bpe_vocab_size("gpt2")) == (
        8192,
        2048,
        None,
    )


class _WideTokenizer:
    """A stand-in with a vocabulary over 2**16: ids are code points + 66000."""

    name, vocab_size, eot_token = "wide", 70000, 69999

    def encode_batch(self, texts):
        return [[ord(c) + 66000 for c in t] for t in texts]

    def save(self, directory):
        return directory


def test_dtype_is_uint16_when_vocab_fits_else_uint32(corpus_dir, tmp_path, monkeypatch):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    monkeypatch.setattr(tokenfiles_module, "_make_tokenizer", lambda name, corpus, root: _WideTokenizer())
    monkeypatch.setattr(tokenfiles_module, "_check_tokenizer_name", lambda name: None)  # a test-only name
    out = prepare(corpus_dir, "wide", root=tmp_path / "root")
    meta = read_meta(out)
    tokens = open_split(out, "train")
    assert meta["dtype"] == "uint32" and tokens.dtype == np.uint32
    assert (out / "train.bin").stat().st_size == 4 * meta["splits"]["train"]["tokens"]
    assert int(tokens[0]) == ord("W") + 66000  # ids above 65535 survive


def test_split_documents_holds_out_whole_documents_deterministically():
    docs = [Document(f"doc {i}", "x" * (100 + 10 * i)) for i in range(40)]
    a, b = split_documents(docs), split_documents(list(reversed(docs)))
    # the same documents land in the same split whatever the input order
    assert {s: {d.title for d in v} for s, v in a.items()} == {s: {d.title for d in v} for s, v in b.items()}
    titles = [d.title for s in a.values() for d in s]
    assert sorted(titles) == sorted(d.title for d in docs)  # a partition: nothing lost, nothing doubled
    total = sum(len(d.text) for d in docs)
    for split in ("val", "heldout"):
        share = sum(len(d.text) for d in a[split]) / total
        assert 0.05 <= share <= 0.10


def test_single_file_is_cut_at_blank_lines(tmp_path):
    rng = random.Random(1)
    novel = tmp_path / "novel.txt"
    novel.write_text("\n\n".join(_text(rng, 4) for _ in range(60)))
    corpus = load_corpus(novel, root=tmp_path)
    assert all(corpus.splits[s] for s in ("train", "val", "heldout"))
    joined = "".join(d.text for s in corpus.splits.values() for d in s)
    assert len(joined.split()) == len(novel.read_text().split())


def test_clean_text_strips_gutenberg_boilerplate():
    raw = (
        "Licence blah\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n"
        "To be.\r\n*** END OF THE PROJECT GUTENBERG EBOOK\r\nmore licence"
    )
    assert clean_text(raw) == "To be.\n"


WIKI_ROWS = [
    "",
    " = Alpha = \n",
    "",
    " Alpha is a letter . \n",
    " = = History = = \n",
    " It came first . \n",
    " = Beta = \n",
    " Beta follows . \n",
]


def test_group_wikitext_splits_at_level_one_headings_only():
    docs = group_wikitext(WIKI_ROWS)
    assert [d.title for d in docs] == ["Alpha", "Beta"]
    assert docs[0].text == " = Alpha = \n\n Alpha is a letter . \n = = History = = \n It came first . \n"


def test_local_parquet_arrow_and_jsonl_shaped_like_hub_datasets(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "wikitext-2-raw-v1"
    folder.mkdir()
    pq.write_table(pa.table({"text": WIKI_ROWS * 3}), folder / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": WIKI_ROWS}), folder / "validation-00000-of-00001.parquet")
    table = pa.table({"text": WIKI_ROWS[:4]})
    with pa.ipc.new_stream(str(folder / "test.arrow"), table.schema) as writer:  # HF cache arrow format
        writer.write_table(table)
    corpus = load_corpus(folder, root=tmp_path)
    assert [len(corpus.splits[s]) for s in ("train", "val", "heldout")] == [6, 2, 1]
    assert load_documents(folder, split="heldout", root=tmp_path) == [
        " = Alpha = \n\n Alpha is a letter . \n"
    ]

    lambada = tmp_path / "lambada_test_en.jsonl"
    passages = ["he looked at the door and said goodbye", "she opened the box and found a ring"]
    lambada.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    assert load_documents(lambada, root=tmp_path) == passages


def test_train_only_files_hold_out_whole_train_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [row for i in range(30) for row in (f" = Article {i} = \n", f" Body of article {i} . \n")]
    pq.write_table(pa.table({"text": rows}), tmp_path / "train-00000.parquet")
    splits = load_corpus(tmp_path / "train-00000.parquet", root=tmp_path).splits
    titles = {s: {d.title for d in v} for s, v in splits.items()}
    assert all(titles.values()) and sum(map(len, titles.values())) == 30
    assert not (titles["train"] & titles["val"] or titles["train"] & titles["heldout"])


def test_errors_are_clear(tmp_path, corpus_dir):
    with pytest.raises(DataError, match=r"unknown corpus 'shakespear'.*shakespeare, sotu, wikitext-2"):
        load_documents("shakespear", root=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_documents(tmp_path / "missing.txt", root=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt"):
        load_documents(tmp_path / "empty", root=tmp_path)
    with pytest.raises(DataError, match="meta.json does not exist"):
        open_split(tmp_path / "empty", "train")
    with pytest.raises(DataError, match=r"split 'val' has 40 tokens; need at least block_size\+1=65"):
        check_split_length(40, 65, "val")
    with pytest.raises(DataError, match="unknown tokenizer"):
        prepare(corpus_dir, "wordpiece", root=tmp_path / "root")
    with pytest.raises(DataError, match="trained per dataset"):
        load_tokenizer("bpe-8k")
    meta = {"tokenizer": "bpe-8k", "vocab_size": 8192}
    check_compatible(meta, 8192)
    with pytest.raises(
        DataError, match="tokenizer bpe-8k \\(vocab 8192\\) but the model has vocab_size 4096"
    ):
        check_compatible(meta, 4096)
    with pytest.raises(DataError, match="model uses tokenizer gpt2"):
        check_compatible(meta, 50304, tokenizer="gpt2")


def test_unreachable_hub_says_to_pass_a_local_path(tmp_path, monkeypatch):
    from kvlab.data import files

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(files, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataError, match="hub is unreachable, so Salesforce/wikitext .*pass a local path"):
        load_documents("wikitext-2", split="heldout", root=tmp_path)


def test_open_split_refuses_empty_and_too_short(prepared):
    n = read_meta(prepared)["splits"]["val"]["tokens"]
    with pytest.raises(DataError, match=rf"split 'val' has {n} tokens; need at least block_size\+1={n + 1}"):
        open_split(prepared, "val", min_tokens=n + 1)
    (prepared / "heldout.bin").write_bytes(b"")
    with pytest.raises(DataError, match="split 'heldout' has 0 tokens"):
        open_split(prepared, "heldout")


def test_cli_prepare_prints_summary_and_errors_in_one_line(corpus_dir, tmp_path, capsys):
    root = str(tmp_path / "root")
    assert (
        main(["data", "prepare", "--corpus", str(corpus_dir), "--tokenizer", "bpe-300", "--root", root]) == 0
    )
    out = capsys.readouterr().out
    meta = read_meta(next((tmp_path / "root" / "datasets").iterdir()))
    assert f"{meta['splits']['train']['tokens']:,} tokens" in out and "vocab 300" in out
    assert f"{meta['unigram_entropy']:.3f} nats" in out
    assert main(["data", "prepare", "--corpus", "nosuchcorpus", "--root", root]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvlab: error: unknown corpus 'nosuchcorpus'") and "\n" not in err


def test_gpt2_tokenizer_exact_ids(tmp_path):
    path = gpt2_vocab_file(download=False)
    if path is None:
        pytest.skip("no GPT-2 vocabulary on this machine (run `kvlab data prepare --tokenizer gpt2` once)")
    tok = load_tokenizer("gpt2")
    assert (tok.vocab_size, tok.eot_token) == (50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the<|endoftext|>") == [262, 27, 91, 437, 1659, 5239, 91, 29]  # plain text, not EOT
    text = "To be, or not to be: that is the question.\n  Ünïcode ✓"
    assert tok.decode(tok.encode(text)) == text
    restored = load_tokenizer(tok.save(tmp_path / "run"))
    assert restored.encode_batch([text, "Hello world"]) == [tok.encode(text), [15496, 995]]


def test_real_shakespeare_when_cached(monkeypatch):
    from kvlab.data import data_root

    if not (data_root() / "corpora" / "shakespeare" / ".complete").exists():
        pytest.skip("the Shakespeare corpus was never fetched here (run `kvlab data prepare` once)")
    corpus = load_corpus("shakespeare")
    splits = corpus.splits
    assert sum(len(v) for v in splits.values()) == 42
    assert "Hamlet" in {d.title for d in splits["train"]} | {d.title for d in splits["val"]} | {
        d.title for d in splits["heldout"]
    }
    total = sum(len(d.text) for v in splits.values() for d in v)
    for split in ("val", "heldout"):
        assert 0.05 <= sum(len(d.text) for d in splits[split]) / total <= 0.10
