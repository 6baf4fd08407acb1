"""Loading a local Hugging Face model directory with transformers, with every tensor accounted for.

transformers reports a config.json that disagrees with its weights in a multi-line LOAD REPORT, and a
tensor the weights lack (or hold beyond what config.json describes) only as a warning: it random-inits or
drops it and loads anyway. `load_hf_model` silences that report and the progress bar, reads transformers'
loading info instead, and turns a missing, unexpected or wrongly shaped tensor into one ConvertError that
names the tensor, both shapes and the config.json field to correct when one explains the difference.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kvlab.convert.hf_deepseek import DeepSeekMLA
from kvlab.convert.hf_families import GPT2, ConvertError, Llama, NeoX

# HF config.model_type -> the family adapter that reads it
IMPORTERS: dict[str, type] = {
    "gpt2": GPT2,
    "gpt_neox": NeoX,
    "llama": Llama,
    "mistral": Llama,
    "deepseek_v3": DeepSeekMLA,
}

# Tensors an HF state dict may carry that are not weights (rotary tables, causal-mask buffers).
NOT_WEIGHTS = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias", ".attention.bias",
               ".attention.masked_bias")  # fmt: skip
MAX_FIELD_TRIALS = 48  # candidate config.json corrections tried when shapes disagree (meta models: cheap)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].rstrip(".") if text else type(e).__name__


def importer(model_type: str):
    """The family adapter that imports an HF model_type, or one line listing what kvlab imports."""
    if model_type not in IMPORTERS:
        raise ConvertError(
            f"HF architecture model_type={model_type!r} is not supported; kvlab imports "
            f"{', '.join(sorted(IMPORTERS))} (GPT2LMHeadModel, GPTNeoXForCausalLM, LlamaForCausalLM, ...)"
        )
    return IMPORTERS[model_type]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings (its LOAD REPORT table) and progress bars off; kvlab reports problems itself."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """transformers' AutoModelForCausalLM from a local directory (config.json + weights), in eval mode.

    Refuses, in one line, a directory that is missing, has no config.json, holds an architecture kvlab
    does not import, whose weights are missing or truncated, or whose config.json does not match them.
    """
    path = Path(str(path).removeprefix("hf:")).expanduser()
    if not (path / "config.json").is_file():
        raise ConvertError(
            f"{path} is not a Hugging Face model directory (no config.json); pass a directory written by "
            "save_pretrained, or a model name kvlab can fetch (kvlab models list)"
        )
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - transformers is a dependency of the hf extra
        raise ConvertError(
            f"importing HF checkpoints needs transformers ({e}); pip install 'kvlab[hf]'"
        ) from e
    try:
        hc = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ConvertError(f"{path}/config.json cannot be read: {_first_line(e)}") from None
    importer(hc.model_type)
    with quiet_transformers():
        try:
            # Mismatched shapes are loaded (random-initialised) rather than raised, so that the loading
            # info names them; kvlab then refuses the model below.
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, dtype=dtype, output_loading_info=True,
                ignore_mismatched_sizes=True,
            )  # fmt: skip
        except Exception as e:  # transformers raises OSError, ValueError, SafetensorError, RuntimeError ...
            raise ConvertError(
                f"cannot load the weights in {path}: {_first_line(e)}; the files may be missing or "
                "truncated (re-download or re-export them)"
            ) from None
        check_loading_info(path, hc, info)
    return model.eval()


def _count(keys: list) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def check_loading_info(path: Path, hc, info: dict) -> None:
    """One ConvertError line for the first tensor the weights and config.json disagree on, if any."""
    mismatched = sorted((k, tuple(a), tuple(b)) for k, a, b in info.get("mismatched_keys") or ())
    if mismatched:
        key, in_file, in_config = mismatched[0]
        fix = config_fix(hc, mismatched)
        fix = (
            f"set {fix[0]} to {fix[2]} in config.json (it says {fix[1]})"
            if fix
            else "correct config.json to match the weights, or re-export the model (save_pretrained)"
        )
        raise ConvertError(
            f"{path}: config.json does not match the weights: {key} has shape {in_file} in the checkpoint "
            f"but config.json makes it {in_config}{_count(mismatched)}; {fix}"
        )
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ConvertError(
            f"{path}: the weights lack {missing[0]}{_count(missing)}, which config.json implies; the "
            "checkpoint is incomplete, or config.json describes a larger model: correct config.json (e.g. "
            "num_hidden_layers) or re-export the model"
        )
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.endswith(NOT_WEIGHTS))
    if unexpected:
        raise ConvertError(
            f"{path}: the weights hold {unexpected[0]}{_count(unexpected)}, which config.json has no place "
            "for; config.json describes a smaller model: correct it (e.g. num_hidden_layers) or re-export "
            "the model"
        )


def _meta_shapes(hc) -> dict[str, tuple[int, ...]] | None:
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hc)
    except Exception:  # a candidate value the architecture cannot take
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def config_fix(hc, mismatched: list[tuple[str, tuple, tuple]]) -> tuple[str, int, int] | None:
    """(field, config.json's value, the value the weights were made with) when changing one integer field
    of config.json gives every tensor the checkpoint's shape (and leaves the others as they are)."""
    base = _meta_shapes(hc)
    if base is None:
        return None
    fields = {k: v for k, v in hc.to_dict().items() if type(v) is int and v > 0 and not k.endswith("_id")}
    candidates: list[tuple[str, int, int]] = []
    pairs = {(got, want) for _, f, c in mismatched for got, want in zip(f, c) if got != want}
    for got, want in sorted(pairs):
        for name, value in fields.items():
            # the field is the dimension (intermediate_size) or scales it (num_key_value_heads x head_dim)
            candidate = (name, value, value * got // want)
            if (value * got) % want == 0 and candidate not in candidates:
                candidates.append(candidate)
    wanted = {k: in_file for k, in_file, _ in mismatched}
    for name, value, new in candidates[:MAX_FIELD_TRIALS]:
        if new <= 0:
            continue
        shapes = _meta_shapes(type(hc).from_dict({**hc.to_dict(), name: new}))
        if shapes is not None and all(shapes.get(k) == wanted.get(k, s) for k, s in base.items()):
            return name, value, new
    return None
