"""Next-token cross-entropy through the LM head without materialising the logits (CPU training).

`linear_cross_entropy(h, W, targets)` == F.cross_entropy(h @ W^T, targets) (mean over tokens): the rows
go through the head in chunks (`chunk_rows`: about 2 x the hidden width), and each chunk's gradients
(softmax - onehot) are formed right after its logits. At the cpu-tiny shape (2048 tokens x 8192
vocabulary per micro-batch) the unfused path writes and re-reads 64 MiB logits, log-probabilities and their
gradients and spends about a quarter of a training step there; this does the same three GEMMs and one
exp per logit (benchmarks/README.md, training). The gradients are computed in the forward (a scalar
loss has one upstream gradient, applied in backward), so peak memory holds grad(h) and grad(W) instead of
three copies of the logits.
"""

from __future__ import annotations

import torch

# Logits per chunk: at least 4 MiB and at most 256 MiB of them, else 2 x the hidden width in rows.
_MIN_CHUNK_BYTES, _MAX_CHUNK_BYTES = 4 << 20, 256 << 20


def chunk_rows(n_embd: int, vocab_size: int) -> int:
    """Rows of h per chunk. Each chunk reads the (V, C) head twice and read-modify-writes its gradient
    (~12 V C bytes, once per chunk), while its own logits cost ~16 V bytes per row wherever they live;
    with rows ~ 2C the head's share per row falls below the logits'. A fixed 4 MiB of logits was 20 rows
    at GPT-2's vocabulary: its 147 MiB head was re-read every 20 rows, and at SmolLM2's shape the fused
    loss was 1.5x slower than logits + F.cross_entropy (benchmarks/README.md, training). Measured on the
    2-core EPYC VM, float32, 2048 rows: 2C was at or near the best chunk for C = 128..768, V = 8192..50304."""
    row_bytes = 4 * vocab_size
    rows = min(2 * n_embd, _MAX_CHUNK_BYTES // row_bytes)
    return max(rows, _MIN_CHUNK_BYTES // row_bytes, 1)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        N = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        total = h.new_zeros(())
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
        return gh, gw, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of logits h @ weight^T: h (..., C), weight (V, C), targets (...) -> scalar.
    Float32 (the logits are formed in h's dtype; callers use it without autocast). `rows` per chunk:
    `chunk_rows` by default."""
    rows = chunk_rows(h.shape[-1], weight.shape[0]) if rows is None else rows
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), rows)
