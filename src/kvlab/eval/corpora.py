"""What `--heldout NAME` means: the held-out text, tokens and cloze passages one corpus is scored on.

"heldout" (the default) is the run's own dataset split (heldout.bin + heldout.jsonl) with an offline
cloze set cut from it; a dataset directory works the same way; any other name is a kvlab.data corpus
(shakespeare, sotu, wikitext-2, wikitext-103, lambada, a local path), scored on its held-out split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvlab.errors import KvlabError
from kvlab.eval.cloze import cloze_set_from_documents

DEFAULT_CORPUS = "heldout"
CLOZE_SIZE = 500  # passages in the offline cloze set (LAMBADA has 5,153; 500 keeps CPU eval short)
CLOZE_MIN_CONTEXT_WORDS = 40  # LAMBADA passages average about 75 words of context


class CorpusError(KvlabError):
    """A --heldout corpus that cannot be found or used; the message lists what is available."""


@dataclass
class HeldoutCorpus:
    """One corpus to score. Any part may be None (that metric is then skipped)."""

    name: str
    tokens: np.ndarray | None = None  # token ids for heldout_loss (non-overlapping windows)
    documents: list[str] | None = None  # whole documents for rolling word/byte perplexity
    passages: list[str] | None = None  # cloze passages (context + " " + last word)
    passages_source: str = ""  # where the passages came from (real LAMBADA or an offline cloze set)
    detokenize: bool = False  # apply lm-eval's wikitext detokenizer before scoring documents
    info: dict = field(default_factory=dict)


def _data():
    try:
        import kvlab.data as data
    except ImportError as e:  # pragma: no cover - the data package ships with kvlab
        raise CorpusError(f"kvlab.data is unavailable ({e}); pass HeldoutCorpus objects to evaluate()") from e
    return data


def encode_documents(tokenizer, documents: list[str]) -> np.ndarray:
    """Documents -> one token stream, each document followed by end-of-text (as datasets are packed)."""
    eot = getattr(tokenizer, "eot_token", None)
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer.encode(doc))
        if eot is not None:
            ids.append(eot)
    return np.asarray(ids, dtype=np.int64)


def offline_cloze(
    documents: list[str], name: str, n: int = CLOZE_SIZE, seed: int = 0
) -> tuple[list[str], str]:
    passages = cloze_set_from_documents(documents, n=n, min_context_words=CLOZE_MIN_CONTEXT_WORDS, seed=seed)
    where = "the run's dataset" if name == DEFAULT_CORPUS else name
    return passages, f"offline cloze set from {where} held-out text (lambada_openai rule, seed {seed})"


def dataset_corpus(dataset_dir: str | Path, name: str, cloze_size: int = CLOZE_SIZE, seed: int = 0):
    """A prepared dataset directory: heldout.bin tokens, heldout.jsonl documents, offline cloze set."""
    data = _data()
    dataset_dir = Path(dataset_dir)
    tokens = np.asarray(data.open_split(dataset_dir, "heldout"))
    documents = list(data.heldout_documents(dataset_dir))
    passages, source = offline_cloze(documents, name, cloze_size, seed) if documents else (None, "")
    return HeldoutCorpus(
        name, tokens, documents or None, passages or None, source, info={"dir": str(dataset_dir)}
    )


def named_corpus(name: str, tokenizer, cloze_size: int = CLOZE_SIZE, seed: int = 0) -> HeldoutCorpus:
    """A kvlab.data corpus's held-out split, tokenized with the run's tokenizer."""
    data = _data()
    try:
        documents = list(data.load_documents(name, split="heldout"))
    except KvlabError as e:
        raise CorpusError(f"--heldout {name}: {e}") from e
    if not any(d.strip() for d in documents):  # blank ones are kept: lm-eval scores them too
        raise CorpusError(f"--heldout {name}: the corpus has no held-out documents")
    tokens = encode_documents(tokenizer, documents)
    if name == "lambada":  # EleutherAI/lambada_openai: every row is a passage; score it as LAMBADA
        return HeldoutCorpus(name, tokens, None, documents, "EleutherAI/lambada_openai (test)")
    passages, source = offline_cloze(documents, name, cloze_size, seed)
    return HeldoutCorpus(
        name, tokens, documents, passages or None, source, detokenize=name.startswith("wikitext")
    )


def resolve_corpus(
    name: str,
    dataset_dir: str | Path | None,
    tokenizer,
    cloze_size: int = CLOZE_SIZE,
    seed: int = 0,
    run_tokenizer: str | None = None,
) -> HeldoutCorpus:
    """--heldout NAME -> HeldoutCorpus: "heldout" = the run's dataset, a dataset dir, or a corpus name.

    run_tokenizer: the tokenizer the run was trained with (config.json data.tokenizer); a dataset
    directory tokenized by another one is refused (its token ids mean other strings)."""
    if name == DEFAULT_CORPUS:
        if dataset_dir is None:
            raise CorpusError(
                "the run's config.json names no data.dir; pass --heldout CORPUS or a dataset directory"
            )
        if not Path(dataset_dir).is_dir():
            raise CorpusError(
                f"the run's dataset {dataset_dir} is missing; re-run `kvlab data prepare` or pass "
                "--heldout CORPUS"
            )
        check_dataset_tokenizer(
            Path(dataset_dir), tokenizer, run_tokenizer, f"the run's dataset {dataset_dir}"
        )
        return dataset_corpus(dataset_dir, DEFAULT_CORPUS, cloze_size, seed)
    path = Path(name)
    if path.is_dir() and (path / "meta.json").is_file():
        check_dataset_tokenizer(path, tokenizer, run_tokenizer, f"--heldout {name}")
        return dataset_corpus(path, path.name, cloze_size, seed)
    return named_corpus(name, tokenizer, cloze_size, seed)


def check_dataset_tokenizer(path: Path, tokenizer, run_tokenizer: str | None, what: str) -> None:
    """A dataset's token ids mean the run's strings only if it was made with the run's very tokenizer: the
    recorded names must agree, and so must the tokenizers themselves where both have their files (two
    `bpe-512`s trained on different text differ)."""
    data = _data()
    made_with = data.read_meta(path).get("tokenizer")
    same = run_tokenizer is None or made_with == run_tokenizer
    if same and tokenizer is not None:
        same = data.same_tokenizer(tokenizer, path) is not False
    if not same:
        made = (
            f"a different {made_with} than the run's (same name, other vocabulary or merges)"
            if made_with == run_tokenizer
            else f"{made_with} but the run uses {run_tokenizer}"
        )
        raise CorpusError(
            f"{what} was tokenized with {made}; its token ids mean other text to this model: "
            "pass the corpus itself (--heldout NAME or a text path), which kvlab eval tokenizes with the "
            "run's tokenizer"
        )
