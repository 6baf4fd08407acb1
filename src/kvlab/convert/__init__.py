"""Converters: pure functions from a trained model to a reduced-KV variant of it (one module per scheme).

Each converter builds the target model, copies every shared tensor key by key asserting its shape, and
initialises only what the target adds, so at its no-op setting the converted model reproduces the original.
Modules: hf_gpt2 (HF GPT-2 import), grouped (to_gqa, to_kv_share), matryoshka (to_matryoshka), common.
"""
