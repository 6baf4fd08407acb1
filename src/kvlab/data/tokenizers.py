"""Tokenizers: exact GPT-2 BPE (tiktoken) and byte-level BPE trained per dataset (HF `tokenizers`).

Both expose `.name`, `.vocab_size`, `.eot_token`, `.encode`, `.encode_batch`, `.decode` and `.save(dir)`;
`load_tokenizer(dir)` restores what `.save` wrote (the trainer saves the tokenizer into each run directory).
The GPT-2 vocabulary comes from the tiktoken cache when present, else from the PyPI sdist of
openai-whisper (`whisper/assets/gpt2.tiktoken`, same bytes as tiktoken's r50k_base), fetched once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from kvlab.data.fetch import DataError, data_root, fetch_pypi_sdist

EOT = "<|endoftext|>"
DESCRIPTOR = "tokenizer_meta.json"  # {"type": "tiktoken"|"bpe", "name": ...} next to the vocabulary file
GPT2_FILE = "gpt2.tiktoken"
# sha256 of r50k_base.tiktoken (tiktoken_ext.openai_public), which is the GPT-2 vocabulary
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
# tiktoken's GPT-2 split pattern (r50k_pat_str)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class Tokenizer:
    """The interface every kvlab tokenizer implements."""

    name: str
    vocab_size: int
    eot_token: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 of what decides the encodings (vocabulary, merges, pre-tokenizer), not of the name."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = f"name={self.name!r}, vocab_size={self.vocab_size}, eot_token={self.eot_token}"
        return f"{type(self).__name__}({fields})"


class TiktokenTokenizer(Tokenizer):
    """Exact GPT-2 BPE: 50257 tokens, `<|endoftext|>` = 50256."""

    def __init__(self, ranks_file: Path, name: str = "gpt2"):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        self.ranks_file = Path(ranks_file)
        ranks = load_tiktoken_bpe(str(self.ranks_file))
        self._enc = tiktoken.Encoding(
            name,
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOT: len(ranks)},
            explicit_n_vocab=len(ranks) + 1,
        )
        self.name, self.vocab_size, self.eot_token = name, self._enc.n_vocab, self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(
            text
        )  # document text is plain text, even if it spells "<|endoftext|>"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / GPT2_FILE).resolve() != self.ranks_file.resolve():
            shutil.copyfile(self.ranks_file, directory / GPT2_FILE)
        _write_descriptor(
            directory, {"type": "tiktoken", "name": self.name, "file": GPT2_FILE, **self._info()}
        )
        return directory

    def _info(self) -> dict:
        return {"vocab_size": self.vocab_size, "eot_token": self.eot_token}

    def fingerprint(self) -> str:
        return hashlib.sha256(f"tiktoken:{GPT2_PATTERN}:{_sha256(self.ranks_file)}".encode()).hexdigest()


class BPETokenizer(Tokenizer):
    """Byte-level BPE from HF `tokenizers` (lossless on any text); `<|endoftext|>` is token 0."""

    def __init__(self, tokenizer, name: str, eot_token: int | None = None):
        """eot_token: the end-of-text id when the vocabulary has no <|endoftext|> (a Llama tokenizer's
        </s>: its model's eos_token_id)."""
        self._tok = tokenizer
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        eot = tokenizer.token_to_id(EOT)
        eot = eot_token if eot is None else eot
        if eot is None:
            raise DataError(
                f"tokenizer {name!r} has no {EOT} token; retrain it with kvlab data prepare --force"
            )
        self.eot_token = eot

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        info = {"vocab_size": self.vocab_size, "eot_token": self.eot_token}
        _write_descriptor(directory, {"type": "bpe", "name": self.name, "file": "tokenizer.json", **info})
        return directory

    def fingerprint(self) -> str:
        # Re-serialised by this `tokenizers` version (a file written by another one hashes the same);
        # truncation and padding are call settings, not the tokenizer.
        spec = json.loads(self._tok.to_str())
        for setting in ("truncation", "padding"):
            spec.pop(setting, None)
        return hashlib.sha256(("bpe:" + json.dumps(spec, sort_keys=True)).encode()).hexdigest()


def holds_tokenizer(directory: str | Path) -> bool:
    """Whether `directory` (a dataset or run directory) has tokenizer files that load_tokenizer reads."""
    d = Path(directory)
    return any((d / name).is_file() for name in (DESCRIPTOR, "tokenizer.json", GPT2_FILE))


def same_tokenizer(a: Tokenizer | str | Path, b: Tokenizer | str | Path) -> bool | None:
    """Whether a and b (tokenizers, or directories holding one) are the same tokenizer: compared by what
    they encode with (`fingerprint`), so two different `bpe-512`s differ. None: a directory holds no
    tokenizer files, so only the names recorded in meta.json / config.json can be compared."""
    prints = []
    for t in (a, b):
        if not isinstance(t, Tokenizer):
            if not isinstance(t, (str, Path)) or not holds_tokenizer(t):
                return None
            t = load_tokenizer(t)
        try:
            prints.append(t.fingerprint())
        except NotImplementedError:  # a user's own Tokenizer subclass: nothing to compare by content
            return None
    return prints[0] == prints[1]


def _write_descriptor(directory: Path, info: dict) -> None:
    (directory / DESCRIPTOR).write_text(json.dumps(info, indent=2) + "\n")


def bpe_vocab_size(name: str) -> int | None:
    """'bpe-8k' -> 8192, 'bpe-2048' -> 2048; None when name is not a bpe-N name."""
    m = re.fullmatch(r"bpe-(\d+)(k?)", name)
    return int(m.group(1)) * (1024 if m.group(2) else 1) if m else None


def known_tokenizer_name(name: object) -> bool:
    """Whether `kvlab data prepare --tokenizer NAME` can make this tokenizer: gpt2, bpe-N, a fetchable
    model's name or hf:DIR naming an existing directory (checked before any corpus is fetched)."""
    from kvlab.models import MODELS

    return isinstance(name, str) and (
        name == "gpt2" or bpe_vocab_size(name) is not None or name in MODELS
        or (name.startswith("hf:") and Path(name[3:]).expanduser().is_dir())
    )  # fmt: skip


def train_bpe(texts: Iterable[str], vocab_size: int, name: str | None = None) -> BPETokenizer:
    """Train a byte-level BPE of exactly vocab_size tokens (256 bytes + EOT + merges) on texts."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise DataError(
            f"bpe vocab_size={vocab_size} is too small; a byte-level BPE needs at least 258 tokens"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok, name or f"bpe-{vocab_size}")


# --- the GPT-2 vocabulary file ------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tiktoken_cache_file() -> Path | None:
    """r50k_base.tiktoken in tiktoken's own cache (same bytes as GPT-2's vocabulary), if it is there."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    cache_dir = Path(cache) if cache else Path(tempfile.gettempdir()) / "data-gym-cache"
    path = cache_dir / hashlib.sha1(R50K_URL.encode()).hexdigest()
    return path if path.is_file() else None


def gpt2_vocab_file(root: str | Path | None = None, download: bool = True) -> Path | None:
    """The GPT-2 ranks file under the data root; copied from the tiktoken cache or fetched from PyPI once.

    With download=False returns None when no local copy exists (tests use this to skip, never to fetch).
    """
    root = Path(root) if root is not None else data_root()
    target = root / "tokenizers" / GPT2_FILE
    if target.is_file():
        return target
    source = _tiktoken_cache_file()
    if source is None:
        if not download:
            return None
        assets = fetch_pypi_sdist(
            "openai-whisper==20250625",
            ["whisper/assets/gpt2.tiktoken"],
            root / "tokenizers" / "whisper-assets",
        )
        source = assets / GPT2_FILE
    if _sha256(source) != GPT2_SHA256:
        raise DataError(f"{source} is not the GPT-2 vocabulary (sha256 mismatch); delete it and retry")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)
    return target


def load_tokenizer(name_or_dir: str | Path, root: str | Path | None = None) -> Tokenizer:
    """ "gpt2", a pretrained model's name (`smollm2-135m`, fetched once) or `hf:DIR` (its
    tokenizer.json), or a directory a tokenizer was saved to (a dataset or run directory)."""
    path = Path(name_or_dir)
    if str(name_or_dir) == "gpt2":
        return TiktokenTokenizer(gpt2_vocab_file(root))
    if path.is_dir():
        info = {}
        if (path / DESCRIPTOR).is_file():
            info = json.loads((path / DESCRIPTOR).read_text())
        if info.get("type") == "tiktoken" or (not info and (path / GPT2_FILE).is_file()):
            return TiktokenTokenizer(path / info.get("file", GPT2_FILE), info.get("name", "gpt2"))
        if (path / info.get("file", "tokenizer.json")).is_file():
            from tokenizers import Tokenizer as HFTokenizer

            hf = HFTokenizer.from_file(str(path / info.get("file", "tokenizer.json")))
            eot = info.get("eot_token", _model_config(path).get("eos_token_id"))
            return BPETokenizer(hf, info.get("name", "bpe"), eot if isinstance(eot, int) else None)
        raise DataError(
            f"{path} holds no tokenizer ({DESCRIPTOR}, tokenizer.json or {GPT2_FILE}); save one there"
        )
    hf_dir = _model_tokenizer_dir(str(name_or_dir), root)
    if hf_dir is not None:
        from tokenizers import Tokenizer as HFTokenizer

        config = _model_config(hf_dir)
        eot = config.get("eos_token_id")
        name = str(name_or_dir)
        if name.startswith("hf:") and Path(name[3:]).expanduser().is_dir():  # the same name from any cwd
            name = f"hf:{Path(name[3:]).expanduser().resolve()}"
        tok = BPETokenizer(
            HFTokenizer.from_file(str(hf_dir / "tokenizer.json")), name, eot if isinstance(eot, int) else None
        )
        vocab = config.get("vocab_size")
        if isinstance(vocab, int) and tok.vocab_size > vocab:  # a padded model vocabulary is fine
            raise DataError(
                f"{name_or_dir}: tokenizer.json has {tok.vocab_size:,} tokens but the model's vocab_size is "
                f"{vocab:,} (config.json), so the tokenizer belongs to another model; save the model's own "
                f"tokenizer in {hf_dir} (tokenizer.save_pretrained)"
            )
        return tok
    if bpe_vocab_size(str(name_or_dir)) is not None:
        raise DataError(
            f"{name_or_dir} is trained per dataset; run `kvlab data prepare --tokenizer {name_or_dir}` "
            "and pass the dataset directory to load_tokenizer"
        )
    raise DataError(
        f"unknown tokenizer {str(name_or_dir)!r}; use gpt2, bpe-8k / bpe-N, a fetchable model's name "
        "(kvlab models list), hf:DIR, or a directory holding one"
    )


def _model_config(directory: Path) -> dict:
    """A transformers config.json beside a tokenizer ({} when there is none, or it is a kvlab run's)."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) and "model_type" in config else {}


def tokenizer_slug(name: str) -> str:
    """The tokenizer's part of a dataset directory name: the name itself, or for `hf:DIR` the directory's
    name plus a short hash of its location (a path has slashes)."""
    if not name.startswith("hf:"):
        return name
    path = Path(name[3:]).expanduser()
    where = str(path.resolve()) if path.is_dir() else name[3:]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.name or "model")
    return f"hf-{stem}-{hashlib.sha1(where.encode()).hexdigest()[:6]}"


def _model_tokenizer_dir(spec: str, root) -> Path | None:
    """The HF directory whose tokenizer.json a pretrained model's name or `hf:DIR` means (fetched once)."""
    from kvlab.models import MODELS, fetch_model, resolve_model_source  # lazy: models imports data.fetch

    if spec in MODELS:
        path = fetch_model(spec, root)
    elif spec.startswith("hf:"):
        path = resolve_model_source(spec)
    else:
        return None
    if not (path / "tokenizer.json").is_file():
        raise DataError(f"{path} has no tokenizer.json; save the model's tokenizer there (save_pretrained)")
    return path
