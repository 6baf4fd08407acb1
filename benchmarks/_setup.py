"""Set-up the benchmark scripts share (imported as a sibling module: the scripts run as
`python benchmarks/NAME.py`, which puts this directory on sys.path)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch._dynamo


def threads_and_clock(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Callable[[], float]:
    """Apply --threads and return the clock --clock asks for: perf_counter (wall), or this process's CPU
    seconds, which a 1-thread run on cores shared with other jobs keeps steady (refused otherwise)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock != "cpu":
        return time.perf_counter
    if torch.get_num_threads() != 1 or args.device != "cpu":
        parser.error("--clock cpu measures one CPU thread: add --threads 1 (and run on the CPU)")
    return time.process_time


def allow_many_compiled_models() -> None:
    """Every model compiles the same code object (Decoder._forward / GPT.forward): past dynamo's default of
    8 graphs per code object the later structures would silently run eagerly."""
    torch._dynamo.config.recompile_limit = 64
