"""Token files: `prepare` turns a corpus into nanoGPT-style flat token files plus meta.json, and the
readers (`read_meta`, `open_split`, `heldout_documents`) and checks the trainer and evaluator call.

Layout of `<root>/datasets/<corpus>-<tokenizer>/`: train.bin, val.bin, heldout.bin (each document's
tokens followed by the EOT token; uint16 when the vocabulary fits, else uint32), heldout.jsonl (the raw
held-out documents), the tokenizer files, and meta.json, written last so its presence marks completion.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from kvlab.data.corpora import SPLITS, Corpus, corpus_name, load_corpus
from kvlab.data.fetch import DataError, data_root
from kvlab.data.tokenizers import (
    Tokenizer,
    bpe_vocab_size,
    known_tokenizer_name,
    load_tokenizer,
    tokenizer_slug,
    train_bpe,
)
from kvlab.errors import OutputError, is_disk_full, output_problem

ENCODE_BATCH = 64  # documents per encode_batch call: big enough to use every core, small enough for tqdm


def _max_id_memo(path: Path) -> Path:
    return path.with_name(f".{path.name}.maxid.json")


def write_max_id_memo(path: Path, tokens: np.ndarray) -> None:
    """Record the largest token id of a token file next to it, keyed by the file's size and mtime, so a
    training start does not rescan the file (on every start and every rank). Written by `prepare`."""
    st = path.stat()
    top = int(tokens.max()) if tokens.size else 0
    _max_id_memo(path).write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "max": top}))


def max_token_id(path: Path, tokens: np.ndarray) -> int:
    """The largest token id in `path`: from its memo when the file is unchanged, else a scan. Never
    writes (a training run, contained or on a read-only dataset, leaves the dataset as it found it)."""
    st = path.stat()
    try:
        held = json.loads(_max_id_memo(path).read_text())
        if (held.get("size"), held.get("mtime_ns")) == (st.st_size, st.st_mtime_ns):
            return int(held["max"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return int(tokens.max()) if tokens.size else 0


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits (nanoGPT's GPT-2 files), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def unigram_entropy(tokens: np.ndarray, vocab_size: int | None = None) -> float:
    """Entropy in nats of the token frequency distribution: the loss of the best context-free model."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size or 0)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def dataset_dir(corpus_or_path: str | Path = "shakespeare", tokenizer: str = "bpe-8k", root=None) -> Path:
    root = Path(root) if root is not None else data_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(output_problem(root, e)) from e
    return root / "datasets" / f"{corpus_name(corpus_or_path)}-{tokenizer_slug(tokenizer)}"


def _is_complete(directory: Path) -> bool:
    try:
        meta = read_meta(directory)
    except DataError:
        return False
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        path = directory / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != meta["splits"][split]["tokens"] * itemsize:
            return False
    return (directory / "heldout.jsonl").is_file()


def _check_tokenizer_name(name: str) -> None:
    """One line for a tokenizer name kvlab cannot make, before any corpus is fetched or read."""
    from kvlab.models import MODELS

    if not known_tokenizer_name(name):
        raise DataError(
            f"unknown tokenizer {name!r}; use gpt2, bpe-8k (any bpe-N, e.g. bpe-2048, bpe-16k), "
            f"a fetchable model's name ({', '.join(sorted(MODELS))}) or hf:DIR (an existing directory "
            "holding a model's tokenizer.json)"
        )


def _make_tokenizer(name: str, corpus: Corpus, root: Path) -> Tokenizer:
    """The tokenizer `name` (checked by prepare before the corpus was loaded) for this corpus."""
    vocab = bpe_vocab_size(name)
    if vocab is not None:  # trained on the train split only: val/heldout text never shapes the vocabulary
        return train_bpe((d.text for d in corpus.splits["train"]), vocab, name)
    # gpt2, or a pretrained model's own tokenizer (so its token files fit it; hf:DIR and fetchable models
    # are checked against the model's config.json vocab_size)
    return load_tokenizer(name, root=root)


def _write_split(path: Path, tokenizer: Tokenizer, texts: list[str], dtype: np.dtype, progress) -> np.ndarray:
    parts = []
    for start in range(0, len(texts), ENCODE_BATCH):
        batch = texts[start : start + ENCODE_BATCH]
        for ids in tokenizer.encode_batch(batch):
            parts.append(np.asarray(ids, dtype=dtype))
            parts.append(np.asarray([tokenizer.eot_token], dtype=dtype))  # nanoGPT: EOT after each document
        progress.update(sum(len(t) for t in batch))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    with open(path, "wb") as f:  # not tokens.tofile: on a full disk it raises OSError without an errno
        f.write(np.ascontiguousarray(tokens).data)
    return tokens


def prepare(
    corpus: str | Path = "shakespeare",
    tokenizer: str = "bpe-8k",
    root: str | Path | None = None,
    force: bool = False,
    verbose: bool = False,
) -> Path:
    """Build (or reuse) `<root>/datasets/<corpus>-<tokenizer>/` and return that directory."""
    root = Path(root) if root is not None else data_root()
    out = dataset_dir(corpus, tokenizer, root)
    if not force and _is_complete(out):
        return out
    _check_tokenizer_name(tokenizer)
    t0 = time.perf_counter()
    if verbose:
        print(f"loading corpus {corpus} ...", flush=True)
    docs = load_corpus(corpus, root)
    if not docs.splits["train"]:
        raise DataError(
            f"corpus {corpus!r} has no training documents (it is an evaluation corpus); "
            "use it as a held-out set (kvlab eval --heldout) or pick another --corpus"
        )
    if verbose:
        print(
            f"tokenizer {tokenizer}: "
            + ("training on the train split" if bpe_vocab_size(tokenizer) else "loading")
        )
    tok = _make_tokenizer(tokenizer, docs, root)
    tmp = out.with_name(out.name + ".partial")
    try:
        _write_dataset(tmp, out, docs, tok, verbose, t0)
    except BaseException as e:  # a full disk, no permission, Ctrl-C: no half-written dataset stays
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or is_disk_full(e):
            raise OutputError(output_problem(out, e)) from e
        raise
    return out


def _write_dataset(tmp: Path, out: Path, docs: Corpus, tok: Tokenizer, verbose: bool, t0: float) -> None:
    """Write every file into `tmp`, then rename it to `out` (meta.json last: it marks completion)."""
    from tqdm.auto import tqdm

    dtype = token_dtype(tok.vocab_size)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save(tmp)
    splits_meta, entropy = {}, None
    total_chars = sum(len(d.text) for s in SPLITS for d in docs.splits[s])
    # disable=None: a bar on a terminal only; in a log or a pipe, stderr keeps just the one error line
    bar = tqdm(
        total=total_chars, unit="char", unit_scale=True, desc="tokenizing", disable=None if verbose else True
    )
    with bar:
        try:
            for split in SPLITS:
                texts = [d.text for d in docs.splits[split]]
                tokens = _write_split(tmp / f"{split}.bin", tok, texts, dtype, bar)
                write_max_id_memo(tmp / f"{split}.bin", tokens)
                splits_meta[split] = {"tokens": int(tokens.size), "documents": len(texts)}
                if split == "train":
                    entropy = unigram_entropy(tokens, tok.vocab_size)
        except BaseException:
            bar.leave = False  # erase the bar: the error's one line is what stays on the terminal
            raise
    with open(tmp / "heldout.jsonl", "w", encoding="utf-8") as f:
        for d in docs.splits["heldout"]:
            f.write(json.dumps({"title": d.title, "text": d.text}, ensure_ascii=False) + "\n")
    meta = {
        "corpus": docs.name,
        "source": docs.source,
        "license": docs.license,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "eot_token": tok.eot_token,
        "dtype": dtype.name,
        "splits": splits_meta,
        "unigram_entropy": entropy,
        "titles": {s: [d.title for d in docs.splits[s]] for s in ("val", "heldout")},
        "prepare_seconds": round(time.perf_counter() - t0, 2),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# --- readers and checks -------------------------------------------------------------------------------


def read_meta(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / "meta.json"
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; run `kvlab data prepare` (or pass the dataset directory it printed)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); rerun `kvlab data prepare --force`") from e


def open_split(dataset_dir: str | Path, split: str, min_tokens: int = 1) -> np.memmap:
    """The split's tokens as a read-only memmap; DataError when missing or shorter than min_tokens."""
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    meta = read_meta(dataset_dir)
    path = Path(dataset_dir) / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"{path} does not exist; rerun `kvlab data prepare --force`")
    size, itemsize = path.stat().st_size, np.dtype(meta["dtype"]).itemsize
    if size % itemsize:
        raise DataError(
            f"{path} is {size} bytes, not a whole number of {meta['dtype']} tokens ({itemsize} bytes each): "
            "it is truncated or damaged; rerun `kvlab data prepare --force`"
        )
    n = size // itemsize
    check_split_length(n, min_tokens, split, path)
    recorded = meta.get("splits", {}).get(split, {}).get("tokens")
    if recorded is not None and n != recorded:
        raise DataError(
            f"{path} holds {n:,} tokens but meta.json records {recorded:,}: it is truncated or from another "
            "preparation; rerun `kvlab data prepare --force`"
        )
    return np.memmap(path, dtype=meta["dtype"], mode="r")


def check_split_length(n_tokens: int, min_tokens: int, split: str, path: str | Path = "") -> None:
    """Raise when a split is empty or too short for one training/eval window (min_tokens = block_size + 1)."""
    if n_tokens < max(1, min_tokens):
        need = f"need at least block_size+1={min_tokens}" if min_tokens > 1 else "need at least 1"
        raise DataError(
            f"split {split!r} has {n_tokens} tokens; {need} ({path}); "
            "use a larger corpus or a smaller block_size"
        )


def heldout_documents(dataset_dir: str | Path) -> list[str]:
    """The raw held-out documents (for word/byte perplexity and LAMBADA-style cloze sets)."""
    path = Path(dataset_dir) / "heldout.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist; rerun `kvlab data prepare --force`")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def check_compatible(meta: dict, vocab_size: int, tokenizer: str | None = None) -> None:
    """Token files must fit the model: every id below its vocab_size, and (if given) the same tokenizer."""
    if tokenizer is not None and tokenizer != meta["tokenizer"]:
        raise DataError(
            f"token files were made with tokenizer {meta['tokenizer']} (vocab {meta['vocab_size']}) but the "
            f"model uses tokenizer {tokenizer}; prepare the data with --tokenizer {tokenizer}"
        )
    if meta["vocab_size"] > vocab_size:
        raise DataError(
            f"token files were made with tokenizer {meta['tokenizer']} (vocab {meta['vocab_size']}) but the "
            f"model has vocab_size {vocab_size}; set model.vocab_size >= {meta['vocab_size']} "
            f"or prepare the data with a tokenizer that fits"
        )
