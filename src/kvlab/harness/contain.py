"""Contained runs: an attention file's job in a child process, locked into its own run directory.

`run_contained` copies the file into the run directory, writes the job, and starts
`python -m kvlab.harness.child` there with: cwd, HOME and TMPDIR inside the run directory; a scrubbed
environment; RLIMIT_CPU, RLIMIT_AS (CPU jobs; CUDA reserves address space, so GPU jobs rely on the wall
clock and the device's own limit), no core files; a wall-clock timeout that kills the whole process
group. The child adds Landlock and an audit hook (child.py). The outcome is one verdict:
ok / timeout / memory / crashed / violation, with a one-line reason.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kvlab
from kvlab.config import ModelConfig
from kvlab.errors import KvlabError
from kvlab.harness import child
from kvlab.harness.validate import validate_file

VERDICTS = ("ok", "timeout", "memory", "crashed", "violation")
ATTENTION_COPY = "attention.py"


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 3600  # CPU seconds (all threads); SIGXCPU past it
    wall_s: float = 3600.0  # wall clock; the process group is killed past it
    memory_bytes: int | None = 16 << 30  # RLIMIT_AS for CPU jobs (None: no limit)
    threads: int = 1


@dataclass
class Outcome:
    verdict: str  # one of VERDICTS
    line: str  # the verdict with its reason, e.g. "timeout: wall clock 3.0 s exceeded"
    run_dir: Path
    returncode: int | None
    elapsed_s: float
    result: dict[str, Any] = field(default_factory=dict)  # harness.json (the child's report)
    output: str = ""  # the child's stdout+stderr tail


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

    return apply


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
    """Run one attention file's job (build, forward, metrics, [train], [generation]) contained."""
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
        **job_options,
    }
    (run_dir / child.JOB_FILE).write_text(json.dumps(job, indent=2) + "\n")
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
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=limits.wall_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    elapsed = time.perf_counter() - start
    output = out.decode(errors="replace")[-4000:]
    result = _read_result(run_dir)
    verdict, line = _verdict(proc.returncode, timed_out, limits, result, output)
    return Outcome(verdict, line, run_dir, proc.returncode, elapsed, result, output)


def _read_result(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / child.RESULT_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _verdict(code: int | None, timed_out: bool, limits: Limits, result: dict, output: str) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"timeout: wall clock limit of {limits.wall_s:g} s exceeded; the run was killed"
    if code == -signal.SIGXCPU:
        return "timeout", f"timeout: CPU time limit of {limits.cpu_s} s exceeded (SIGXCPU)"
    by_code = {child.EXIT_CRASHED: "crashed", child.EXIT_VIOLATION: "violation", child.EXIT_MEMORY: "memory"}
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
