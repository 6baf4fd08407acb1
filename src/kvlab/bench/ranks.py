"""`torchrun ... -m kvlab bench`: one process group for the bench; rank 0 alone prepares, evaluates, writes.

`Ranks` joins the group once (kvlab.train.distributed.init_distributed: gloo on CPU, NCCL on GPU), so every
training run of the bench reuses it (init_distributed sees it and leaves it open) and all ranks train
together. Everything else is rank 0's: `from_main(fn)` runs fn there and hands its result, or its error,
to every rank. The other ranks wait for it on a gloo group of their own whose timeout is WAIT_TIMEOUT, so
a long evaluation (or data preparation) between two training runs does not time them out; the training
collectives keep the default timeout. Single-process (WORLD_SIZE unset or 1), from_main is a plain call.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

from kvlab.errors import KvlabError
from kvlab.train.distributed import DistContext, init_distributed

WAIT_TIMEOUT = timedelta(hours=48)  # how long a rank waits for rank 0's evaluation of one cell
T = TypeVar("T")


class RankZeroError(KvlabError):
    """Rank 0's work failed; the other ranks get its message (exceptions do not cross processes)."""


class Ranks:
    def __init__(self, device: str = "auto"):
        self.ctx: DistContext = init_distributed(device)
        self.wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT) if self.ctx.enabled else None

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def world(self) -> int:
        return self.ctx.world

    def from_main(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0 alone; its value on every rank. Its exception is raised on rank 0 as it is and on
        the others as RankZeroError with the same message, so all ranks record the same failure."""
        if not self.ctx.enabled:
            return fn()
        payload: list[Any] = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                payload[0] = ("ok", fn())
            except Exception as e:  # KeyboardInterrupt ends the run: torchrun stops the other ranks
                error = e
                payload[0] = ("error", str(e) if isinstance(e, KvlabError) else f"{type(e).__name__}: {e}")
        dist.broadcast_object_list(payload, src=0, group=self.wait_group)
        kind, value = payload[0]
        if kind == "error":
            if error is not None:
                raise error
            raise RankZeroError(value)
        return value

    def close(self) -> None:
        """Wait until rank 0 has written everything, then leave the group (if the bench created it)."""
        if self.ctx.enabled:
            dist.barrier(group=self.wait_group)
        self.ctx.close()
