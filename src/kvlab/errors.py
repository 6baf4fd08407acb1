"""The base of every user-facing error: the CLI prints these as one line (no traceback) and exits 2.

Also the one wording for output paths that cannot be written (`output_problem`), shared by training,
data preparation and reports.
"""

from __future__ import annotations

import errno
from pathlib import Path


class KvlabError(ValueError):
    """A user mistake or unusable input; the message says what is wrong and how to fix it."""


class OutputError(KvlabError):
    """An output path that cannot be written (a file in the way, no permission, read-only, disk full)."""


_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "code: 28")


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT from Python, from a Rust writer (safetensors, tokenizers: reported only as text), or
    as the cause or context of another exception (a library's wrapper around the failed write)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e) for t in _DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


_HINTS = {
    errno.EEXIST: "a file is in the way of a directory; choose another path",
    errno.ENOTDIR: "a parent of it is a file, not a directory; choose another path",
    errno.EACCES: "no permission; choose a writable path",
    errno.EPERM: "no permission; choose a writable path",
    errno.EROFS: "the filesystem is read-only; choose a writable path",
    errno.EISDIR: "it is a directory; choose a file path",
}


def check_output_path(value: str | Path | None, option: str) -> Path:
    """An output path the user named: an empty one would silently mean the current directory."""
    if value is None or not str(value).strip():
        raise OutputError(f"{option} {str(value)!r} is empty: pass the directory to write (a path)")
    return Path(value)


def output_problem(path: str | Path, e: BaseException) -> str:
    """One line saying why `path` cannot be written and what to do."""
    if is_disk_full(e):
        return f"cannot write {path}: the disk is full; free space and run again"
    reason = getattr(e, "strerror", None) or str(e)
    hint = _HINTS.get(getattr(e, "errno", None), "choose another path")
    return f"cannot write {path}: {reason} ({hint})"
