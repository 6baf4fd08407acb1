"""Pretrained models from outside kvlab: the fetchable-model registry, the cache, and `hf:` specs.

    from kvlab.models import fetch_model, resolve_model_source
    path = fetch_model("smollm2-135m")           # a local HF directory (config.json, model.safetensors, ...)
    resolve_model_source("hf:./my-model")        # -> Path; a run directory -> None

Converting such a directory into a kvlab model is `kvlab.convert.from_hf(path)`.
"""

from kvlab.models.fetch import cached_model_dir, convert_gguf, fetch_model, model_dir, models_root
from kvlab.models.registry import MODELS, ModelError, ModelSource, get_source
from kvlab.models.resolve import check_hf_dir, resolve_model_source

__all__ = [
    "MODELS",
    "ModelError",
    "ModelSource",
    "cached_model_dir",
    "check_hf_dir",
    "convert_gguf",
    "fetch_model",
    "get_source",
    "model_dir",
    "models_root",
    "resolve_model_source",
]
