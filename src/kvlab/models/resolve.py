"""`resolve_model_source(spec)`: which local Hugging Face directory a command-line model argument means.

- `hf:PATH` (an existing directory) -> PATH, which must hold config.json;
- `hf:ORG/NAME` (not a local directory) -> a snapshot from the Hugging Face hub, only when the hub answers
  (or the snapshot is already in the local HF cache); otherwise one line saying to pass a local directory;
- a registered name (`smollm2-135m`) -> its cached directory, fetched on first use;
- anything else -> None: the caller treats it as a kvlab run directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kvlab.models.fetch import fetch_model
from kvlab.models.registry import MODELS, ModelError

HF_PREFIX = "hf:"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # `gpt2`, `EleutherAI/pythia-70m`
HUB_TIMEOUT_S = 10.0
# weights of other frameworks and quantized duplicates: never needed to load a torch model
HUB_IGNORE = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite", "*.gguf", "onnx/*", "*.pth"]


def resolve_model_source(spec: str | os.PathLike, root: str | Path | None = None) -> Path | None:
    """The local HF directory spec names, or None when spec is not a model spec (a run directory)."""
    spec = str(spec)
    if spec.startswith(HF_PREFIX):
        return _hf_spec(spec[len(HF_PREFIX) :])
    if spec in MODELS:
        return fetch_model(spec, root)
    return None


def check_hf_dir(path: Path, spec: str | None = None) -> Path:
    """path if it is a directory with config.json, else a one-line error."""
    what = spec or str(path)
    if not path.exists():
        raise ModelError(f"{what}: no such directory; pass hf:DIR with a local Hugging Face model directory")
    if not path.is_dir():
        raise ModelError(f"{what} is a file; hf: takes the directory holding config.json and the weights")
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{path} has no config.json, so it is not a Hugging Face model directory "
            "(save one with model.save_pretrained(DIR))"
        )
    return path


def _hf_spec(target: str) -> Path:
    if not target:
        raise ModelError("hf: needs a directory or hub name after it, e.g. hf:./my-model or hf:gpt2")
    path = Path(target).expanduser()
    if path.exists() or not HUB_ID.fullmatch(target):
        return check_hf_dir(path, f"hf:{target}")
    return hub_snapshot(target)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(repo_id: str) -> Path:
    """A local snapshot of a hub model: from the local HF cache, else downloaded if the hub answers."""
    try:
        from huggingface_hub import model_info, snapshot_download
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:
        raise ModelError(
            f"hf:{repo_id} is not a local directory, and loading from the hub needs huggingface_hub "
            "(pip install 'kvlab[hf]'); or pass hf:DIR with a local directory"
        ) from e
    try:  # already downloaded earlier: no network needed
        local = snapshot_download(repo_id, local_files_only=True, ignore_patterns=HUB_IGNORE)
        return check_hf_dir(Path(local))
    except (LocalEntryNotFoundError, ModelError, OSError, ValueError):
        pass
    unreachable = (
        f"hf:{repo_id} is not a local directory and the Hugging Face hub is unreachable ({{}}); "
        "download the model where the hub is reachable and pass hf:DIR with that directory"
    )
    if _offline():
        raise ModelError(unreachable.format("HF_HUB_OFFLINE is set"))
    try:
        model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ModelError(
            f"the Hugging Face hub has no accessible model {repo_id!r} ({type(e).__name__}); "
            "check the name, or pass hf:DIR with a local directory"
        ) from e
    except Exception as e:  # connection refused, DNS, proxy, timeout: the library raises many types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise ModelError(unreachable.format(reason)) from e
    return check_hf_dir(Path(snapshot_download(repo_id, ignore_patterns=HUB_IGNORE)), f"hf:{repo_id}")
