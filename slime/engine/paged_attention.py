"""Attention over the paged KV cache, registered with transformers as the attention implementation "slime_paged".

The model runs unchanged (its own projections, norms and rotary embeddings); only the attention call is ours. A
prefill is one packed row: input_ids [1, T] holds the new tokens of all sequences back to back, with their true
positions; a decode step is one row per sequence, input_ids [B, 1] (so the model's elementwise work runs on
contiguous tensors). The attention function writes the new keys and values into the cache slots named by
`slot_mapping`, then attends each query to its own sequence's cached tokens up to and including its position:
- decode on CUDA: a Triton kernel reads the cache through the block tables (`slime.engine.triton_decode`); the
  same block-table form elsewhere goes through the torch path below;
- everything else (prefill, chunked prefill over a cached prefix, decode on CPU): the sequences' keys and values are
  gathered into a padded batch and run through torch's scaled_dot_product_attention with a per-query length mask.
`PagedForward` carries the per-forward metadata; the model passes it through to here as the `paged` keyword.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface

ATTN_NAME = "slime_paged"
PROBE_NAME = "slime_probe"


class PagedUnsupported(ValueError):
    """The model has attention the paged engine does not implement; the padded backend serves it."""

    def __init__(self, reason: str):
        super().__init__(
            f"the paged engine cannot serve this model ({reason}): use --backend padded (slime-train: "
            "--rollout-engine-backend padded)"
        )
        self.reason = reason


@dataclass
class PagedForward:
    """Metadata of one forward over T new tokens of n sequences.

    k_cache, v_cache: per layer [num_slots, kv_heads, head_dim].
    slot_mapping: [T] int64 cache slot of each new token (None on the kernel path, which finds them itself).
    Torch path: q_index [n, max_q] int64 index of each sequence's queries into the T tokens (padding repeats a valid
    index), q_flat [T] int64 where each of the T tokens sits in the flattened [n * max_q] grid, kv_blocks
    [n, max_blocks] int64 each sequence's block table (padding: block 0), mask [n, 1, max_q, max_blocks * block_size]
    bool (key visible to query), gathered [2, n * max_blocks, block_size * kv_heads * head_dim] scratch for the
    gathered keys and values (None: allocated per layer). Whole blocks are gathered (contiguous copies, as fast as a
    padded cache on CPU); the masked-out tail of a block must hold finite values, which is why the engine zeroes
    blocks when it hands them out.
    Decode steps, one query per sequence (n == T): block_tables [n, max_blocks] int32, seq_lens [n] int32 (cached
    tokens including the new one), block_size; with `kernel` (set by the model runner where the Triton decode kernel
    serves the model: CUDA, a power-of-two head dim) the kernel writes the new keys and values and attends, else the
    step goes through the torch path.
    """

    k_cache: list[torch.Tensor]
    v_cache: list[torch.Tensor]
    slot_mapping: torch.Tensor | None
    q_index: torch.Tensor | None = None
    q_flat: torch.Tensor | None = None
    kv_blocks: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    gathered: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    block_size: int = 16
    kernel: bool = False


def gather_plan(
    q_start: torch.Tensor, q_len: torch.Tensor, max_q: int, max_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch path's query indices and mask for n sequences whose new tokens are packed back to back.

    q_start [n] position of each sequence's first new token; q_len [n] its new tokens; max_k: keys gathered per
    sequence (its block table's width in tokens). Returns q_index [n, max_q], q_flat [T] (see PagedForward) and the
    mask [n, 1, max_q, max_k]: key j is visible to a query at position p when j <= p. Computed where the inputs are
    (the host): reading the valid queries back by index, not by a boolean mask, needs no device sync per layer.
    """
    offsets = torch.cumsum(q_len, 0) - q_len  # where each sequence's tokens start in the packed row
    steps = torch.arange(max_q, device=q_len.device)
    q_valid = steps[None, :] < q_len[:, None]
    q_index = offsets[:, None] + torch.where(q_valid, steps[None, :], 0)
    q_pos = q_start[:, None] + torch.where(q_valid, steps[None, :], 0)  # [n, max_q] absolute positions
    mask = torch.arange(max_k, device=q_len.device)[None, None, :] <= q_pos[:, :, None]
    return q_index, q_valid.flatten().nonzero()[:, 0], mask[:, None]


@torch.compiler.disable  # ours, kernels included; compiled decoder layers fuse what comes before and after it
def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    paged: PagedForward | None = None,
    **_: object,
) -> tuple[torch.Tensor, None]:
    """query [B, H, S, D], key/value [B, Hkv, S, D] (after rotary embeddings), the T = B * S new tokens in order
    (prefill: B = 1, packed; decode: S = 1, one row per sequence). Returns ([B, S, H, D], None)."""
    if paged is None:  # a plain forward outside the paged cache (prompt scoring): causal SDPA over the given tokens
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling)
    b, heads, s, dim = query.shape
    layer = module.layer_idx
    kc, vc = paged.k_cache[layer], paged.v_cache[layer]
    key = key.transpose(1, 2).reshape(b * s, -1, dim).to(kc.dtype)  # [T, Hkv, D]
    value = value.transpose(1, 2).reshape(b * s, -1, dim).to(vc.dtype)
    q = query.transpose(1, 2).reshape(b * s, heads, dim)  # [T, H, D]
    if paged.kernel:  # it writes the new keys and values itself
        from slime.engine.triton_decode import paged_decode

        out = paged_decode(q, kc, vc, paged.block_tables, paged.seq_lens, scaling, paged.block_size, key, value)
        return out.view(b, s, heads, dim), None
    kc.index_copy_(0, paged.slot_mapping, key)
    vc.index_copy_(0, paged.slot_mapping, value)
    if paged.block_tables is not None:
        paged = _as_gather(paged)  # the same decode step off CUDA: through the torch path
    n, width = paged.kv_blocks.shape
    decode = paged.q_index.shape[1] == 1 and n == b * s  # one query per sequence, in order: no gather needed
    qp = q[:, :, None] if decode else q[paged.q_index].transpose(1, 2)  # [n, H, max_q, D]
    blocks, shape = paged.kv_blocks.flatten(), (n, width * paged.block_size, *kc.shape[1:])
    # on a 2-D view index_select copies whole blocks as rows: 3x faster on CPU than on the 4-D view; into scratch
    # that every layer reuses, since fresh pages are costly (2-4x on this project's CPU VMs)
    kout, vout = (None, None) if paged.gathered is None else paged.gathered
    row = paged.block_size * kc[0].numel()
    k = torch.index_select(kc.view(-1, row), 0, blocks, out=kout).view(shape).transpose(1, 2)
    v = torch.index_select(vc.view(-1, row), 0, blocks, out=vout).view(shape).transpose(1, 2)
    if qp.is_cuda:
        out = _masked_attention_cuda(qp, k, v, paged.mask, scaling)
    else:
        out = F.scaled_dot_product_attention(qp, k, v, attn_mask=paged.mask, scale=scaling, enable_gqa=True)
    out = out[:, :, 0] if decode else out.transpose(1, 2).flatten(0, 1)[paged.q_flat]  # [T, H, D]
    return out.view(b, s, heads, dim), None


def _masked_attention_cuda(q, k, v, mask, scale) -> torch.Tensor:
    """SDPA with a boolean mask on CUDA through the memory-efficient kernel. Left to choose, SDPA takes cuDNN on
    recent GPUs, which builds a plan for every new shape (tens of milliseconds, and nearly every prefill pass brings
    a new (sequences, queries, keys) shape); the memory-efficient kernel takes masks but not grouped key-value heads,
    so those are repeated (the math fallback would hold a [sequences, heads, queries, keys] float32 score tensor)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _as_gather(paged: PagedForward) -> PagedForward:
    """A decode step's kernel-path metadata (block tables, lengths) as the torch path's."""
    n, width = paged.block_tables.shape
    keys = torch.arange(width * paged.block_size, device=paged.seq_lens.device)
    return PagedForward(
        paged.k_cache,
        paged.v_cache,
        paged.slot_mapping,
        q_index=torch.arange(n, device=keys.device)[:, None],
        q_flat=torch.arange(n, device=keys.device),
        kv_blocks=paged.block_tables.long(),
        mask=(keys[None, :] < paged.seq_lens[:, None])[:, None, None],
        block_size=paged.block_size,
    )


# keywords a model passes to its attention function that change the result; the paged attention implements none
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux")


def probe_model(model: torch.nn.Module, num_layers: int, max_context: int) -> tuple[int, int]:
    """The (key-value heads, head dim) the paged cache needs, read from what the model's attention really receives in
    a two-token forward: configs spell these differently, or carry stale values the model code ignores. Raises
    PagedUnsupported saying why the paged engine cannot serve the model: a layer that does not call the attention
    interface, one whose code drops the keyword arguments (the `paged` metadata could not reach the attention),
    keys and values of different head dims, layers of different shapes, a sliding window, logit soft-capping or
    attention sinks."""
    marker, seen = object(), {}

    def record(module, query, key, value, attention_mask, paged=None, **kwargs):
        active = {k: kwargs[k] for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None}
        if "sliding_window" in active and active["sliding_window"] >= max_context:
            active.pop("sliding_window")  # a window no sequence can exceed is full attention
        seen[getattr(module, "layer_idx", None)] = (
            key.shape[1],
            key.shape[-1],
            value.shape[-1],
            paged is marker,
            active,
        )
        b, heads, s, _ = query.shape
        return query.new_zeros(b, s, heads, value.shape[-1]), None

    AttentionInterface.register(PROBE_NAME, record)
    saved = model.config._attn_implementation
    model.config._attn_implementation = PROBE_NAME
    try:
        with torch.inference_mode():
            dev = next(model.parameters()).device
            ids = torch.ones(1, 2, dtype=torch.long, device=dev)
            model(input_ids=ids, position_ids=torch.arange(2, device=dev)[None], use_cache=False, paged=marker)
    finally:
        model.config._attn_implementation = saved
    missing = [i for i in range(num_layers) if i not in seen]
    if missing:
        raise PagedUnsupported(f"layers {missing} do not call transformers' attention interface")
    if not all(passed for _, _, _, passed, _ in seen.values()):
        raise PagedUnsupported("its attention layers do not receive the forward's keyword arguments")
    shapes = {(heads, kd, vd) for heads, kd, vd, _, _ in seen.values()}
    if len(shapes) > 1:
        raise PagedUnsupported(f"layers differ in (kv heads, key dim, value dim): {sorted(shapes)}")
    ((heads, key_dim, value_dim),) = shapes
    if key_dim != value_dim:
        raise PagedUnsupported(f"keys have head dim {key_dim}, values {value_dim}")
    active = {k for *_, kw in seen.values() for k in kw}
    if active:
        raise PagedUnsupported(f"its attention uses {sorted(active)}")
    return heads, key_dim


def register() -> str:
    """Make "slime_paged" a transformers attention implementation; returns its name."""
    AttentionInterface.register(ATTN_NAME, paged_attention)
    return ATTN_NAME
