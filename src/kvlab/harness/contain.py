"""Contained runs: an attention file's job in a child process, locked into its own run directory.

`run_contained` copies the file into the run directory, writes the job, and starts
`python -m kvlab.harness.child` there with: cwd, HOME and TMPDIR inside the run directory; a scrubbed
environment; RLIMIT_CPU, RLIMIT_AS (CPU jobs; CUDA reserves address space, so GPU jobs rely on the wall
clock and the device's own limit), RLIMIT_FSIZE (no file larger than `file_bytes`), no core files; a
wall-clock timeout and a run-directory size cap (`disk_bytes`, polled) that kill the whole process group.
The child's output is streamed and only a bounded tail kept, so a chatty child cannot grow the parent.
The child adds Landlock and an audit hook (child.py). The outcome is one verdict:
ok / timeout / memory / disk / crashed / violation, with a one-line reason.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kvlab
from kvlab.config import ModelConfig
from kvlab.errors import KvlabError
from kvlab.harness import child
from kvlab.harness.validate import validate_file

VERDICTS = ("ok", "timeout", "memory", "disk", "crashed", "violation")
ATTENTION_COPY = "attention.py"
OUTPUT_TAIL_BYTES = 64 << 10  # of the child's stdout+stderr kept (the rest is counted, not stored)
POLL_S = 0.25  # how often the parent checks the wall clock and the run directory's size
MAX_RUN_FILES = 100_000  # more entries than this in the run directory counts as filling it
MAX_RESULT_BYTES = 64 << 20  # a larger harness.json is not read


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 3600  # CPU seconds (all threads); SIGXCPU past it
    wall_s: float = 3600.0  # wall clock; the process group is killed past it
    memory_bytes: int | None = 16 << 30  # RLIMIT_AS for CPU jobs (None: no limit)
    threads: int = 1
    # RLIMIT_FSIZE: no single file past this (a write beyond it fails with EFBIG); 16 GiB holds a 345M
    # model's checkpoint (1.4 GB weights, 2.8 GB optimizer state) with room to spare
    file_bytes: int | None = 16 << 30
    # the run directory's total disk use (polled every POLL_S; capped further to 95% of the free space)
    disk_bytes: int | None = 64 << 30


@dataclass
class Outcome:
    verdict: str  # one of VERDICTS
    line: str  # the verdict with its reason, e.g. "timeout: wall clock 3.0 s exceeded"
    run_dir: Path
    returncode: int | None
    elapsed_s: float
    result: dict[str, Any] = field(default_factory=dict)  # harness.json (the child's report)
    output: str = ""  # the child's stdout+stderr tail (last 4000 characters)
    output_bytes: int = 0  # how much the child printed in all


class ContainmentError(KvlabError):
    """A contained run could not be set up (bad run directory, file failing validation)."""


def _child_env(run_dir: Path, threads: int) -> dict[str, str]:
    """Only what the child needs: its own HOME/TMPDIR, the kvlab it was started from, thread counts."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(run_dir / "home"),
        "TMPDIR": str(run_dir / "tmp"),
        "PYTHONPATH": str(Path(kvlab.__file__).resolve().parent.parent),
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return env


def _limit(limits: Limits, cuda: bool):
    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 5))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if limits.memory_bytes is not None and not cuda:
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        if limits.file_bytes is not None:  # Python ignores SIGXFSZ: an oversized write raises EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))

    return apply


class _Tail:
    """Drains a pipe on a thread, keeping only its last `keep` bytes and counting the rest."""

    def __init__(self, pipe, keep: int = OUTPUT_TAIL_BYTES):
        self.pipe, self.keep = pipe, keep
        self.buf = bytearray()
        self.total = 0
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        fd = self.pipe.fileno()
        while chunk := os.read(fd, 1 << 16):
            self.total += len(chunk)
            self.buf += chunk
            if len(self.buf) > 2 * self.keep:  # trim in batches: amortised O(1) per byte
                del self.buf[: -self.keep]

    def text(self, join_s: float = 5.0) -> str:
        self.thread.join(join_s)
        return bytes(self.buf[-self.keep :]).decode(errors="replace")


def disk_use(root: Path, max_entries: int = MAX_RUN_FILES) -> int | None:
    """Bytes on disk under root (allocated blocks, symlinks not followed); None past max_entries entries."""
    total, entries, stack = 0, 0, [str(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    entries += 1
                    if entries > max_entries:
                        return None
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:  # removed while we looked
                        continue
                    total += st.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except OSError:
            continue
    return total


def _disk_cap(run_dir: Path, limits: Limits) -> int | None:
    """limits.disk_bytes, but never more than what is there now plus 95% of the file system's free space."""
    if limits.disk_bytes is None:
        return None
    room = int(shutil.disk_usage(run_dir).free * 0.95) + (disk_use(run_dir) or 0)
    return min(limits.disk_bytes, room)


def run_contained(
    attention_file: str | Path,
    run_dir: str | Path,
    model_cfg: ModelConfig,
    limits: Limits = Limits(),
    train: dict[str, Any] | None = None,
    data_dir: str | Path | None = None,
    extra: dict[str, Any] | None = None,
    measure: bool = True,
    generate: bool = False,
    device: str = "cpu",
    **job_options: Any,
) -> Outcome:
    """Run one attention file's job (build, forward, metrics, [train], [generation]) contained.

    job_options reach the child's job (child_job.run_job): resume (continue the run's checkpoint), evaluate
    (kvlab.eval.evaluate's inputs, resolved by the caller: kvlab.bench.files), weights (a model.safetensors
    to evaluate instead of training), declare_only (build and report the declared figures, nothing else).
    """
    run_dir = Path(run_dir).resolve()
    violations = validate_file(attention_file)
    if violations:
        lines = "\n".join(v.format(attention_file) for v in violations)
        return Outcome("violation", f"violation: the file fails validation\n{lines}", run_dir, None, 0.0)
    if train and data_dir is None:
        raise ContainmentError("training a contained run needs a dataset directory (--data)")
    run_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("home", "tmp"):
        (run_dir / sub).mkdir(exist_ok=True)
    shutil.copyfile(attention_file, run_dir / ATTENTION_COPY)
    (run_dir / child.RESULT_FILE).unlink(missing_ok=True)
    job = {
        "attention_file": ATTENTION_COPY,
        "model": model_cfg.to_dict(),
        "extra": extra or {},
        "train": train,
        "data": str(Path(data_dir).resolve()) if data_dir else None,
        "measure": measure,
        "generate": generate,
        "device": device,
        "num_threads": limits.threads,
        "file_bytes": limits.file_bytes,
        **job_options,
    }
    (run_dir / child.JOB_FILE).write_text(json.dumps(job, indent=2) + "\n")
    disk_cap = _disk_cap(run_dir, limits)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvlab.harness.child"],
        cwd=run_dir,
        env=_child_env(run_dir, limits.threads),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_limit(limits, device.startswith("cuda")),
        start_new_session=True,  # its own process group: the timeout kills everything it started
    )
    tail = _Tail(proc.stdout)
    stopped = None  # why the parent killed the run: "wall", "disk" or "files"
    while True:
        try:
            proc.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if time.perf_counter() - start > limits.wall_s:
            stopped = "wall"
        elif disk_cap is not None:
            used = disk_use(run_dir)
            stopped = "files" if used is None else "disk" if used > disk_cap else None
        if stopped:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
    elapsed = time.perf_counter() - start
    output = tail.text()[-4000:]
    proc.stdout.close()
    result = _read_result(run_dir)
    verdict, line = _verdict(proc.returncode, stopped, limits, result, output, disk_cap)
    return Outcome(verdict, line, run_dir, proc.returncode, elapsed, result, output, tail.total)


def _read_result(run_dir: Path) -> dict[str, Any]:
    """harness.json, written by the child (so by the submission's process): a report that is not a JSON
    object, or larger than MAX_RESULT_BYTES (it could be up to the file-size limit), counts as none."""
    path = run_dir / child.RESULT_FILE
    try:
        if path.is_symlink() or path.stat().st_size > MAX_RESULT_BYTES:
            return {}
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return result if isinstance(result, dict) else {}


def _verdict(
    code: int | None,
    stopped: str | None,
    limits: Limits,
    result: dict,
    output: str,
    disk_cap: int | None = None,
) -> tuple[str, str]:
    if stopped == "wall":
        return "timeout", f"timeout: wall clock limit of {limits.wall_s:g} s exceeded; the run was killed"
    if stopped == "disk":
        return "disk", f"disk: the run directory grew past {_mib(disk_cap)}; the run was killed"
    if stopped == "files":
        return "disk", f"disk: the run directory holds more than {MAX_RUN_FILES} entries; the run was killed"
    if code == -signal.SIGXCPU:
        return "timeout", f"timeout: CPU time limit of {limits.cpu_s} s exceeded (SIGXCPU)"
    if code == -signal.SIGXFSZ:
        return "disk", f"disk: a file reached the file-size limit of {_mib(limits.file_bytes)} (SIGXFSZ)"
    by_code = {
        child.EXIT_CRASHED: "crashed",
        child.EXIT_VIOLATION: "violation",
        child.EXIT_MEMORY: "memory",
        child.EXIT_DISK: "disk",
    }
    if code == child.EXIT_OK and result.get("verdict") == "ok":
        return "ok", "ok"
    if code in by_code:
        line = result.get("verdict_line") or f"{by_code[code]}: (no report written)"
        return by_code[code], line
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        if code == -signal.SIGKILL:
            return "memory", f"memory: killed by {name} (most likely out of memory)"
        return "crashed", f"crashed: killed by {name}"
    last = output.strip().splitlines()[-1] if output.strip() else "no output"
    return "crashed", f"crashed: the child exited with status {code} ({last[:300]})"


def _mib(n: int | None) -> str:
    return "none" if n is None else f"{n / (1 << 20):g} MiB"
