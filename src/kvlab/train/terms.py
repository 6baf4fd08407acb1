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

from kvlab.train.linear_ce import linear_cross_entropy

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


def fused_cross_entropy_applies(terms: list[LossTerm], model: nn.Module, device, autocast_dtype: str) -> bool:
    """Whether `micro_batch_loss` may take the fused LM-head cross-entropy: the loss is cross-entropy
    alone, the model is a kvlab GPT, and training runs in float32 (no autocast) on the CPU, where it was
    measured faster; under autocast and on GPUs the logits path is kept."""
    from kvlab.model import GPT

    return (
        len(terms) == 1
        and terms[0].fn is cross_entropy
        and isinstance(model, GPT)
        and torch.device(device).type == "cpu"
        and autocast_dtype == "float32"
        and model.lm_head.weight.dtype == torch.float32
    )


def micro_batch_loss(model, raw_model, terms: list[LossTerm], idx, targets, fused: bool) -> torch.Tensor:
    """The training loss of one micro-batch. fused: cross-entropy straight from the final hidden states
    through the LM head (kvlab.train.linear_ce), the same value as the terms' without the logits tensor.
    `model` may be the compiled / DDP wrapper of `raw_model`."""
    if fused:
        hidden = model(idx, hidden=True)  # (B, T, C)
        return terms[0].weight * linear_cross_entropy(hidden, raw_model.lm_head.weight, targets)
    return total_loss(terms, raw_model, idx, targets, model(idx))[0]


def total_loss(terms: list[LossTerm], model, idx, targets, logits) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the terms; logged values keep each term's own (unweighted) numbers."""
    total, logged = None, {}
    for term in terms:
        loss, values = term.fn(model, idx, targets, logits)
        logged.update(values)
        weighted = term.weight * loss
        total = weighted if total is None else total + weighted
    return total, logged
