"""Log-probabilities of the sampled tokens and the entropy of each row's distribution, from the LM head's logits,
without keeping [rows x vocabulary] float32 tensors: rows are processed in chunks, in float32, and the backward pass
recomputes each chunk's softmax from the (bf16 on GPU) logits instead of storing it. Exact: the same float32
arithmetic as log_softmax + gather + entropy, with hand-written gradients checked against float64 autograd. On CUDA
the same computation runs as two fused Triton kernels (`slime.trainer.log_probs_triton`)."""

from __future__ import annotations

import torch

# float32 elements per chunk of rows: on CPU a chunk that stays in cache (4 MB) ran the element-wise passes 3-4x
# faster than a 64 MB one (docs/benchmarks.md); on GPU larger chunks mean fewer kernel launches
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}
FUSED_ON_CUDA = True  # the Triton kernels of slime.trainer.log_probs_triton (benchmarks switch it off to compare)


def _fused(logits: torch.Tensor) -> bool:
    if not (FUSED_ON_CUDA and logits.is_cuda and logits.dim() == 2 and logits.stride(-1) == 1):
        return False
    if logits.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    try:
        import slime.trainer.log_probs_triton  # noqa: F401
    except ImportError:
        return False
    return True


def _rows_per_chunk(x: torch.Tensor) -> int:
    return max(1, CHUNK_ELEMENTS.get(x.device.type, 1 << 24) // x.shape[-1])


def _softmax_stats(z: torch.Tensor, want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """z [C, V] -> (logsumexp [C], entropy [C] or None, exp(z - max) [C, V]) with one exp pass."""
    top = z.amax(-1, keepdim=True)
    e = torch.exp(z - top)
    total = e.sum(-1)
    lse = top[:, 0] + total.log()
    entropy = lse - (e * z).sum(-1) / total if want_entropy else None
    return lse, entropy, e


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float, want_entropy: bool):
        ctx.set_materialize_grads(False)  # an unused output (the detached entropy) costs no backward work
        ctx.temperature, ctx.fused = temperature, _fused(logits)
        if ctx.fused:
            from slime.trainer.log_probs_triton import forward

            log_probs, entropy, lse = forward(logits, targets, temperature, want_entropy)
            ctx.save_for_backward(logits, targets, lse, entropy)
            return log_probs, entropy
        rows = logits.shape[0]
        work = torch.promote_types(logits.dtype, torch.float32)
        log_probs = torch.empty(rows, dtype=work, device=logits.device)
        entropy = torch.empty_like(log_probs) if want_entropy else None
        lse = torch.empty_like(log_probs)
        step = _rows_per_chunk(logits)
        for s in range(0, rows, step):
            z = logits[s : s + step].to(work)
            z = z / temperature if temperature != 1.0 else z
            lse[s : s + step], ent, _ = _softmax_stats(z, want_entropy)
            log_probs[s : s + step] = z.gather(-1, targets[s : s + step, None])[:, 0] - lse[s : s + step]
            if want_entropy:
                entropy[s : s + step] = ent
        ctx.save_for_backward(logits, targets, lse, entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        logits, targets, lse, entropy = ctx.saved_tensors
        if grad_log_probs is None and grad_entropy is None:
            return None, None, None, None
        if ctx.fused:
            from slime.trainer.log_probs_triton import backward

            grad = backward(logits, targets, lse, entropy, grad_log_probs, grad_entropy, ctx.temperature)
            return grad, None, None, None
        grad = torch.empty_like(logits)
        t = ctx.temperature
        step = _rows_per_chunk(logits)
        for s in range(0, logits.shape[0], step):
            z = logits[s : s + step].to(lse.dtype)
            z = z / t if t != 1.0 else z
            log_p = z - lse[s : s + step, None]
            p = torch.exp(log_p)
            if grad_entropy is not None:  # dH / dz = -p * (log p + H)
                weight = log_p.add_(entropy[s : s + step, None]).mul_(-grad_entropy[s : s + step, None])
            else:
                weight = torch.zeros_like(z)
            if grad_log_probs is not None:  # d log p_t / dz = onehot(t) - p
                gl = grad_log_probs[s : s + step, None]
                weight.sub_(gl)
                g = weight.mul_(p)
                g.scatter_add_(-1, targets[s : s + step, None], gl)
            else:
                g = weight.mul_(p)
            grad[s : s + step] = (g / t if t != 1.0 else g).to(grad.dtype)
        return grad, None, None, None


def token_log_probs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    entropy_grad: bool = False,
    want_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [R, V], targets [R] -> (log_softmax(logits / temperature)[r, targets[r]] [R], entropy of that
    distribution [R] or None without `want_entropy`), float32 (float64 for float64 logits). The entropy has
    gradient only with `entropy_grad`."""
    log_probs, entropy = _TokenLogProbs.apply(logits, targets, float(temperature), want_entropy or entropy_grad)
    if entropy is not None and not entropy_grad:
        entropy = entropy.detach()
    return log_probs, entropy
