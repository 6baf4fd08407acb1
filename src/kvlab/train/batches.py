"""Token files -> training batches, sampled from a saved-and-restored generator.

A dataset directory holds flat nanoGPT token files (`train.bin`, `val.bin`, dtype from `meta.json`).
Each optimizer step draws ONE global batch of `grad_accum x batch_size` window offsets from a
`torch.Generator` shared by all ranks; DDP rank r takes micro-batches r, r + W, ... of it. So the data a
step sees does not depend on the number of processes, and resume only needs the generator's state.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kvlab.data import DataError, read_meta
from kvlab.data import open_split as _open_split
from kvlab.data.tokenfiles import max_token_id

__all__ = ["DataError", "make_batch", "open_split", "rank_slices", "read_meta", "sample_offsets", "val_loss"]

VAL_SEED_OFFSET = 1_000_003  # val batches come from their own generator: the same at every evaluation


def open_split(data_dir: str | Path, split: str, meta: dict[str, Any], block_size: int) -> np.memmap:
    """Memory-map `<split>.bin` and check it holds more than one block of in-vocabulary tokens."""
    tokens = _open_split(data_dir, split, min_tokens=block_size + 2)
    top = max_token_id(Path(data_dir) / f"{split}.bin", tokens)  # memo written by `kvlab data prepare`
    if top >= meta["vocab_size"]:
        raise DataError(
            f"{Path(data_dir) / f'{split}.bin'} holds token id {top} but meta.json says "
            f"vocab_size={meta['vocab_size']}; the token files and meta.json come from different tokenizers: "
            "re-run `kvlab data prepare --force`"
        )
    return tokens


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


@torch.no_grad()
def val_loss(
    model: torch.nn.Module,
    tokens,
    block_size: int,
    batch_size: int,
    eval_iters: int,
    generator: torch.Generator,
    autocast: Callable = nullcontext,
    rank: int = 0,
    world: int = 1,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """nanoGPT's val loss, the one definition (training and `kvlab eval`): mean cross-entropy over
    eval_iters batches of batch_size windows, their starts drawn at once by `sample_offsets(generator)`.
    Under DDP each rank scores its share of the batches and all_reduce_sum adds the ranks' sums."""
    tokens = tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if len(tokens) <= block_size + 1:
        raise DataError(
            f"the validation split has {len(tokens)} tokens; it needs more than block_size+1={block_size + 1}"
        )
    device = next(model.parameters()).device
    offsets = sample_offsets(generator, eval_iters * batch_size, len(tokens), block_size)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for off in rank_slices(offsets, batch_size, rank, world):
        x, y = make_batch(tokens, off, block_size, device)
        with autocast():
            logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).double()
    model.train(was_training)
    if all_reduce_sum is not None:
        total = all_reduce_sum(total)
    return (total / eval_iters).item()
