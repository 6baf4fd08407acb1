"""The seed-000 optimiser: AdamW with decay on 2-D parameters only, warmup + cosine LR, trainable filter.

`lr_at` is nanoGPT's schedule (linear warmup over `warmup_frac` of the steps, cosine down to lr/10 at
`max_iters`); `select_trainable` freezes every parameter whose name does not match the given patterns
(Context-KV phase 1 trains only the context block; MatryoshkaKV trains only the projections).
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from kvlab.config import ConfigError, TrainConfig

Trainable = Iterable[str] | Callable[[str], bool] | None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    warmup = cfg.warmup_iters
    if step < warmup:  # nanoGPT: (it + 1) / (warmup + 1), so step 0 already moves the weights
        return cfg.lr * (step + 1) / (warmup + 1)
    if step >= cfg.max_iters:
        return cfg.final_lr
    ratio = (step - warmup) / max(1, cfg.max_iters - warmup)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.final_lr + coeff * (cfg.lr - cfg.final_lr)


def select_trainable(model: nn.Module, trainable: Trainable) -> list[str]:
    """Set requires_grad from `trainable` (glob patterns on parameter names, or a predicate); return the
    names left trainable. None trains everything."""
    names = [n for n, _ in model.named_parameters()]
    if trainable is None:
        keep = set(names)
    elif callable(trainable):
        keep = {n for n in names if trainable(n)}
    else:
        patterns = [trainable] if isinstance(trainable, str) else list(trainable)
        # A bare name fragment ("context") matches anywhere; globs ("blocks.0.attn.*") match the whole name.
        globs = [p if any(c in p for c in "*?[") else f"*{p}*" for p in patterns]
        keep = {n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)}
    if not keep:
        raise ConfigError(
            f"trainable={trainable!r} matches no parameter; names look like {names[:3]} (globs allowed)"
        )
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    return [n for n in names if n in keep]


# name -> (lr multiplier, decay allowed): MatryoshkaKV trains its projections at 20x the base lr, undecayed.
GroupRule = Callable[[str], tuple[float, bool]]


def param_groups(model: nn.Module, weight_decay: float, rule: GroupRule | None = None) -> list[dict]:
    """Decay matrices and embeddings (dim >= 2); never biases or norm gains (seed 000). With `rule`,
    parameters are further grouped by its (lr multiplier, decay allowed); the loop applies `lr_scale`."""
    if rule is None:
        params = [p for p in model.parameters() if p.requires_grad]  # parameters() dedups tied weights
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():  # named_parameters() dedups tied weights too
        if p.requires_grad:
            scale, may_decay = rule(name)
            groups.setdefault((scale, weight_decay if may_decay and p.dim() >= 2 else 0.0), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr_scale": s} for (s, wd), ps in sorted(groups.items())]


def configure_optimizer(
    model: nn.Module, cfg: TrainConfig, device_type: str, rule: GroupRule | None = None
) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay, rule)
    # The fused kernel is faster on CUDA; on CPU the default (foreach) path keeps resume bit-exact.
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)
