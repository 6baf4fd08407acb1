"""Attention files: the region markers, reading the region out of a file, and `init_attention`.

An attention file is any Python file with one `# BEGIN KV EDITABLE REGION` ... `# END KV EDITABLE
REGION` span (seed 000's custom_pretrain.py is one). Only the region counts: the loader runs it with the
frozen names in `REGION_GLOBALS`; the four fills in `templates/` reproduce seed 000's baselines.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kvlab.errors import KvlabError

BEGIN_MARKER = "# BEGIN KV EDITABLE REGION"
END_MARKER = "# END KV EDITABLE REGION"
REQUIRED_FUNCTIONS = ("build_kv_heads", "cross_layer_share", "latent_kv_project")
REQUIRED_CLASS = "CausalSelfAttention"

# fill -> (template file, the build_kv_heads return line it uses). gqa keeps n_head // 4 KV heads (seed 000).
FILLS = {
    "mha": ("dense.py", "    return config.n_head, head_dim\n"),
    "gqa": ("dense.py", "    return max(1, config.n_head // 4), head_dim\n"),
    "mqa": ("dense.py", "    return 1, head_dim\n"),
    "mla": ("mla.py", None),
}
_DENSE_RETURN = FILLS["mha"][1]


class AttentionFileError(KvlabError):
    """An attention file that cannot be read (missing, a directory, binary or not UTF-8): a usage error."""


class RegionMarkerError(AttentionFileError):
    """A readable text file without exactly one region: a violation of the file's contract."""


@dataclass(frozen=True)
class Region:
    """The editable span of one file: its source and the file line where the region's first line sits."""

    path: Path
    source: str
    first_line: int  # 1-based file line of the region's first source line (just after BEGIN)


def split_region(text: str, path: Path) -> Region:
    """The region between the markers; exactly one BEGIN followed by one END is required."""
    lines = text.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN_MARKER]
    ends = [i for i, line in enumerate(lines) if line.strip() == END_MARKER]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise RegionMarkerError(
            f"{path}: expected one '{BEGIN_MARKER}' line followed by one '{END_MARKER}' line "
            f"(found {len(begins)} BEGIN, {len(ends)} END); start from `kvlab init-attention {path}`"
        )
    return Region(path, "".join(lines[begins[0] + 1 : ends[0]]), begins[0] + 2)


def read_text(path: str | Path) -> str:
    """The file as text; AttentionFileError when it cannot be read as Python source (missing, a
    directory, binary, not UTF-8): a usage error, unlike a readable file that breaks the contract."""
    path = Path(path)
    if path.is_dir():
        raise AttentionFileError(f"{path} is a directory, not an attention file; pass the .py file")
    if not path.is_file():
        raise AttentionFileError(f"{path}: no such file; create one with `kvlab init-attention {path}`")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AttentionFileError(f"{path}: cannot read it ({e.strerror or e})") from e
    if b"\x00" in data:
        raise AttentionFileError(f"{path} is a binary file (it holds NUL bytes), not Python source")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AttentionFileError(
            f"{path} is not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r}); save it as UTF-8"
        ) from e


def read_region(path: str | Path) -> Region:
    """The file's region: AttentionFileError when it cannot be read (read_text), RegionMarkerError when
    it reads but has no single region."""
    return split_region(read_text(path), Path(path))


def template_text(fill: str = "mha") -> str:
    """The full text of an attention file whose region is one of seed 000's baselines."""
    if fill not in FILLS:
        raise AttentionFileError(f"unknown --from {fill!r}; choose one of {', '.join(FILLS)}")
    name, kv_line = FILLS[fill]
    text = resources.files("kvlab.harness").joinpath("templates").joinpath(name).read_text(encoding="utf-8")
    if kv_line is not None and kv_line != _DENSE_RETURN:
        if text.count(_DENSE_RETURN) != 1:  # the template changed: fail loudly, never write a wrong fill
            raise RuntimeError(f"templates/{name} lost its build_kv_heads return line")
        text = text.replace(_DENSE_RETURN, kv_line)
    return text.replace("--from FILL", f"--from {fill}")


def init_attention(path: str | Path, fill: str = "mha", force: bool = False) -> Path:
    """Write a new attention file with the `fill` baseline; refuses to overwrite unless force."""
    path = Path(path)
    if path.exists() and not force:
        raise AttentionFileError(f"{path} exists; pick another name or pass --force to overwrite it")
    text = template_text(fill)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
