"""Resume state and metrics of a run directory, each written atomically.

`resume.pt` holds everything a bit-exact continuation needs: the weights (so they always match the
optimizer state, even if a kill lands between two files), the optimizer, the step, every RNG (torch,
CUDA, the batch and hook generators) and the best/last validation loss. `metrics.jsonl` gets one JSON
object per evaluation; on resume, lines written after the checkpoint are dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kvlab.checkpoint import CheckpointError, atomic_write

RESUME_FILE = "resume.pt"
METRICS_FILE = "metrics.jsonl"


def save_resume_state(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_write(run_dir / RESUME_FILE, lambda tmp: torch.save(state, tmp))


def load_resume_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RESUME_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found; nothing to resume (the run has not reached its first evaluation): "
            "drop --resume to start afresh"
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


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Keep only evaluations at or before the checkpoint being resumed (a kill may leave one more)."""
    kept = [r for r in read_metrics(run_dir) if r["step"] <= last_step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    atomic_write(run_dir / METRICS_FILE, lambda tmp: Path(tmp).write_text(text))
