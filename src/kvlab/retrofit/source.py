"""What `kvlab uptrain --from` and a bench suite's [source] name: a kvlab run directory, a transformers
model (`hf:DIR`, a plain HF directory, a hub name when the hub answers, or a model kvlab can fetch), resolved
as every other command resolves it (kvlab.checkpoint.resolve_source). `load_source` loads it;
`source_config` reads only its architecture (for `kvlab bench --dry-run`: nothing is fetched or loaded)."""

from __future__ import annotations

from pathlib import Path

from kvlab.config import MODEL_PRESETS, ModelConfig
from kvlab.errors import KvlabError


def _not_a_source(spec: str, flag: str) -> KvlabError:
    return KvlabError(
        f"{flag} {spec!r} is not a kvlab run directory (config.json + model.safetensors); pass a run "
        "directory, hf:DIR (a local Hugging Face model) or a model name from `kvlab models list`"
    )


def _is_run_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def load_source(spec: str, flag: str = "--from"):
    """(model, description, directory): a float32 GPT in eval mode, what it was (`run:DIR` or the HF
    spec), and the directory holding its tokenizer (the run directory, or the HF model directory)."""
    from kvlab.checkpoint import load_model, names_hf_model, resolve_source

    if names_hf_model(spec):
        from kvlab.convert.hf import from_hf

        _, hf_dir = resolve_source(spec)  # a registered name is fetched once here
        return from_hf(hf_dir).float(), spec, hf_dir
    path = Path(spec)
    if _is_run_dir(path):
        return load_model(path), f"run:{path}", path
    raise _not_a_source(spec, flag)


def source_config(spec: str, flag: str = "source.from") -> ModelConfig:
    """The ModelConfig of a source without loading its weights. A registered model that is not fetched
    yet answers with the model preset of the same name (its architecture), so nothing is downloaded."""
    from kvlab.checkpoint import names_hf_model, read_config, resolve_source
    from kvlab.models import MODELS, ModelError, cached_model_dir

    path = Path(spec)
    if not names_hf_model(spec):
        if _is_run_dir(path):
            return ModelConfig.from_dict(read_config(path)["model"])
        raise _not_a_source(spec, flag)
    if spec in MODELS:
        try:
            hf_dir = cached_model_dir(spec)
        except ModelError:
            if spec in MODEL_PRESETS:
                return ModelConfig.preset(spec)
            raise
    else:
        _, hf_dir = resolve_source(spec)
    from transformers import AutoConfig

    from kvlab.convert.hf import _importer

    hc = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    return _importer(hc.model_type).config_from_hf(hc)
