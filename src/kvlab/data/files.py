"""Documents from local files and from the Hugging Face hub (when one is reachable).

Local: a .txt file (one document), a folder of .txt files (one document each), or parquet/arrow/jsonl
files with a "text" column shaped like the hub datasets (a folder of `train-*`, `validation-*`, `test-*`
files keeps those splits). WikiText rows are lines; they are grouped into articles at the level-1
" = Title = " headings, as lm-eval's document-level WikiText does, because word perplexity is per article.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from kvlab.data.corpora import Document, clean_text
from kvlab.data.fetch import DataError

TABULAR = (".parquet", ".arrow", ".jsonl", ".json")
# " = Valkyria Chronicles III = " starts an article; " = = Gameplay = = " is a section inside it
WIKITEXT_HEADING = re.compile(r"^ = [^=].* = \n?$")
SPLIT_BY_FILE_NAME = (("train", "train"), ("valid", "val"), ("dev", "val"), ("test", "heldout"))


def group_wikitext(rows: list[str]) -> list[Document]:
    """WikiText line rows -> one Document per article (heading line included, text as in the raw file)."""
    docs, title, lines = [], None, []
    for row in rows:
        if WIKITEXT_HEADING.match(row):
            if title is not None or "".join(lines).strip():
                docs.append(Document(title or "(preamble)", "".join(lines)))
            title, lines = row.strip(" =\n"), []
        lines.append(row if row.endswith("\n") else row + "\n")
    if title is not None or "".join(lines).strip():
        docs.append(Document(title or "(preamble)", "".join(lines)))
    return docs


def rows_to_documents(rows: list[str], name: str) -> list[Document]:
    """Rows of a "text" column: WikiText-shaped line rows are grouped into articles, else row = document."""
    if any(WIKITEXT_HEADING.match(r) for r in rows[:2000]):
        return group_wikitext(rows)
    return [Document(f"{name}[{i}]", r) for i, r in enumerate(rows) if r.strip()]


def _read_text_column(path: Path) -> list[str]:
    import datasets  # lazy: heavy import, only needed for tabular files

    try:
        if path.suffix == ".parquet":
            ds = datasets.Dataset.from_parquet(str(path))
        elif path.suffix == ".arrow":
            ds = datasets.Dataset.from_file(str(path))
        else:
            ds = datasets.Dataset.from_json(str(path))
    except Exception as e:  # corrupt or foreign file: one clear line
        raise DataError(f"could not read {path} as {path.suffix[1:]} ({type(e).__name__}: {e})") from e
    if "text" not in ds.column_names:
        raise DataError(f"{path} has columns {ds.column_names}; kvlab needs a 'text' column")
    return list(ds["text"])


def load_local(path: Path) -> list[Document] | dict[str, list[Document]]:
    """Documents of a local file or folder; a folder of split-named tabular files returns its splits."""
    if path.is_file():
        if path.suffix in TABULAR:
            return rows_to_documents(_read_text_column(path), path.stem)
        return [Document(path.stem, clean_text(path.read_text(encoding="utf-8", errors="replace")))]
    tables = sorted(p for p in path.rglob("*") if p.suffix in TABULAR and p.is_file())
    if tables:
        splits: dict[str, list[Document]] = {}
        for table in tables:
            split = next((s for key, s in SPLIT_BY_FILE_NAME if key in table.name.lower()), "all")
            splits.setdefault(split, []).extend(rows_to_documents(_read_text_column(table), table.stem))
        return splits if set(splits) != {"all"} else splits["all"]
    texts = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not texts:
        raise DataError(
            f"folder {path} holds no .txt, .parquet, .arrow or .jsonl files; add some or pass a file"
        )
    return [
        Document(
            str(p.relative_to(path).with_suffix("")),
            clean_text(p.read_text(encoding="utf-8", errors="replace")),
        )
        for p in texts
    ]


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an unreachable hub fails in seconds instead of after long retries."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hub_dataset(
    path: str, config: str | None, splits: dict[str, str], limit: int | None = None
) -> dict[str, list[Document]]:
    """Hugging Face dataset splits (ours -> theirs) as documents; offline mode reads the local HF cache."""
    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    if not offline and not hub_reachable():
        raise DataError(
            f"the Hugging Face hub is unreachable, so {path} cannot be downloaded; pass a local path instead "
            "(parquet/arrow/jsonl files with a 'text' column, "
            "e.g. a folder of train-/validation-/test-*.parquet)"
        )
    import datasets

    out = {}
    for ours, theirs in splits.items():
        try:
            if limit is None:
                rows = list(datasets.load_dataset(path, config, split=theirs)["text"])
            else:  # stream: never download the whole corpus
                stream = datasets.load_dataset(path, config, split=theirs, streaming=True)
                rows = [r["text"] for _, r in zip(range(limit), stream)]
        except Exception as e:
            raise DataError(
                f"could not load {path} ({config}) split {theirs!r}: {type(e).__name__}: {e}"
            ) from e
        out[ours] = rows_to_documents(rows, f"{path}:{theirs}")
    return out
