"""Token files -> training batches, sampled from a saved-and-restored generator.

A dataset directory holds flat nanoGPT token files (`train.bin`, `val.bin`, dtype from `meta.json`).
Each optimizer step draws ONE global batch of `grad_accum x batch_size` window offsets from a
`torch.Generator` shared by all ranks; DDP rank r takes micro-batches r, r + W, ... of it. So the data a
step sees does not depend on the number of processes, and resume only needs the generator's state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvlab.data import DataError, read_meta
from kvlab.data import open_split as _open_split

__all__ = ["DataError", "make_batch", "open_split", "rank_slices", "read_meta", "sample_offsets"]


def open_split(data_dir: str | Path, split: str, meta: dict[str, Any], block_size: int) -> np.memmap:
    """Memory-map `<split>.bin` and check it holds more than one block of in-vocabulary tokens."""
    tokens = _open_split(data_dir, split, min_tokens=block_size + 2)
    top = max_token_id(Path(data_dir) / f"{split}.bin", tokens)
    if top >= meta["vocab_size"]:
        raise DataError(
            f"{Path(data_dir) / f'{split}.bin'} holds token id {top} but meta.json says "
            f"vocab_size={meta['vocab_size']}; the token files and meta.json come from different tokenizers: "
            "re-run `kvlab data prepare --force`"
        )
    return tokens


def max_token_id(path: Path, tokens: np.ndarray) -> int:
    """The largest token id in `path`, scanned once per file version, not on every start and every rank.

    The result is memoised next to the file (`.<name>.maxid.json`, keyed by size and mtime, written
    atomically); a read-only dataset directory just means scanning each time.
    """
    st = path.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = path.with_name(f".{path.name}.maxid.json")
    try:
        held = json.loads(memo.read_text())
        if {k: held.get(k) for k in key} == key:
            return int(held["max"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    top = int(tokens.max())
    try:
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**key, "max": top}))
        os.replace(tmp, memo)
    except OSError:
        pass
    return top


def sample_offsets(gen: torch.Generator, n: int, n_tokens: int, block_size: int) -> torch.Tensor:
    """n random window starts (nanoGPT get_batch), drawn on CPU so every device/rank draws the same."""
    return torch.randint(n_tokens - block_size - 1, (n,), generator=gen)


def make_batch(tokens: np.ndarray, offsets: torch.Tensor, block_size: int, device: torch.device):
    """(x, y) of shape (len(offsets), block_size): inputs and next-token targets, int64 on `device`."""
    rows = [torch.from_numpy(tokens[i : i + 1 + block_size].astype(np.int64)) for i in offsets.tolist()]
    xy = torch.stack(rows)  # (B, T + 1)
    x, y = xy[:, :-1], xy[:, 1:]
    if device.type == "cuda":  # pinned + non_blocking overlaps the copy with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def rank_slices(offsets: torch.Tensor, batch_size: int, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's micro-batches of one global step: micro-batches rank, rank + world, ..."""
    micro = offsets.view(-1, batch_size)  # (grad_accum, batch_size)
    return [micro[i] for i in range(rank, micro.shape[0], world)]
