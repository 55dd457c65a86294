"""Decode attention over the paged KV cache on CUDA: Triton programs per (sequence, key-value head, context split).

Each program loads the query heads that share its key-value head (grouped-query attention), walks its share of the
sequence's cached tokens BLOCK_N at a time through its block table, and keeps an online softmax (running max and
sum), so keys and values are read once. A large batch fills the GPU with one program per (sequence, head); a small
one (the tail of a rollout: a few long samples still decoding) would leave most of it idle, so the context is split
across up to MAX_SPLITS programs, each writing a partial result and its log-sum-exp, and a second kernel combines
them. Sequence lengths are read on the device, so a CUDA graph captured once serves every step.

The step's new keys and values can be written into the cache by the kernel itself (`k_new`, `v_new`): the program
whose share of the context holds the new position stores them before it reads, so a decode step's attention is one
launch per layer instead of three.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# launch shape, measured on an H100 (benchmarks/gpu/engine.py, section kernel_speed)
CONFIG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
MAX_SPLITS = 16


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
    Lse,
    stride_lt,
    stride_lh,
    K_new,
    V_new,
    stride_knt,
    stride_knh,
    stride_vnt,
    stride_vnh,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    SPLITS: tl.constexpr,
    WRITE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(seq_lens + seq)
    share = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N  # whole BLOCK_N steps per split
    lo = split * share
    hi = tl.minimum(length, lo + share)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    if WRITE:  # the new token's key and value, stored by the one program that reads that position
        last = length - 1
        if (last >= lo) & (last < hi):
            page = tl.load(block_tables + seq * stride_bt + last // BLOCK_SIZE).to(tl.int64)
            slot = page * BLOCK_SIZE + last % BLOCK_SIZE
            kn = tl.load(K_new + seq * stride_knt + kv_head * stride_knh + d)
            vn = tl.load(V_new + seq * stride_vnt + kv_head * stride_vnh + d)
            tl.store(K + slot * stride_ks + kv_head * stride_kh + d, kn.to(K.dtype.element_ty))
            tl.store(V + slot * stride_vs + kv_head * stride_vh + d, vn.to(V.dtype.element_ty))
        tl.debug_barrier()  # the stores are visible to the program's own threads before they read the block
    n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + g
    g_ok = g < GROUP
    q = tl.load(Q + seq * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    s_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + n
        ok = pos < hi
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
    if SPLITS == 1:
        out = acc / s_sum[:, None]
        tl.store(
            Out + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
            out.to(Out.dtype.element_ty),
            mask=g_ok[:, None],
        )
    else:  # a partial result over [lo, hi) and its log-sum-exp (-inf for a split past the sequence's end)
        seen = s_sum > 0
        out = tl.where(seen[:, None], acc / tl.where(seen, s_sum, 1.0)[:, None], 0.0)
        lse = tl.where(seen, m + tl.log(tl.where(seen, s_sum, 1.0)), float("-inf"))
        tl.store(Out + seq * stride_ot + heads[:, None] * stride_oh + split * D + d[None, :], out, mask=g_ok[:, None])
        tl.store(Lse + seq * stride_lt + heads * stride_lh + split, lse, mask=g_ok)


@triton.jit
def _combine_kernel(
    Part,
    Lse,
    Out,
    stride_pt,
    stride_ph,
    stride_lt,
    stride_lh,
    stride_ot,
    stride_oh,
    SPLITS: tl.constexpr,
    D: tl.constexpr,
):
    """Out[seq, head] = the splits' partial results weighted by their share of the softmax mass."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    lse = tl.load(Lse + seq * stride_lt + head * stride_lh + s)
    part = tl.load(Part + seq * stride_pt + head * stride_ph + s[:, None] * D + d[None, :])
    w = tl.exp(lse - tl.max(lse, 0))  # the first split always holds a token, so the max is finite
    out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + seq * stride_ot + head * stride_oh + d, out.to(Out.dtype.element_ty))


@functools.cache
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def splits_for(batch: int, kv_heads: int, device: int) -> int:
    """Context splits per (sequence, key-value head): the fewest powers of two that give about two programs per
    streaming multiprocessor, at most MAX_SPLITS."""
    splits = 1
    while splits < MAX_SPLITS and batch * kv_heads * splits < 2 * _sm_count(device):
        splits *= 2
    return splits


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    block_size: int,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, H, D] (one new token per sequence); k_cache/v_cache [num_slots, Hkv, D]; block_tables [B, max_blocks]
    int32; seq_lens [B] int32 (cached tokens, the new one included). k_new/v_new [B, Hkv, D] (last dim contiguous):
    the new token's key and value, written to the cache at position seq_lens - 1 first (None: already there).
    Returns [B, H, D] in q's dtype."""
    batch, heads, dim = q.shape
    write = k_new is not None
    if write:
        assert k_new.stride(-1) == 1 and v_new.stride(-1) == 1, "k_new / v_new: the head dim must be contiguous"
    else:
        k_new, v_new = k_cache, v_cache  # unread
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    splits = splits_for(batch, kv_heads, q.device.index or 0)
    if splits > 1:  # partial results in float32, [B, H, splits, D], and their log-sum-exp [B, H, splits]
        part = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
        target, strides = part, (part.stride(0), part.stride(1), lse.stride(0), lse.stride(1))
    else:
        lse, target, strides = out, out, (out.stride(0), out.stride(1), 0, 0)
    _decode_kernel[(batch, kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        target,
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
        strides[0],
        strides[1],
        lse,
        strides[2],
        strides[3],
        k_new,
        v_new,
        k_new.stride(0),
        k_new.stride(1),
        v_new.stride(0),
        v_new.stride(1),
        BLOCK_SIZE=block_size,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        D=dim,
        IEEE=q.dtype == torch.float32,
        SPLITS=splits,
        WRITE=write,
        **CONFIG,
    )
    if splits > 1:
        _combine_kernel[(batch, heads)](
            part,
            lse,
            out,
            part.stride(0),
            part.stride(1),
            lse.stride(0),
            lse.stride(1),
            out.stride(0),
            out.stride(1),
            SPLITS=splits,
            D=dim,
        )
    return out
