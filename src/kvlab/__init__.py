"""kvlab: design, train and evaluate KV-cache-efficient attention in GPT-style language models."""

from kvlab.cache import CacheError, KVCache
from kvlab.config import AttentionConfig, ConfigError, ModelConfig
from kvlab.model import GPT

__version__ = "0.1.0"
__all__ = ["GPT", "AttentionConfig", "CacheError", "ConfigError", "KVCache", "ModelConfig", "__version__"]
