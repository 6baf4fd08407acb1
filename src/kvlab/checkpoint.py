"""Run directories on disk: model weights (safetensors) + resolved config (JSON), written atomically.

A run directory holds `config.json` (model/attention/train/data config, git commit, versions, hardware)
and `model.safetensors`; training adds `metrics.jsonl` and its resume state. Every write goes to a
temporary file first and is renamed into place, so a killed process never leaves a torn file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import secrets
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from kvlab.config import ConfigError, ModelConfig
from kvlab.errors import KvlabError, OutputError, output_problem
from kvlab.model import GPT

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(KvlabError):
    """A run directory that cannot be read; the message names the file and what to do."""


def atomic_write(path: str | Path, write_fn) -> None:
    """Call write_fn(tmp_path) and rename tmp into `path` (same directory, so the rename is atomic).

    The temporary file is created with mode 0666 & ~umask (mkstemp's 0600 would make every run file
    private whatever the user's umask). A failure removes it and raises one line naming the path.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise OutputError(output_problem(path, e)) from e
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        raise OutputError(output_problem(path, e)) from e
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> tuple[str | None, bool | None]:
    """(HEAD's hash, whether tracked files differ from it), or (None, None) outside a git checkout. A copy
    of the tree without its .git (a lent GPU machine) may name its commit in KVLAB_GIT_COMMIT instead."""
    # --verify: in a repository without commits plain `rev-parse HEAD` prints the word "HEAD"
    proc = _git("rev-parse", "--verify", "--quiet", "HEAD")
    commit = proc.stdout.strip() if proc is not None and proc.returncode == 0 else ""
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        named = os.environ.get("KVLAB_GIT_COMMIT", "").strip().lower()
        return (named, None) if re.fullmatch(r"[0-9a-f]{40}", named) else (None, None)
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = bool(status.stdout.strip()) if status is not None and status.returncode == 0 else None
    return commit, dirty


# Read once, when kvlab loads: a process records the commit whose code it runs, even when HEAD moves on
# while it works (a bench or a long training run that spans a commit).
_COMMIT, _DIRTY = _git_commit()


def environment_info() -> dict[str, Any]:
    """Git commit (as of this process's start; git_dirty: tracked files had uncommitted changes), library
    versions and hardware, recorded next to every run's outputs."""
    from kvlab import __version__

    info: dict[str, Any] = {
        "git_commit": _COMMIT,
        "git_dirty": _DIRTY,
        "kvlab": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def weights_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors model.safetensors stores. Tied weights: each tensor once (lm_head.weight is wte.weight,
    re-tied on load); an untied head (NeoX, most Llama models) is a tensor of its own."""
    tied = model.config.tie_embeddings
    return {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }


def write_weights(path: str | Path, state: dict[str, torch.Tensor]) -> None:
    """safetensors bytes written with open(): mode 0666 & ~umask, and no hidden temp file of
    safetensors' own (save_file makes one, mode 0600, left behind when the process is killed)."""
    Path(path).write_bytes(safetensors_bytes(state, metadata={"format": "pt"}))


def live_model_config(model: GPT) -> dict[str, Any]:
    """The model's config as saved: a MatryoshkaKV model's current ranks (set_ranks) are part of it."""
    config = model.config
    if any(getattr(m, "k_ranks", None) is not None for m in model.modules()):
        from kvlab.attention.matryoshka import ranks_config

        config = dataclasses.replace(config, attention=ranks_config(model))
    return config.to_dict()


def run_config(model: GPT, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json's content: {"model": ..., **extra, "environment": ...}."""
    return {"model": live_model_config(model), **(extra or {}), "environment": environment_info()}


def save_model(run_dir: str | Path, model: GPT, extra: dict[str, Any] | None = None) -> None:
    """Write model.safetensors and config.json ({"model": ..., **extra, "environment": ...})."""
    run_dir = Path(run_dir)
    state = weights_state(model)
    atomic_write(run_dir / WEIGHTS_FILE, lambda tmp: write_weights(tmp, state))
    write_json(run_dir / CONFIG_FILE, run_config(model, extra))


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found; is {run_dir} a kvlab run directory (made by `kvlab train`)?"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the run directory is damaged") from e


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """config.json whose sections have the shape kvlab writes: "model" an object of model fields, and
    "train" and "data" objects (or null) when present; anything else is one line naming the section."""
    config = read_config(run_dir)
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{Path(run_dir) / CONFIG_FILE} holds {type(config).__name__}, not an object; the run directory "
            "is damaged: restore config.json or retrain"
        )
    for section in ("model", "train", "data"):
        got = config.get(section)
        if not isinstance(got, dict) and not (got is None and section != "model"):
            raise CheckpointError(
                f'{Path(run_dir) / CONFIG_FILE}: "{section}" must be an object of {section} fields, got '
                f"{str(config.get(section))[:40]!r}; the run directory is damaged: restore config.json or "
                "retrain"
            )
    return config


def _is_hf_dir(path: Path) -> bool:
    """A directory whose config.json is a transformers config (model_type), not a kvlab run's."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config and "model" not in config


def names_hf_model(source: str | Path) -> bool:
    """Whether source means a transformers model (`hf:...`, a fetchable model's name or a transformers
    model directory) rather than a kvlab run, decided without fetching or loading anything."""
    from kvlab.models import MODELS

    spec = str(source)
    return spec.startswith("hf:") or spec in MODELS or _is_hf_dir(Path(spec))


def resolve_source(source: str | Path) -> tuple[str, Path]:
    """What a model argument names: ("hf", DIR) for `hf:DIR`, a fetchable model name (kvlab models list;
    fetched on first use) or a transformers model directory; ("run", DIR) for a kvlab run directory."""
    from kvlab.models import resolve_model_source

    hf_dir = resolve_model_source(str(source))
    if hf_dir is None and _is_hf_dir(Path(source)):
        hf_dir = Path(source)
    return ("hf", Path(hf_dir)) if hf_dir is not None else ("run", Path(source))


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> GPT:
    """Rebuild the model from config.json and load model.safetensors, checking every tensor's shape.

    `run_dir` may also be `hf:DIR`, a transformers model directory or a fetchable model's name
    (`resolve_source`): those are imported with kvlab.convert.from_hf.
    """
    from kvlab.inputs import check_device

    device = check_device(device, "device")  # before reading: a device that is not here is not corruption
    kind, run_dir = resolve_source(run_dir)
    if kind == "hf":
        from kvlab.convert import from_hf

        return from_hf(run_dir).to(device)
    config = read_run_config(run_dir)
    try:
        model_cfg = ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{run_dir / CONFIG_FILE}: bad model config ({e})") from e
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(
            f"{weights} not found: the run has no checkpoint yet (training stopped before its first "
            "evaluation); train it further with `kvlab train --out RUN --resume`, or retrain"
        )
    try:
        state = load_file(weights, device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is corrupt or truncated ({e}); restore it or retrain") from e
    with torch.device("meta"):
        model = GPT(model_cfg)
    tied = model_cfg.tie_embeddings
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match config.json: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for k, v in expected.items():
        if v.shape != state[k].shape:
            raise CheckpointError(
                f"{weights}: {k} has shape {tuple(state[k].shape)}, config says {tuple(v.shape)}"
            )
    model.load_state_dict(state, strict=False, assign=True)  # every key checked above
    if tied:
        model.lm_head.weight = model.wte.weight
    return model.eval()


# ---- the tokenizer beside a model ----------------------------------------------------------------
def check_tokenizer(tokenizer, model: GPT, where: str | Path, config: dict[str, Any] | None = None) -> None:
    """A tokenizer must fit the model it is loaded with: at most the model's vocab_size tokens (a
    vocabulary padded beyond the tokenizer's, GPT-2's 50,257 as 50,304, is fine; token ids beyond it would
    index past the embeddings) and, for a kvlab run (`config`), the size its training data recorded."""
    n, vocab = tokenizer.vocab_size, model.config.vocab_size
    if n > vocab:
        raise CheckpointError(
            f"{where}: its tokenizer has {n:,} tokens but the model's vocabulary has {vocab:,} (vocab_size), "
            f"so the tokenizer belongs to another model; put the model's own tokenizer files in {where}"
        )
    data = (config or {}).get("data") or {}
    trained = data.get("vocab_size")
    if isinstance(trained, int) and trained != n:
        name = data.get("tokenizer") or "another tokenizer"
        raise CheckpointError(
            f"{where}: its tokenizer has {n:,} tokens but the run was trained on data tokenized with {name} "
            f"({trained:,} tokens); restore the run's tokenizer from its dataset "
            f"(kvlab.data.load_tokenizer({str(data.get('dir') or 'DATASET_DIR')!r}).save({str(where)!r}))"
        )


def load_model_tokenizer(source: str | Path, model: GPT):
    """The tokenizer saved beside a model (a run directory, hf:DIR or a fetched model; `resolve_source`),
    checked against it (`check_tokenizer`). A source without tokenizer files raises the data layer's
    one-line DataError."""
    from kvlab.data import load_tokenizer

    kind, directory = resolve_source(source)
    tokenizer = load_tokenizer(directory)
    check_tokenizer(tokenizer, model, directory, read_config(directory) if kind == "run" else None)
    return tokenizer
