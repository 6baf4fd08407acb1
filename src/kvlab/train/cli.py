"""`kvlab train`: train a model preset with an attention structure into a run directory.

Builds ModelConfig/TrainConfig from --preset, --attention and --set overrides (nanoGPT names), finds or
prepares the dataset, and calls `kvlab.train.train`. With --resume the run's config.json is the base.
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

from kvlab.checkpoint import CONFIG_FILE, CheckpointError, read_run_config
from kvlab.config import MODEL_PRESETS, AttentionConfig, ConfigError, ModelConfig, TrainConfig
from kvlab.errors import KvlabError, check_output_path

EXAMPLES = """examples:
  kvlab train --preset cpu-tiny --attention gqa --out runs/gqa
  kvlab train --preset cpu-tiny --attention mla --out runs/mla --set train.max_iters=200 model.n_layer=2
  kvlab train --preset cpu-tiny --attention mha --out runs/mqa --set attention.n_kv_heads=1
  kvlab train --preset cpu-tiny --attention gqa --out runs/gqa --resume      # continue after a kill
  kvlab train --preset cpu-tiny --attention cla2 --out runs/cla2 --corpus sotu --tokenizer bpe-8k
  kvlab train --preset gpt2-124m --attention gqa --out runs/g --data ~/.cache/kvlab/datasets/DIR
  torchrun --nproc_per_node 2 -m kvlab.cli train --preset cpu-tiny --attention gqa --out runs/ddp
  kvlab train --attention-file my_attn.py --preset cpu-tiny --out runs/mine   # seed 000's substrate
  kvlab train --attention-file my_mla.py --preset gpt2-124m --out runs/m --set attention.kv_lora_rank=256

--set keys: train.max_iters train.eval_interval train.eval_iters train.batch_size train.grad_accum
  train.lr train.seed train.device train.dtype train.compile ..., model.<ModelConfig field>,
  attention.<AttentionConfig field> (values are JSON where they parse, else strings). With
  --attention-file, attention.<name> sets config.<name> for the file's code (e.g. kv_lora_rank)."""


def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    """["train.lr=1e-3", "attention.kv_share=every:2"] -> {"train": {"lr": 0.001}, "attention": {...}}."""
    out: dict[str, dict[str, Any]] = {"train": {}, "model": {}, "attention": {}}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in out or not name:
            raise ConfigError(
                f"--set {item!r}: expected SECTION.KEY=VALUE with SECTION train, model or attention "
                "(e.g. train.max_iters=200)"
            )
        if section == "model" and name == "attention":  # build_configs sets it from --attention
            raise ConfigError(
                f"--set {item!r}: the attention structure is chosen with --attention PRESET (mha, gqa, mla, "
                "...) and its fields with --set attention.FIELD=VALUE (e.g. attention.n_kv_heads=2)"
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # bare strings: every:2, cpu, bfloat16
        out[section][name] = check_type(section, name, value, raw)
    return out


def _field_types(section: str) -> dict[str, Any]:
    cls = {"train": TrainConfig, "model": ModelConfig}.get(section)
    return typing.get_type_hints(cls) if cls is not None else {}  # attention: checked by its kind


def _accepts(annotation: Any, value: Any) -> bool | None:
    """True/False when the annotation is a plain scalar type (or Optional of one); None: not checked here."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return True
        verdicts = [_accepts(a, value) for a in args if a is not type(None)]
        return None if None in verdicts else any(verdicts)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return None


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def check_type(section: str, name: str, value: Any, raw: str) -> Any:
    """A --set value of the wrong type names the field and the type it takes (strings are never bools)."""
    annotation = _field_types(section).get(name)
    if annotation is None or _accepts(annotation, value) is not False:
        return value
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    expected = " or ".join(_TYPE_WORDS.get(a, getattr(a, "__name__", str(a))) for a in args)
    if type(None) in typing.get_args(annotation):
        expected += " or null"
    raise ConfigError(f"--set {section}.{name}={raw}: {section}.{name} takes {expected}")


# What --preset, --attention, --corpus and --tokenizer mean when not given. They default to None in
# argparse so that --resume can tell a flag given (and compared with the run) from one left out.
FLAG_DEFAULTS = {"preset": "cpu-tiny", "attention": "mha", "corpus": "shakespeare", "tokenizer": "bpe-8k"}


def given_flags(args: argparse.Namespace) -> dict[str, str]:
    """The flags of FLAG_DEFAULTS the user gave; fills in the defaults of the others on `args`."""
    given = {k: getattr(args, k) for k in FLAG_DEFAULTS if getattr(args, k, None) is not None}
    for k, v in FLAG_DEFAULTS.items():
        setattr(args, k, given.get(k, v))
    return given


def build_configs(
    args: argparse.Namespace, given: dict[str, str] | None = None
) -> tuple[ModelConfig, TrainConfig, Path | None]:
    """The resolved configs and the dataset dir (None: prepare the default corpus)."""
    from kvlab.train.presets import train_preset

    given = given_flags(args) if given is None else given
    sets = parse_sets(args.set or [])
    data = Path(args.data) if args.data else None
    if args.resume:
        saved = read_run_config(args.out)
        saved_model, saved_train = _saved_configs(saved, Path(args.out))
        _check_resume_flags(given, saved, saved_model, sets, Path(args.out))
        model_d = dict(saved["model"])
        train_d = saved_train.to_dict()
        data = data or (Path(saved["data"]["dir"]) if (saved.get("data") or {}).get("dir") else None)
        attention = saved_model.attention
        model_d.pop("attention")
    else:
        if args.preset not in MODEL_PRESETS:
            raise ConfigError(f"unknown --preset {args.preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
        model_d = dict(MODEL_PRESETS[args.preset])
        train_d = train_preset(args.preset).to_dict()
        base = ModelConfig.preset(args.preset, **{**sets["model"], "attention": args.attention})
        attention = base.attention
    model_d.update(sets["model"])
    attention = AttentionConfig.from_dict({**attention.to_dict(), **sets["attention"]})
    model_cfg = ModelConfig.from_dict({**model_d, "attention": attention})
    train_cfg = TrainConfig.from_dict({**train_d, **sets["train"]})
    return model_cfg, train_cfg, data


def _saved_configs(saved: dict[str, Any], run_dir: Path) -> tuple[ModelConfig, TrainConfig]:
    """The run's own model and train configs, or one line saying config.json is damaged."""
    try:
        return ModelConfig.from_dict(saved["model"]), TrainConfig.from_dict(saved.get("train") or {})
    except ConfigError as e:
        raise CheckpointError(
            f"{run_dir / CONFIG_FILE}: {e}; the run directory is damaged: restore config.json or train a "
            "new --out"
        ) from e


def _check_resume_flags(
    given: dict[str, str], saved: dict[str, Any], saved_model: ModelConfig, sets: dict, run_dir: Path
) -> None:
    """--resume with --preset/--attention/--corpus/--tokenizer: they must describe the run being continued
    (repeating the command that started it is fine); a flag that would be ignored is named instead."""
    from kvlab.config import attention_preset
    from kvlab.train.rundir import config_differences

    diffs = []
    if "attention" in given:
        shape = (saved_model.n_layer, saved_model.n_head, saved_model.n_embd)
        want = attention_preset(given["attention"], *shape).to_dict()
        want = AttentionConfig.from_dict({**want, **sets["attention"]}).to_dict()
        found = config_differences(saved_model.attention.to_dict(), want, "attention")
        diffs += [f"--attention {given['attention']}: {', '.join(found)}"] if found else []
    if "preset" in given:
        if given["preset"] not in MODEL_PRESETS:
            raise ConfigError(
                f"unknown --preset {given['preset']!r}; choose one of {', '.join(MODEL_PRESETS)}"
            )
        fields = {**MODEL_PRESETS[given["preset"]], **sets["model"], "attention": "mha"}  # fits any shape
        want = ModelConfig.from_dict(fields).to_dict()
        have = saved_model.to_dict()
        for d in (want, have):  # the vocabulary comes from the data; the attention is --attention's
            del d["vocab_size"], d["attention"]
        found = config_differences(have, want, "model")
        diffs += [f"--preset {given['preset']}: {', '.join(found[:4])}"] if found else []
    data = saved.get("data") or {}
    if "corpus" in given:
        from kvlab.data.corpora import corpus_name

        if corpus_name(given["corpus"]) != data.get("corpus"):
            diffs.append(f"--corpus {given['corpus']}: the run was trained on {data.get('corpus')!r}")
    if "tokenizer" in given and given["tokenizer"] != data.get("tokenizer"):
        diffs.append(f"--tokenizer {given['tokenizer']}: the run uses {data.get('tokenizer')!r}")
    if diffs:
        raise ConfigError(
            f"--resume: {'; '.join(diffs)} (from {run_dir / CONFIG_FILE}); a resumed run keeps its model and "
            "data: drop those flags (or repeat the ones that started the run), or train a new --out"
        )


def _check_vocab_override(model_sets: dict[str, Any], data: Path) -> None:
    """An explicit model.vocab_size must fit the data (training otherwise sizes it from meta.json)."""
    if "vocab_size" not in model_sets:
        return
    from kvlab.train.batches import read_meta

    data_vocab = int(read_meta(data)["vocab_size"])
    padded = -(-data_vocab // 64) * 64
    if not data_vocab <= model_sets["vocab_size"] <= padded:
        raise ConfigError(
            f"--set model.vocab_size={model_sets['vocab_size']} does not fit the data: its tokenizer has "
            f"{data_vocab} tokens (meta.json), so vocab_size is {padded} (padded to a multiple of 64); "
            "drop the --set, or prepare the data with another tokenizer"
        )


def run(args: argparse.Namespace) -> int:
    from kvlab.train.loop import train
    from kvlab.train.rundir import check_resumable

    check_output_path(args.out, "--out")
    given = given_flags(args)
    if args.data and {"corpus", "tokenizer"} & set(given):
        raise ConfigError(
            "--corpus and --tokenizer choose the data to prepare when --data is not given; drop them or "
            "--data"
        )
    if args.attention_file:
        return run_attention_file(args)
    if args.resume:
        if args.overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite replaces it; pass one")
        check_resumable(Path(args.out))  # before a corpus is fetched or a tokenizer trained for nothing
    model_cfg, train_cfg, data = build_configs(args, given)
    if data is None:
        try:
            from kvlab.data import prepare
        except ImportError as e:
            raise KvlabError("no --data given and kvlab.data is unavailable; pass --data DATASET_DIR") from e
        data = prepare(args.corpus, args.tokenizer, verbose=args.progress)
    _check_vocab_override(parse_sets(args.set or [])["model"], data)
    run_dir = train(
        model_cfg,
        train_cfg,
        data,
        args.out,
        resume=args.resume,
        progress=args.progress,
        overwrite=args.overwrite,
        allow_changes=args.allow_config_change,
    )
    from kvlab.train.checkpointing import read_metrics

    metrics = read_metrics(run_dir)
    if metrics and os.environ.get("RANK", "0") == "0":  # torchrun: one summary, from rank 0
        last = metrics[-1]
        print(
            f"{run_dir}: step {last['step']}, val_loss {last['val_loss']:.4f}, "
            f"{last['tokens_per_s']:.0f} tokens/s"
        )
    return 0


def _dataset(args: argparse.Namespace, data: Path | None) -> Path:
    if data is not None:
        return data
    try:
        from kvlab.data import prepare
    except ImportError as e:
        raise KvlabError("no --data given and kvlab.data is unavailable; pass --data DATASET_DIR") from e
    return prepare(args.corpus, args.tokenizer, verbose=args.progress)


def run_attention_file(args: argparse.Namespace) -> int:
    """Seed 000's substrate around the file's CausalSelfAttention, trained in a contained child process."""
    from kvlab.harness.cli import train_attention_file

    if args.resume:
        raise ConfigError("--resume is not available with --attention-file; start a fresh --out")
    sets = parse_sets(args.set or [])
    if args.preset not in MODEL_PRESETS:
        raise ConfigError(f"unknown --preset {args.preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
    from kvlab.train.presets import train_preset

    model_cfg = ModelConfig.preset(args.preset, **sets["model"])
    train_cfg = TrainConfig.from_dict({**train_preset(args.preset).to_dict(), **sets["train"]})
    data = _dataset(args, Path(args.data) if args.data else None)
    return train_attention_file(args, model_cfg, train_cfg, data, extra=sets["attention"])


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model with a KV structure (single process or under torchrun)",
        description="The seed-000 training loop: AdamW (0.9, 0.95), decay 0.1 on 2-D weights, clip 1.0, "
        "4% warmup then cosine to lr/10. Writes config.json, metrics.jsonl, model.safetensors and a "
        "resume state at every evaluation.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", help=f"model preset (default cpu-tiny): {', '.join(MODEL_PRESETS)}")
    p.add_argument(
        "--attention", help="attention preset (default mha): mha, gqa, mqa, mla, cla2, mlkv-N, ..."
    )
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--data", help="dataset directory (from `kvlab data prepare`); default: prepare --corpus")
    p.add_argument("--corpus", help="corpus to prepare when --data is not given (default shakespeare)")
    p.add_argument("--tokenizer", help="tokenizer to prepare with when --data is not given (default bpe-8k)")
    p.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help="override config fields")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's checkpoints in --out")
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: continue although --set changes train fields (named and recorded)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument(
        "--attention-file",
        help="a seed-000 attention file (kvlab init-attention): train seed 000's substrate around it, "
        "contained in a child process; --attention is ignored",
    )
    p.add_argument("--time-limit", type=float, default=24 * 3600, help="--attention-file: wall seconds")
    p.add_argument(
        "--memory-limit-gb",
        type=float,
        default=32.0,
        help="--attention-file: address-space limit (CPU; 0: none)",
    )
    p.add_argument("--threads", type=int, default=1, help="--attention-file: CPU threads of the child")
    p.set_defaults(func=run)
