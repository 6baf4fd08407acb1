"""The contained child: `python -m kvlab.harness.child` runs one attention file's job in its run directory.

The parent (`contain.py`) starts it with cwd = the run directory, resource limits and a scrubbed
environment. Before any of the submission's code runs, the child imports everything it needs, then locks
itself in: Landlock confines writes to the run directory in the kernel (C-level writes such as torch.save
included), and a Python audit hook refuses subprocesses, sockets, signals, library loading and writes
outside the run directory, remembering each attempt. Then: load + build, one forward, declared and
measured KV metrics, the file's own cache where it implements kvlab's cache interface (harness/cached.py),
optionally kvlab's training loop, the held-out evaluation a bench cell needs (kvlab.eval.evaluate on the
trained model in memory, or on weights trained by an earlier run; the corpora come resolved by the parent,
so nothing here fetches or writes outside), and generation: cached decoding through that cache when it
decodes as the full forward does, else cache-free (seed 000's method); `harness.json` holds it all. A
`declare_only` job just builds the model (on the meta device where it can) and reports its declared figures.
Exit status: 0 ok, 3 crashed, 4 violation, 5 memory, 6 disk (a write past RLIMIT_FSIZE failed with EFBIG;
the parent reads timeouts from signals).
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

from kvlab.harness.child_job import run_job

JOB_FILE = "job.json"
RESULT_FILE = "harness.json"
EXIT_OK, EXIT_CRASHED, EXIT_VIOLATION, EXIT_MEMORY, EXIT_DISK = 0, 3, 4, 5, 6

_BLOCKED_EVENTS = (
    "subprocess.Popen",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "pty.spawn",
    "os.kill",
    "os.killpg",
    "signal.pthread_kill",
    "socket.",
    "ctypes.dlopen",
    "os.startfile",
)
_PATH_EVENTS = (
    "os.remove",
    "os.rename",
    "os.rmdir",
    "os.mkdir",
    "os.symlink",
    "os.link",
    "os.truncate",
    "os.chmod",
    "os.chown",
    "os.utime",
    "shutil.",
    "os.chdir",
    "os.chroot",
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
violations: list[str] = []


class ContainmentViolation(PermissionError):
    """Raised by the audit hook: the submission tried to reach outside its run directory."""


def _outside(path, root: str) -> bool:
    if isinstance(path, int):
        return False  # an fd it already holds
    p = os.path.realpath(os.fsdecode(path))
    return p != os.devnull and not (p == root or p.startswith(root + os.sep))


def install_audit_hook(root: str) -> None:
    """Refuse (and remember) what leaves the run directory; audit hooks cannot be removed once added."""

    def hook(event: str, args) -> None:
        refused = None
        if event.startswith(_BLOCKED_EVENTS):
            refused = event
        elif event == "open" and args and args[0] is not None:
            mode, flags = args[1] or "", args[2] or 0
            if (any(c in mode for c in "wax+") or flags & _WRITE_FLAGS) and _outside(args[0], root):
                refused = f"open({args[0]!r}, {mode or flags!r})"
        elif event.startswith(_PATH_EVENTS) and any(
            isinstance(a, (str, bytes, os.PathLike)) and _outside(a, root) for a in args
        ):
            refused = f"{event}{args!r}"
        if refused is not None:
            violations.append(refused)
            raise ContainmentViolation(f"refused by kvlab containment: {refused}")

    sys.addaudithook(hook)


def lock_in(root: str, device: str) -> dict:
    """Landlock (when the kernel has it) + the audit hook; returns what is in force."""
    from kvlab.harness.landlock import restrict_writes

    files = [os.devnull]
    if device.startswith("cuda"):  # the driver talks through /dev/nvidia*; open them before locking
        import torch

        torch.zeros(1, device=device)
        files += [str(p) for p in Path("/dev").glob("nvidia*")]
    abi = restrict_writes([root], files)
    sys.dont_write_bytecode = True
    install_audit_hook(root)
    return {"landlock_abi": abi, "audit_hook": True, "writable": [root]}


def _classify(exc: BaseException, root: Path | None = None, file_bytes: int | None = None) -> tuple[int, str]:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:400]
    chain = [exc, *(_causes(exc))]
    if violations or any(isinstance(e, PermissionError) or "Permission denied" in str(e) for e in chain):
        first = violations[0] if violations else text
        return EXIT_VIOLATION, f"violation: a write or escape outside the run directory was refused ({first})"
    if any(isinstance(e, MemoryError) or _is_alloc_failure(e) for e in chain):
        return EXIT_MEMORY, f"memory: the memory limit was hit ({text})"
    at_limit = _file_at_limit(root, file_bytes)
    if at_limit is not None or any(_is_file_too_large(e) for e in chain):
        return EXIT_DISK, _disk_line(at_limit, file_bytes, text)
    return EXIT_CRASHED, f"crashed: {text}"


def _causes(exc: BaseException):
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__
        yield exc


def _is_alloc_failure(e: BaseException) -> bool:
    s = str(e).lower()
    return "can't allocate memory" in s or "out of memory" in s or "cannot allocate memory" in s


def _is_file_too_large(e: BaseException) -> bool:
    """EFBIG from Python, or from a Rust writer (safetensors) that reports it as text."""
    return (isinstance(e, OSError) and e.errno == errno.EFBIG) or "file too large" in str(e).lower()


def _file_at_limit(root: Path | None, file_bytes: int | None) -> Path | None:
    """A file under root as large as RLIMIT_FSIZE allows: a write stopped there (torch.save's C++ writer
    reports only an 'unexpected pos' error, and a submission may swallow the error altogether)."""
    if root is None or file_bytes is None:
        return None
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            try:
                if path.lstat().st_size >= file_bytes:
                    return path
            except OSError:
                continue
    return None


def _disk_line(path: Path | None, file_bytes: int | None, text: str | None = None) -> str:
    what = f"{path.name} reached" if path is not None else "a file reached"
    limit = "" if file_bytes is None else f" of {file_bytes / (1 << 20):g} MiB"
    return f"disk: {what} the file-size limit{limit}" + (f" ({text})" if text else "")


def main() -> int:
    root = Path.cwd().resolve()
    job = json.loads((root / JOB_FILE).read_text())
    # import everything the job needs before the lock: imports read files only, but do it while we may
    import torch  # noqa: F401

    import kvlab.checkpoint as checkpoint
    import kvlab.eval.report  # noqa: F401
    import kvlab.eval.speed  # noqa: F401
    import kvlab.harness.cached  # noqa: F401
    import kvlab.harness.loader  # noqa: F401
    import kvlab.harness.metrics  # noqa: F401
    import kvlab.train.loop  # noqa: F401

    if job.get("evaluate"):
        import safetensors.torch  # noqa: F401

        import kvlab.data  # noqa: F401
        import kvlab.eval.tasks  # noqa: F401

    env_info = checkpoint.environment_info()  # runs git: before the lock refuses subprocesses
    checkpoint.environment_info = lambda: env_info
    containment = lock_in(str(root), job.get("device", "cpu"))
    started = time.perf_counter()
    code, verdict, result = EXIT_OK, "ok", {}
    try:
        run_job(job, root, result)
        if violations:  # attempts the submission caught and hid still count
            code, verdict = _classify(ContainmentViolation(violations[0]))
        elif (at_limit := _file_at_limit(root, job.get("file_bytes"))) is not None:  # a hidden EFBIG too
            code, verdict = EXIT_DISK, _disk_line(at_limit, job.get("file_bytes"))
    except BaseException as e:  # noqa: BLE001 - every failure of the submission becomes a verdict
        code, verdict = _classify(e, root, job.get("file_bytes"))
        result["traceback"] = traceback.format_exc()[-4000:]
    result.update(
        verdict=verdict.split(":")[0],
        verdict_line=verdict,
        containment=containment,
        elapsed_s=time.perf_counter() - started,
        violations=violations[:20],
    )
    (root / RESULT_FILE).write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    print(verdict, flush=True)
    return code


def _jsonable(x):
    return None if isinstance(x, float) and not math.isfinite(x) else str(x)


if __name__ == "__main__":
    sys.exit(main())
