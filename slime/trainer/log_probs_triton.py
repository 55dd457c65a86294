"""The token log-prob / entropy pass of `slime.trainer.log_probs` as two Triton kernels (CUDA): one program per row
walks the vocabulary in blocks with an online softmax (running max, sum of exponentials and sum of z * exp), so the
forward reads each logit once and the backward reads it once and writes its gradient once, in the logits' own dtype.
The chunked torch version makes about twenty float32 passes over every [rows x vocabulary] element; on the
Qwen3-0.6B shape that was a third of a training step (benchmarks/gpu/trainer_profile.py).

Same float32 arithmetic as the torch version up to summation order (checked against float64 in
benchmarks/gpu/trainer.py, section log_probs_kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 2048


@triton.jit
def _forward_kernel(
    X, stride_x, T, LOGP, ENT, LSE, V, inv_temp, BLOCK: tl.constexpr, WANT_ENTROPY: tl.constexpr
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        z = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(tl.where(mask, z, float("-inf")), 0))
        scale = tl.exp(m - m_new)
        e = tl.where(mask, tl.exp(z - m_new), 0.0)
        s = s * scale + tl.sum(e, 0)
        if WANT_ENTROPY:
            w = w * scale + tl.sum(e * z, 0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(T + row)
    z_t = tl.load(x_row + target).to(tl.float32) * inv_temp
    tl.store(LOGP + row, z_t - lse)
    tl.store(LSE + row, lse)
    if WANT_ENTROPY:
        tl.store(ENT + row, lse - w / s)


@triton.jit
def _backward_kernel(
    X, stride_x, G, stride_g, T, LSE, ENT, GRAD_LOGP, GRAD_ENT, V, inv_temp,
    BLOCK: tl.constexpr, HAS_LOGP: tl.constexpr, HAS_ENT: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    g_row = G + row * stride_g
    lse = tl.load(LSE + row)
    target = tl.load(T + row)
    gl = tl.load(GRAD_LOGP + row) if HAS_LOGP else 0.0
    ge = tl.load(GRAD_ENT + row) if HAS_ENT else 0.0
    h = tl.load(ENT + row) if HAS_ENT else 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        z = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
        log_p = z - lse
        p = tl.exp(log_p)
        # d/dz of (gl * log p_target + ge * H) = gl * (onehot - p) - ge * p * (log p + H)
        g = p * (-ge * (log_p + h) - gl) + tl.where(cols == target, gl, 0.0)
        tl.store(g_row + cols, (g * inv_temp).to(G.dtype.element_ty), mask=mask)


def forward(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, want_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """logits [R, V] (last dim contiguous), targets [R] -> (log p of targets [R], entropy [R] or None, logsumexp
    [R]), float32."""
    rows, vocab = logits.shape
    log_probs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(log_probs)
    entropy = torch.empty_like(log_probs) if want_entropy else lse  # a dummy pointer when not written
    if rows:
        _forward_kernel[(rows,)](
            logits, logits.stride(0), targets, log_probs, entropy, lse, vocab, 1.0 / temperature,
            BLOCK=BLOCK_V, WANT_ENTROPY=want_entropy, num_warps=8,
        )  # fmt: skip
    return log_probs, entropy if want_entropy else None, lse


def backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_log_probs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """The gradient [R, V] (logits' dtype) of sum(grad_log_probs * log p) + sum(grad_entropy * entropy)."""
    rows, vocab = logits.shape
    grad = torch.empty_like(logits)
    has_ent = grad_entropy is not None
    if rows:
        _backward_kernel[(rows,)](
            logits, logits.stride(0), grad, grad.stride(0), targets, lse, entropy if has_ent else lse,
            grad_log_probs.contiguous() if grad_log_probs is not None else lse,
            grad_entropy.contiguous() if has_ent else lse, vocab, 1.0 / temperature,
            BLOCK=BLOCK_V, HAS_LOGP=grad_log_probs is not None, HAS_ENT=has_ent, num_warps=8,
        )  # fmt: skip
    return grad
