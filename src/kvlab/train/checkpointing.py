"""A training run's checkpoints, each committed as one unit: weights + resume state + metrics of a step.

A checkpoint of step S is written into a hidden directory `.step-S.<pid>.tmp/` (`model.safetensors`,
`resume.pt`, `metrics.jsonl` = every committed line up to and including S), renamed to `step-S/`, and
then made current by atomically replacing the symlink `checkpoint -> step-S`. That one rename is the
commit: a kill at any instant leaves the previous checkpoint or the new one, never a mixture, and a
metrics line never names a step whose weights and resume state are not on disk. The run directory's
`model.safetensors`, `resume.pt` and `metrics.jsonl` are symlinks through `checkpoint/`, so readers
(`kvlab eval`, `load_model`) see the three change together. `clean_stale` removes what a kill left half
written (temporary files and directories, uncommitted step directories); training calls it on start.

`resume.pt` holds everything a bit-exact continuation needs: the weights, the optimizer, the step,
every RNG (torch, CUDA, the batch and hook generators) and the best/last validation loss.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from kvlab.checkpoint import WEIGHTS_FILE, CheckpointError, weights_state, write_weights
from kvlab.errors import KvlabError, is_disk_full

RESUME_FILE = "resume.pt"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_LINK = "checkpoint"
LINKED_FILES = (WEIGHTS_FILE, RESUME_FILE, METRICS_FILE)  # run_dir/NAME -> checkpoint/NAME


class DiskFull(KvlabError):
    """The disk filled while a checkpoint was written; the previous checkpoint is untouched."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def committed_dir(run_dir: Path) -> Path | None:
    """The directory of the committed checkpoint, or None when the run has none yet."""
    link = Path(run_dir) / CHECKPOINT_LINK
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None


def _replace_symlink(target: str, link: Path) -> None:
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)  # atomic: readers see the old target or the new one


def ensure_links(run_dir: Path) -> None:
    """run_dir/model.safetensors etc. -> checkpoint/...; they dangle until the first commit."""
    for name in LINKED_FILES:
        path = run_dir / name
        target = f"{CHECKPOINT_LINK}/{name}"
        if not (path.is_symlink() and os.readlink(path) == target):
            _replace_symlink(target, path)


def clean_stale(run_dir: Path) -> list[str]:
    """Remove what a killed writer left: hidden temp files/dirs and step directories never committed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    current = committed_dir(run_dir)
    removed = []
    for entry in run_dir.iterdir():
        name = entry.name
        stale_tmp = name.startswith(".") and (name.endswith(".tmp") or name.startswith(".tmp"))
        stale_step = name.startswith("step-") and entry.is_dir() and entry.resolve() != current
        if stale_tmp or stale_step:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(name)
    return removed


def has_checkpoint(run_dir: Path) -> bool:
    """A committed checkpoint (this layout), or resume state left by an older kvlab (plain files)."""
    run_dir = Path(run_dir)
    return committed_dir(run_dir) is not None or (
        (run_dir / RESUME_FILE).is_file() and not (run_dir / RESUME_FILE).is_symlink()
    )


def commit_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict, record: dict) -> None:
    """Write step `step`'s weights, resume state and metrics, then make them current in one rename."""
    run_dir = Path(run_dir)
    tmp = run_dir / f".{step_dir_name(step)}.{os.getpid()}.tmp"
    final = run_dir / step_dir_name(step)
    previous = committed_dir(run_dir)
    lines = [r for r in read_metrics(run_dir) if r["step"] < step] + [record]
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_weights(tmp / WEIGHTS_FILE, weights_state(model))
        write_resume_state(tmp / RESUME_FILE, state)
        (tmp / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
        if final.exists() and final.resolve() != previous:  # an uncommitted leftover of a killed run
            shutil.rmtree(final)
        os.rename(tmp, final)
        _replace_symlink(final.name, run_dir / CHECKPOINT_LINK)  # the commit point
    except BaseException as e:  # whatever stopped the write, nothing half written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists() and final.resolve() != committed_dir(run_dir):
            shutil.rmtree(final, ignore_errors=True)
        if not (isinstance(e, (OSError, SafetensorError)) or is_disk_full(e)):
            raise
        kept = f"the checkpoint of step {_step_of(previous)}" if previous else "no earlier checkpoint"
        if is_disk_full(e):
            raise DiskFull(
                f"disk full while writing the checkpoint of step {step} to {run_dir} ({kept} is intact); "
                "free space and rerun with --resume"
            ) from e
        raise CheckpointError(
            f"cannot write the checkpoint of step {step} to {run_dir}: "
            f"{getattr(e, 'strerror', None) or e} ({kept} is intact)"
        ) from e
    ensure_links(run_dir)
    if previous is not None and previous != final.resolve():
        shutil.rmtree(previous, ignore_errors=True)


def write_resume_state(path: Path, state: dict) -> None:
    """torch.save through a Python file: a full disk then raises OSError(ENOSPC), where torch.save(path)
    reports only "[enforce fail at inline_container.cc] ... file write failed" (a RuntimeError)."""
    with open(path, "wb") as f:
        torch.save(state, f)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def load_resume_state(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    current = committed_dir(run_dir)
    path = current / RESUME_FILE if current is not None else run_dir / RESUME_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir} has no committed checkpoint; nothing to resume (the run has not reached its "
            "first evaluation): drop --resume to start afresh"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a torn or foreign file: torch raises many types here
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}); delete it to start afresh") from e


def rng_states(batch_gen: torch.Generator, hook_gen: torch.Generator) -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "batch": batch_gen.get_state(), "hook": hook_gen.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any], batch_gen: torch.Generator, hook_gen: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    batch_gen.set_state(states["batch"])
    hook_gen.set_state(states["hook"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The committed evaluations, one dict per line of metrics.jsonl (empty before the first)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def remove_run_outputs(run_dir: Path) -> None:
    """--overwrite: drop every checkpoint and the links to them (config.json is rewritten by the caller)."""
    for name in (*LINKED_FILES, CHECKPOINT_LINK):
        (run_dir / name).unlink(missing_ok=True)
    for entry in run_dir.glob("step-*"):
        shutil.rmtree(entry, ignore_errors=True)
