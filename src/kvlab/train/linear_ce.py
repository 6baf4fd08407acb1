"""Next-token cross-entropy through the LM head without materialising the logits (CPU training).

`linear_cross_entropy(h, W, targets)` == F.cross_entropy(h @ W^T, targets) (mean over tokens): the rows
go through the head in chunks of about 4 MiB of logits, and each chunk's gradients (softmax - onehot)
are formed while it is still in cache. At the cpu-tiny shape (2048 tokens x 8192 vocabulary per
micro-batch) the unfused path writes and re-reads 64 MiB logits, log-probabilities and their
gradients and spends about a quarter of a training step there; this does the same three GEMMs and one
exp per logit (benchmarks/README.md, training). The gradients are computed in the forward (a scalar
loss has one upstream gradient, applied in backward), so peak memory holds grad(h) and grad(W) instead of
three copies of the logits.
"""

from __future__ import annotations

import torch

_CHUNK_BYTES = 4 << 20  # logits per chunk: the CPU's L2/L3, measured flat between 1 and 8 MiB


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        N, V = h.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        total = h.new_zeros(())
        rows = max(1, _CHUNK_BYTES // (4 * V))
        for start in range(0, N, rows):
            h_c, t_c = h[start : start + rows], targets[start : start + rows, None]  # (n, C), (n, 1)
            logits = torch.mm(h_c, weight.t())  # (n, V)
            target = logits.gather(1, t_c)  # (n, 1)
            top = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            probs = logits.sub_(top).exp_()  # exp(logits - max), in place: one exp per logit
            norm = probs.sum(dim=-1, keepdim=True)  # (n, 1)
            total += (top + norm.log() - target).sum()  # logsumexp - target logit
            if grad_h is None and grad_w is None:
                continue
            # d(mean loss)/d(logits) = (softmax - onehot) / N
            probs.mul_(norm.mul_(N).reciprocal_()).scatter_add_(1, t_c, probs.new_full(t_c.shape, -1.0 / N))
            if grad_h is not None:
                torch.mm(probs, weight, out=grad_h[start : start + rows])
            if grad_w is not None:
                grad_w.addmm_(probs.t(), h_c)
        ctx.save_for_backward(grad_h, grad_w)
        return total / N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out if grad_h is not None else None
        gw = grad_w * grad_out if grad_w is not None else None
        return gh, gw, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits h @ weight^T: h (..., C), weight (V, C), targets (...) -> scalar.
    Float32 (the logits are formed in h's dtype; callers use it without autocast)."""
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1))
