"""`kvlab export RUN --format hf|kvlab OUT`: a trained or converted model back to transformers, or to
kvlab's own safetensors + config.json for structures transformers cannot express."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from kvlab.checkpoint import load_model, load_model_tokenizer, resolve_source, save_model
from kvlab.data import DataError
from kvlab.errors import KvlabError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer_meta.json",
    "gpt2.tiktoken",
)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KvlabError(f"{out} already exists and is not an empty directory; choose a new output path")
    _, source_dir = resolve_source(args.run)
    model = load_model(args.run)
    try:  # a tokenizer that does not fit the model is not exported beside it
        load_model_tokenizer(source_dir, model)
    except DataError:  # no tokenizer files: the weights alone
        pass
    if args.format == "hf":
        from kvlab.convert import export_hf

        export_hf(model, out, tokenizer_dir=source_dir)
        print(f"wrote {type(model).__name__} -> transformers model in {out} (load with from_pretrained)")
        return 0
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KvlabError(f"cannot create {out}: {e.strerror or e}; choose a writable path") from None
    save_model(out, model, extra={"source": str(args.run)})
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, out / name)
    print(f"wrote kvlab model.safetensors + config.json in {out} (load with kvlab.checkpoint.load_model)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a run (or hf:DIR, or a fetchable model) to transformers or kvlab format",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  kvlab export runs/llama-gqa --format hf exported/       # LlamaForCausalLM with num_key_value_heads
  kvlab export runs/llama-mla --format hf exported-mla/   # DeepseekV3ForCausalLM (MLA serving engines)
  kvlab export runs/cla2 --format kvlab exported-cla2/    # cross-layer sharing: kvlab's own format""",
    )
    p.add_argument("run", help="a run directory, hf:DIR, or a model name from `kvlab models list`")
    p.add_argument("--format", choices=("hf", "kvlab"), default="hf", help="output format (default: hf)")
    p.add_argument("out", help="output directory (must not exist, or be empty)")
    p.set_defaults(func=run)
