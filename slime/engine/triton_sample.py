"""The decode step's sampler as one Triton kernel (CUDA): one program per row walks the vocabulary once.

Same draw as `slime.engine.sampling.sample_rows` (temperature, then the exponential race argmax(log p - log E),
E ~ Exp(1), i.e. a Gumbel-max draw; greedy rows take the argmax) and the same returned log-prob
(log_softmax(logits / temperature) at the token), but the noise comes from Philox inside the kernel and the
log-sum-exp is kept online, so the [rows x vocabulary] logits are read once in their own dtype instead of making
several float32 passes (a float32 copy, the noise tensor, log-softmax, two argmaxes: ~0.4 ms a step for 256 rows of
a 151k vocabulary on an H200). `seed` is a one-element device tensor the caller advances every step, so a CUDA graph
replays fresh noise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 2048


@triton.jit
def _uniform(seed, first, BLOCK: tl.constexpr):
    """BLOCK uniforms in [0, 1) from BLOCK / 4 Philox calls (each gives four): entry e of the block comes from call
    first + e // 4, output e % 4, so a row's noise does not depend on how its vocabulary is cut into blocks. u == 0
    gives a score of -inf, never drawn."""
    r0, r1, r2, r3 = tl.randint4x(seed, first + tl.arange(0, BLOCK // 4))
    bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [BLOCK])
    return tl.random.uint_to_uniform_float(bits)


@triton.jit
def _sample_kernel(
    logits_ptr,
    stride,
    temperature_ptr,
    greedy_ptr,
    seed_ptr,
    token_ptr,
    logprob_ptr,
    vocab,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    inv_t = 1.0 / tl.load(temperature_ptr + row).to(tl.float32)
    greedy = tl.load(greedy_ptr + row) != 0
    seed = tl.load(seed_ptr)
    m = tl.full((), float("-inf"), tl.float32)  # running max of x = logits / temperature
    s = tl.zeros((), tl.float32)  # running sum of exp(x - m)
    best = tl.full((), float("-inf"), tl.float32)  # best perturbed score so far, its index and its x
    best_i = tl.zeros((), tl.int32)
    best_x = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < vocab
        x = tl.load(logits_ptr + row * stride + offs, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
        new_m = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - new_m) + tl.sum(tl.where(inside, tl.exp(x - new_m), 0.0), 0)
        m = new_m
        u = _uniform(seed, row * tl.cdiv(vocab, 4) + start // 4, BLOCK)  # rows use disjoint Philox calls
        score = tl.where(greedy, x, x - tl.log(-tl.log(u)))
        score = tl.where(inside, score, float("-inf"))
        top = tl.max(score, 0)
        at = tl.argmax(score, 0)
        x_at = tl.sum(tl.where(tl.arange(0, BLOCK) == at, x, 0.0), 0)
        better = top > best  # strict: the first of equal scores wins, as torch.argmax
        best = tl.where(better, top, best)
        best_i = tl.where(better, start + at, best_i)
        best_x = tl.where(better, x_at, best_x)
    tl.store(token_ptr + row, best_i.to(tl.int64))
    tl.store(logprob_ptr + row, best_x - (m + tl.log(s)))


def sample_rows_fused(
    logits: torch.Tensor, temperature: torch.Tensor, greedy: torch.Tensor, seed: torch.Tensor, block: int = BLOCK_V
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [b, V] (any float dtype, last dim contiguous), temperature [b] float32 (1.0 for greedy rows), greedy
    [b] bool, seed [1] int64 on the device; `block`: vocabulary entries a program reads at a time (a power of two).
    Returns tokens [b] int64 and their log-probs [b] float32 under log_softmax(logits / temperature)."""
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _sample_kernel[(rows,)](
        logits, logits.stride(0), temperature, greedy, seed, tokens, logprobs, vocab, BLOCK=block, num_warps=8
    )
    return tokens, logprobs
