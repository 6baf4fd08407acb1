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
    """An attention file that cannot be read or has no usable region."""


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
        raise AttentionFileError(
            f"{path}: expected one '{BEGIN_MARKER}' line followed by one '{END_MARKER}' line "
            f"(found {len(begins)} BEGIN, {len(ends)} END); start from `kvlab init-attention {path}`"
        )
    return Region(path, "".join(lines[begins[0] + 1 : ends[0]]), begins[0] + 2)


def read_region(path: str | Path) -> Region:
    path = Path(path)
    if not path.is_file():
        raise AttentionFileError(f"{path}: no such file; create one with `kvlab init-attention {path}`")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AttentionFileError(f"{path}: cannot read it as UTF-8 text ({e})") from e
    return split_region(text, path)


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
