"""Converters: pure functions from a trained model to a reduced-KV variant of it (one module per scheme).

Each converter builds the target model, copies every shared tensor key by key asserting its shape, and
initialises only what the target adds, so at its no-op setting the converted model reproduces the original.
Modules: hf (from_hf / to_hf / export_hf for GPT-2, GPT-NeoX, Llama, DeepSeek MLA; per-family mappings in
hf_families), grouped (to_gqa, to_kv_share), matryoshka (to_matryoshka), common.
"""

from kvlab.convert.hf import ConvertError, export_hf, from_hf, to_hf

__all__ = ["ConvertError", "export_hf", "from_hf", "to_hf"]
