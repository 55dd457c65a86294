"""Log-probabilities of the sampled tokens and the entropy of each row's distribution, from the LM head's logits,
without keeping [rows x vocabulary] float32 tensors: rows are processed in chunks, in float32, and the backward pass
recomputes each chunk's softmax from the (bf16 on GPU) logits instead of storing it. Exact: the same float32
arithmetic as log_softmax + gather + entropy, with hand-written gradients checked against float64 autograd."""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 26  # float32 temporaries per chunk: 256 MB


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float):
        ctx.set_materialize_grads(False)  # an unused output (the detached entropy) costs no backward work
        rows, vocab = logits.shape
        work = torch.promote_types(logits.dtype, torch.float32)
        log_probs = torch.empty(rows, dtype=work, device=logits.device)
        entropy = torch.empty_like(log_probs)
        lse = torch.empty_like(log_probs)
        step = _rows_per_chunk(vocab)
        for s in range(0, rows, step):
            z = logits[s : s + step].to(work) / temperature
            lse[s : s + step] = torch.logsumexp(z, dim=-1)
            log_probs[s : s + step] = z.gather(-1, targets[s : s + step, None])[:, 0] - lse[s : s + step]
            p = torch.exp(z - lse[s : s + step, None])
            entropy[s : s + step] = lse[s : s + step] - (p * z).sum(-1)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature = temperature
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        logits, targets, lse, entropy = ctx.saved_tensors
        if grad_log_probs is None and grad_entropy is None:
            return None, None, None
        grad = torch.empty_like(logits)
        step = _rows_per_chunk(logits.shape[1])
        for s in range(0, logits.shape[0], step):
            z = logits[s : s + step].to(lse.dtype) / ctx.temperature
            log_p = z - lse[s : s + step, None]
            p = torch.exp(log_p)
            g = torch.zeros_like(z)
            if grad_log_probs is not None:  # d log p_t / dz = onehot(t) - p
                gl = grad_log_probs[s : s + step, None]
                g -= gl * p
                g.scatter_add_(-1, targets[s : s + step, None], gl)
            if grad_entropy is not None:  # dH / dz = -p * (log p + H)
                g -= grad_entropy[s : s + step, None] * p * (log_p + entropy[s : s + step, None])
            grad[s : s + step] = (g / ctx.temperature).to(grad.dtype)
        return grad, None, None


def token_log_probs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, entropy_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V], targets [R] -> (log_softmax(logits / temperature)[r, targets[r]] [R], entropy of that
    distribution [R]), both float32 (float64 for float64 logits). The entropy has gradient only with `entropy_grad`."""
    log_probs, entropy = _TokenLogProbs.apply(logits, targets, float(temperature))
    return log_probs, entropy if entropy_grad else entropy.detach()
