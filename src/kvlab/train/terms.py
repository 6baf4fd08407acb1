"""Pluggable loss terms and per-step hooks for the training loop.

A loss term is `fn(model, idx, targets, logits) -> (loss, logged)` with a weight; the step's loss is the
weighted sum. A hook is `fn(model, generator)` called before every optimizer step with its own seeded,
checkpointed generator (MatryoshkaKV samples per-head ranks there). Distillation follows MatryoshkaKV:
0.25 x KL(teacher || student) + 0.75 x cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

TermFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
# Run before every training step as hook(model, generator). A hook may also define `before_eval(model)`,
# called before each evaluation and checkpoint: a hook that perturbs the model for training (Matryoshka's
# random ranks) puts the model back into the state that is scored and saved there.
Hook = Callable[[nn.Module, torch.Generator], None]


@dataclass
class LossTerm:
    name: str  # key of the term's logged values ("ce", "kl", "oacd", ...)
    fn: TermFn
    weight: float = 1.0


def cross_entropy(model, idx, targets, logits) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy (nats per token), in float32 whatever the autocast dtype."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    return loss, {"ce": loss.detach()}


def kl_to_teacher(teacher: nn.Module, temperature: float = 1.0) -> TermFn:
    """KL(teacher || student) per token on the softmax of the logits (teacher frozen, no grad)."""

    def fn(model, idx, targets, logits):
        with torch.no_grad():
            t_logits = teacher(idx)
        t_logp = F.log_softmax(t_logits.float() / temperature, dim=-1).flatten(0, 1)  # (B*T, V)
        s_logp = F.log_softmax(logits.float() / temperature, dim=-1).flatten(0, 1)
        kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * temperature**2
        return kl, {"kl": kl.detach()}

    return fn


def default_terms() -> list[LossTerm]:
    return [LossTerm("ce", cross_entropy, 1.0)]


def distillation_terms(
    teacher: nn.Module, kl_weight: float = 0.25, ce_weight: float = 0.75, temperature: float = 1.0
) -> list[LossTerm]:
    """MatryoshkaKV's objective: kl_weight x KL(teacher || student) + ce_weight x CE."""
    teacher.eval().requires_grad_(False)
    return [
        LossTerm("kl", kl_to_teacher(teacher, temperature), kl_weight),
        LossTerm("ce", cross_entropy, ce_weight),
    ]


def total_loss(terms: list[LossTerm], model, idx, targets, logits) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the terms; logged values keep each term's own (unweighted) numbers."""
    total, logged = None, {}
    for term in terms:
        loss, values = term.fn(model, idx, targets, logits)
        logged.update(values)
        weighted = term.weight * loss
        total = weighted if total is None else total + weighted
    return total, logged
