"""Auxiliary training losses beyond next-token cross-entropy.

`oacd_loss`: seed 001's Origin-Anchored Centroid Dispersion, phase 1 of Context-KV training, and
`oacd_term`, the same as a `kvlab.train.terms` loss term. (Cross-entropy and the distillation KL live
in `kvlab.train.terms`.)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kvlab.attention.context import collect_contexts
from kvlab.errors import KvlabError


def oacd_loss(contexts: torch.Tensor, centroid_weight: float = 0.1) -> torch.Tensor:
    """-||X - mean(X)||_F / n + centroid_weight * ||mean(X)||^2 over n context vectors X (n, d).

    The first term spreads the contexts apart (diversity), the second anchors their centroid at the
    origin so the spread cannot come from drifting away (seed 001). Leading axes are flattened, so
    (B, n_slots, d) from `collect_contexts` works directly.
    """
    x = contexts.reshape(-1, contexts.shape[-1])  # (n, d)
    if x.shape[0] == 0:
        raise KvlabError("oacd_loss got no context vectors; feed sequences at least one interval long")
    centroid = x.mean(dim=0)  # (d,)
    dispersion = -torch.linalg.vector_norm(x - centroid) / x.shape[0]  # Frobenius norm, as the seed
    return dispersion + centroid_weight * centroid.pow(2).sum()


def oacd_term(model: nn.Module, idx: torch.Tensor, targets, logits) -> tuple[torch.Tensor, dict]:
    """Loss term (kvlab.train.terms signature): mean OACD over the model's Context-KV layers.

    It reruns the forward on idx to collect the context vectors with gradients; phase 1 trains only the
    `context_block` parameters (`kvlab.attention.context.context_block_parameters`), so that pass is the
    one that matters and the trainer's own forward can run under no_grad or be skipped.
    """
    contexts = collect_contexts(model, idx)
    loss = sum(oacd_loss(c) for c in contexts) / len(contexts)
    return loss, {"oacd": loss.detach()}
