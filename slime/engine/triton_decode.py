"""Decode attention over the paged KV cache on CUDA: one Triton program per (sequence, key-value head).

Each program loads the query heads that share its key-value head (grouped-query attention), walks the sequence's
cached tokens BLOCK_N at a time through its block table, and keeps an online softmax (running max and sum), so keys
and values are read once. Sequence lengths are read on the device, so a CUDA graph captured once serves every step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# launch shape, measured on an H100 (benchmarks/gpu/engine.py, section kernel_speed)
CONFIG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


@triton.jit
def _decode_kernel(
    Q,
    K,
    V,
    Out,
    block_tables,
    seq_lens,
    scale,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    length = tl.load(seq_lens + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + g
    g_ok = g < GROUP
    q = tl.load(Q + seq * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    s_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for start in range(0, length, BLOCK_N):
        pos = start + n
        ok = pos < length
        page = tl.load(block_tables + seq * stride_bt + pos // BLOCK_SIZE, mask=ok, other=0)
        slot = page.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        k = tl.load(K + slot[:, None] * stride_ks + kv_head * stride_kh + d[None, :], mask=ok[:, None], other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        s_sum = s_sum * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vs + kv_head * stride_vh + d[None, :], mask=ok[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / s_sum[:, None]
    tl.store(
        Out + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
        out.to(Out.dtype.element_ty),
        mask=g_ok[:, None],
    )


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    block_size: int,
) -> torch.Tensor:
    """q [B, H, D] (one new token per sequence); k_cache/v_cache [num_slots, Hkv, D]; block_tables [B, max_blocks]
    int32; seq_lens [B] int32 (cached tokens, the new one included). Returns [B, H, D] in q's dtype."""
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    _decode_kernel[(batch, kv_heads)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        BLOCK_SIZE=block_size,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        D=dim,
        IEEE=q.dtype == torch.float32,
        **CONFIG,
    )
    return out
