"""The run directory before training starts, and the run's health while it trains.

`prepare_run_dir` makes --out usable or says in one line why not (a file in the way, no permission, a
finished run that would be overwritten), and removes what a killed run left half written.
`check_resume_config` keeps a resumed run true to its config.json: a changed field is named, and only
taken with `allow_changes`. `diverging_warning` says so when the loss climbs far above chance. What a run
directory records of its data (`data_record`, the tokenizer beside the weights, the vocabulary fitted to
the data: `resolve_vocab`), and `save_untrained` (a model as a run directory before any step).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch.nn as nn

from kvlab.checkpoint import CONFIG_FILE, CheckpointError, read_config, save_model
from kvlab.config import ModelConfig, TrainConfig
from kvlab.errors import KvlabError, OutputError, output_problem
from kvlab.train import checkpointing as ckpt
from kvlab.train.batches import DataError, read_meta

# Train fields that may differ on resume without changing what the run computes.
RESUME_FREE_FIELDS = {"device", "compile", "tensorboard", "log_interval"}


class RunExists(KvlabError):
    """--out already holds a trained run and neither resume nor overwrite was asked for."""


def check_resumable(run_dir: Path) -> None:
    """--resume: remove what a killed writer left, then refuse in one line when no checkpoint was ever
    committed (nothing else in run_dir is touched)."""
    try:
        ckpt.clean_stale(run_dir)
    except OSError:  # an unreadable or read-only run dir: the check below still says what is wrong
        pass
    if not Path(run_dir).exists():
        raise CheckpointError(
            f"--resume: {run_dir} does not exist, so there is nothing to resume; drop --resume"
        )
    if not ckpt.has_checkpoint(run_dir):
        ckpt.load_resume_state(run_dir)  # raises: nothing to resume


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        check_resumable(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_stale(run_dir)
        if not resume and ckpt.has_checkpoint(run_dir):
            if not overwrite:
                steps = [m["step"] for m in ckpt.read_metrics(run_dir)]
                at = f" (trained to step {steps[-1]})" if steps else ""
                raise RunExists(
                    f"{run_dir} already holds a run{at}; pass --resume to continue it, --overwrite to "
                    "replace it, or choose another --out"
                )
            ckpt.remove_run_outputs(run_dir)
        ckpt.ensure_links(run_dir)
    except OSError as e:
        raise OutputError(output_problem(run_dir, e)) from e


def config_differences(saved: dict[str, Any], now: dict[str, Any], section: str) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [
        f"{section}.{k} ({saved.get(k)!r} -> {now.get(k)!r})"
        for k in keys
        if saved.get(k) != now.get(k) and not (section == "train" and k in RESUME_FREE_FIELDS)
    ]


DATA_KEYS = ("dir", "tokenizer", "vocab_size")  # what the resumed run reads must be what it was trained on


def check_resume_config(
    run_dir: Path,
    model_dict: dict[str, Any],
    train_dict: dict[str, Any],
    allow_changes: bool,
    data_dict: dict[str, Any] | None = None,
) -> list[str]:
    """The fields that differ from the run's config.json; an error unless allow_changes (model: always)."""
    saved = read_config(run_dir)
    model_diff = config_differences(saved.get("model", {}), model_dict, "model")
    if model_diff:
        raise KvlabError(
            f"--resume: the model differs from {run_dir / CONFIG_FILE}: {', '.join(model_diff[:4])}; "
            "the checkpoint's weights only fit its own model: drop those settings or train a new --out"
        )
    train_diff = config_differences(saved.get("train", {}), train_dict, "train")
    if data_dict is not None:
        old = {k: v for k, v in (saved.get("data") or {}).items() if k in DATA_KEYS}
        train_diff += config_differences(old, {k: v for k, v in data_dict.items() if k in DATA_KEYS}, "data")
        if not any(d.startswith("data.tokenizer") for d in train_diff) and data_dict.get("dir"):
            train_diff += _tokenizer_difference(run_dir, Path(data_dict["dir"]), old.get("tokenizer"))
    if train_diff and not allow_changes:
        raise KvlabError(
            f"--resume: {', '.join(train_diff)} differ from {run_dir / CONFIG_FILE}; a resumed run keeps "
            "its config: drop the --set/--data, or pass --allow-config-change to continue (recorded)"
        )
    return train_diff


def _tokenizer_difference(run_dir: Path, data_dir: Path, name: str | None) -> list[str]:
    """The data tokenized by another tokenizer of the same name than the run's (the tokenizer files the run
    saved at its start): a re-prepared dataset whose token ids now mean other text."""
    try:
        from kvlab.data import same_tokenizer
    except ImportError:
        return []
    if same_tokenizer(run_dir, data_dir) is False:
        return [f"data.tokenizer ({name!r} -> another {name!r}: same name, other vocabulary or merges)"]
    return []


def diverging_warning(val_loss: float, vocab_size: int, step: int, lr: float) -> str | None:
    """A line when val loss is above twice that of uniform guessing (ln V): the run is diverging."""
    limit = 2 * math.log(vocab_size)
    if not val_loss > limit:
        return None
    return (
        f"kvlab: warning: val_loss {val_loss:.4g} at step {step} is above 2 x ln(vocab) = {limit:.2f} "
        f"(twice the loss of uniform guessing): training is diverging; lower train.lr (now {lr:g})"
    )


def resolve_vocab(model_cfg: ModelConfig, meta: dict[str, Any], fixed: bool) -> ModelConfig:
    """Fit the model's vocabulary to the data: the tokenizer's size padded up to a multiple of 64.

    `fixed`: the weights come from elsewhere (init_from), so the vocabulary cannot change; error clearly
    when the data's tokens do not fit it.
    """
    data_vocab = int(meta["vocab_size"])
    padded = -(-data_vocab // 64) * 64
    if data_vocab <= model_cfg.vocab_size <= padded:
        return model_cfg
    if fixed:
        if data_vocab > model_cfg.vocab_size:
            raise DataError(
                f"the data's vocabulary ({data_vocab} tokens, meta.json) does not fit the model's "
                f"vocab_size={model_cfg.vocab_size}; prepare the data with the model's tokenizer"
            )
        return model_cfg
    return ModelConfig.from_dict({**model_cfg.to_dict(), "vocab_size": padded})


def _save_tokenizer(data_dir: Path, run_dir: Path) -> None:
    """Copy the dataset's tokenizer next to the weights, so `kvlab generate RUN_DIR` needs nothing else."""
    try:
        from kvlab.data import load_tokenizer
    except ImportError:
        return
    try:
        load_tokenizer(data_dir).save(run_dir)
    except (KvlabError, FileNotFoundError):  # the dataset has no tokenizer files: token ids only
        pass


def data_record(data_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The "data" section of a run's config.json: where its tokens are and what meta.json says of them."""
    fields = {k: v for k, v in meta.items() if not isinstance(v, dict)}
    return {"dir": str(Path(data_dir).resolve()), **fields}


def save_untrained(run_dir: str | Path, model: nn.Module, cfg: TrainConfig, data_dir: str | Path) -> Path:
    """`model` as a run directory before any training step (uptraining's step 0): its weights, the tokenizer
    and a config.json whose train and data sections are those a run of `cfg` on `data_dir` records, so
    `kvlab eval` scores it exactly as it scores the trained run (the same val batches, context, corpora)."""
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(data_dir, run_dir)
    extra = {"train": cfg.to_dict(), "data": data_record(data_dir, read_meta(data_dir))}
    save_model(run_dir, model, extra=extra)  # config.json last: its presence marks the directory complete
    return run_dir
