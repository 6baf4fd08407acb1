"""Default training budgets per model preset (`train_preset(name)`).

gpt2-124m carries seed 000's budget family; cpu-tiny is sized by measurement on 2 CPU cores so that a
run ends well below the data's unigram entropy in about two minutes (see benchmarks/README.md).
"""

from __future__ import annotations

from typing import Any

from kvlab.config import MODEL_PRESETS, ConfigError, TrainConfig

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # Seed 000 / nanoGPT: 5000 iters x batch 12 x grad_accum 5 x 1024 tokens (~307M tokens), lr 6e-4.
    "gpt2-124m": dict(
        max_iters=5000, eval_interval=250, eval_iters=200, batch_size=12, grad_accum=5, lr=6e-4
    ),
    # seed 000's 345M runs used lr 3e-4 (and ~7B tokens over 2 GPUs); the budget here is the 124M one.
    "gpt2-345m": dict(
        max_iters=5000, eval_interval=250, eval_iters=200, batch_size=12, grad_accum=5, lr=3e-4
    ),
    # 300 x 8 x 256 = 614k tokens: about 2 minutes on 2 idle cores. Measured on shakespeare bpe-8k
    # (unigram entropy 6.33), gqa: lr 3e-3 over 200 steps -> val 6.06 at step 100, 5.77 at 200; over a
    # 100-step budget lr 6e-3 beat 3e-3 (6.18 vs 6.25). Small batches + a high peak lr: short CPU
    # budgets need many updates per token.
    "cpu-tiny": dict(
        max_iters=300, eval_interval=100, eval_iters=10, log_interval=10, batch_size=8, grad_accum=1, lr=6e-3
    ),
}


def train_preset(name: str, **overrides: Any) -> TrainConfig:
    """The default TrainConfig for a model preset, with any field overridden."""
    if name not in TRAIN_PRESETS:
        known = ", ".join(sorted(set(TRAIN_PRESETS) & set(MODEL_PRESETS)))
        raise ConfigError(f"no training preset for {name!r}; choose one of {known}")
    return TrainConfig.from_dict({**TRAIN_PRESETS[name], **overrides})
