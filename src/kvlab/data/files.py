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


def _split_of(path: Path) -> str:
    """train-0000.parquet -> train, wiki.valid.arrow -> val, lambada_test_en.jsonl -> heldout, else all."""
    m = re.search(r"(?:^|[^a-z])(train|valid|validation|val|dev|test)(?:[^a-z]|$)", path.name.lower())
    return {"train": "train", "test": "heldout"}.get(m.group(1), "val") if m else "all"


def _read_text_column(path: Path) -> list[str]:
    """The "text" column of a parquet, arrow (HF cache stream or IPC file) or JSON-lines file."""
    try:
        import pyarrow as pa
        import pyarrow.json as pa_json
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading {path} needs pyarrow; pip install pyarrow (or kvlab[hf])") from e
    try:
        if path.suffix == ".parquet":
            table = pq.read_table(path, columns=None)
        elif path.suffix == ".arrow":
            with pa.memory_map(str(path)) as source:
                try:
                    table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    source.seek(0)
                    table = pa.ipc.open_file(source).read_all()
        else:
            table = pa_json.read_json(path)
    except (pa.ArrowException, OSError) as e:  # corrupt or foreign file: one clear line
        raise DataError(f"could not read {path} as {path.suffix[1:]} ({type(e).__name__}: {e})") from e
    if "text" not in table.column_names:
        raise DataError(f"{path} has columns {table.column_names}; kvlab needs a 'text' column")
    return table.column("text").to_pylist()


def _read_text_file(path: Path) -> str:
    """UTF-8 text (a stray bad byte is replaced); a binary file is refused instead of read as one document."""
    data = path.read_bytes()
    if b"\0" in data[:65536]:
        raise DataError(
            f"{path} is a binary file, not text; pass a UTF-8 .txt file, a folder of them, or a "
            ".parquet/.arrow/.jsonl table with a text column"
        )
    return data.decode("utf-8", errors="replace")


def load_local(path: Path) -> list[Document] | dict[str, list[Document]]:
    """Documents of a local file or folder; split-named tabular files (train-*, test-*) give their splits."""
    if path.is_file():
        if path.suffix in TABULAR:
            docs = rows_to_documents(_read_text_column(path), path.stem)
            split = _split_of(path)
            return docs if split == "all" else {split: docs}
        return [Document(path.stem, clean_text(_read_text_file(path)))]
    tables = sorted(p for p in path.rglob("*") if p.suffix in TABULAR and p.is_file())
    if tables:
        splits: dict[str, list[Document]] = {}
        for table in tables:
            docs = rows_to_documents(_read_text_column(table), table.stem)
            splits.setdefault(_split_of(table), []).extend(docs)
        return splits if set(splits) != {"all"} else splits["all"]
    texts = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not texts:
        raise DataError(
            f"folder {path} holds no .txt, .parquet, .arrow or .jsonl files; add some or pass a file"
        )
    return [
        Document(
            str(p.relative_to(path).with_suffix("")),
            clean_text(_read_text_file(p)),
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
