"""Language-model loss computed from hidden states, a few rows of logits at a time.

``linear_cross_entropy(hidden, weight, labels)`` equals
``F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)`` but never holds the whole
(tokens x vocab) logit matrix: for a batch of 8 x 8192 tokens and 5000 words that matrix
(with its log-softmax and gradient) would take about 4 GB. With gradients on, the
gradients of ``hidden`` and ``weight`` are computed chunk by chunk in the forward pass
(the loss is the last node of the graph, so its gradient is a scalar that only scales them).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MB in float32)


def _rows_per_chunk(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows, vocab = hidden.shape[0], weight.shape[0]
        valid = labels != IGNORE_INDEX
        n_valid = valid.sum().clamp(min=1).to(hidden.dtype)
        targets = labels.clamp(min=0)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        total = hidden.new_zeros(())
        step = _rows_per_chunk(vocab)
        for start in range(0, rows, step):
            end = min(rows, start + step)
            h, t, v = hidden[start:end], targets[start:end], valid[start:end]
            logits = h @ weight.t()
            target_logits = logits.gather(1, t[:, None]).squeeze(1)
            row_max = logits.max(dim=1).values
            probs = logits.sub_(row_max[:, None]).exp_()  # in place: logits are not needed again
            sums = probs.sum(dim=1)
            total += ((row_max + sums.log() - target_logits) * v).sum()
            if want_hidden or want_weight:
                # d loss / d logits = (softmax - one_hot(target)) / n_valid on labelled rows
                probs.div_(sums[:, None])
                probs[torch.arange(end - start, device=probs.device), t] -= 1.0
                probs.mul_((v.to(probs.dtype) / n_valid)[:, None])
                if want_hidden:
                    torch.mm(probs, weight, out=grad_hidden[start:end])
                if want_weight:
                    grad_weight.addmm_(probs.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss if grad_hidden is not None else None,
            grad_weight * grad_loss if grad_weight is not None else None,
            None,
        )


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the labelled rows (label != -100) of ``hidden @ weight.T``.

    ``hidden`` (N, d), ``weight`` (vocab, d), ``labels`` (N,). Computed in float32 (autocast
    off); differentiable with respect to ``hidden`` and ``weight``.
    """
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden.float(), weight.float(), labels)


@torch.no_grad()
def token_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy (N,) of ``hidden @ weight.T`` (0 for rows labelled -100),
    computed chunk by chunk without gradients (evaluation)."""
    losses = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
    step = _rows_per_chunk(weight.shape[0])
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], step):
            logits = hidden[start : start + step].float() @ weight.float().t()
            chunk = labels[start : start + step]
            losses[start : start + step] = torch.nn.functional.cross_entropy(
                logits, chunk, ignore_index=IGNORE_INDEX, reduction="none"
            )
    return losses
