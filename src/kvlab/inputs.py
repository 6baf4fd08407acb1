"""Checks of what users hand kvlab, so a mistake ends in one line instead of a traceback deep in torch.

Device names (`--device`, `train.device`) -> a torch.device this machine really has: one line for a
name torch does not know (`banana`) or a device that is not here (`cuda` without a GPU). Token ids
given to the model: a (B, T) integer tensor inside the vocabulary.
"""

from __future__ import annotations

import torch

from kvlab.errors import KvlabError


class DeviceError(KvlabError):
    """A device name that is not a device, or a device this machine does not have."""


def parse_device(name, option: str = "--device", allow_meta: bool = False) -> torch.device:
    """A device name torch understands and kvlab runs on (cpu, cuda, cuda:N, mps), whether or not this
    machine has it; `allow_meta`: also torch's "meta" (shapes without storage)."""
    if isinstance(name, torch.device):
        dev = name
    else:
        try:
            dev = torch.device(name)
        except (RuntimeError, TypeError, ValueError) as e:
            raise DeviceError(f"{option}={name!r} is not a device; use cpu, cuda, cuda:N, mps or auto") from e
    if dev.type not in ("cpu", "cuda", "mps") and not (allow_meta and dev.type == "meta"):
        raise DeviceError(f"{option}={str(name)!r}: kvlab runs on cpu, cuda or mps")
    return dev


def check_device(name, option: str = "--device", allow_meta: bool = False) -> torch.device:
    """`auto` = cuda when available, else cpu; anything else must exist on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = parse_device(name, option, allow_meta)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{option}={name}: this machine has no CUDA GPU visible to torch; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"{option}={name}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{option}={name}: MPS is not available on this machine; use cpu")
    return dev


class InputError(KvlabError):
    """A tensor handed to the model that it cannot read (shape, dtype, token ids out of range)."""


TOKEN_DTYPES = (torch.long, torch.int32)  # what nn.Embedding takes as indices


def check_token_ids(idx: torch.Tensor, vocab_size: int) -> None:
    """idx must be a (B, T) torch.long (or int32) tensor of ids in [0, vocab_size).

    The range is checked on CPU tensors only: on a GPU reading min/max would synchronise every decode
    step (there, the embedding's own assert fires). Under torch.compile tracing it is skipped too (a
    data-dependent int() breaks the graph on every forward); the shape and dtype checks stay (static).
    """
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
        shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise InputError(f"token ids must be a (B, T) tensor, got {shape}; add a batch dim: idx[None]")
    if idx.dtype not in TOKEN_DTYPES:
        raise InputError(
            f"token ids must be an integer tensor, torch.long (or int32), got {idx.dtype}; use idx.long()"
        )
    if idx.device.type == "cpu" and idx.numel() and not torch.compiler.is_compiling():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is outside the model's vocabulary ({vocab_size} tokens)")
