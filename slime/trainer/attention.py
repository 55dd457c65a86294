"""Attention over packed rows without a dense mask: the trainer packs a micro-batch's samples back to back into one
row, so attention must stay inside each sample. transformers would build a [T, T] block-diagonal mask for that
(memory and FLOPs quadratic in the row, not in the samples); this implementation attends sample by sample instead:
on GPU with the variable-length flash kernel (`torch.nn.attention.varlen`), elsewhere one causal SDPA call per
sample. The sample boundaries travel as forward kwargs (`packed_kwargs`), computed once per row on the host.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F

PACKED = "slime_packed"


@functools.cache
def _varlen() -> tuple[Any, set[str]]:
    """The kernel and its parameter names, or (None, {}); imported on first GPU use (the import costs a second)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, set()
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


_FLASH_FAILED: list[Exception] = []  # set once the kernel raised in this process: the SDPA path is used from then on
logger = logging.getLogger(__name__)


def packed_kwargs(lengths: list[int], device: torch.device) -> dict[str, Any]:
    """Forward kwargs that tell `packed_attention` where each of the row's samples starts (`lengths` in order)."""
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return {
        "packed_bounds": bounds,
        "packed_cu_seqlens": torch.tensor(bounds, dtype=torch.int32, device=device),
        "packed_max_len": max(lengths, default=0),
    }


def _flash_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor, longest: int, scale):
    """[T, H, D] queries, [T, Hkv, D] keys/values -> [T, H, D], causal within each cu-delimited sample."""
    kernel, params = _varlen()
    if "enable_gqa" in params:
        gqa = {"enable_gqa": key.shape[1] != query.shape[1]}
    else:  # older kernels want as many key/value heads as query heads
        repeat = query.shape[1] // key.shape[1]
        key, value, gqa = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1), {}
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    scaled = {"scale": scale} if "scale" in params else {}  # else the kernel's 1/sqrt(D): checked by caller
    return kernel(query, key, value, cu, cu, longest, longest, **scaled, **causal, **gqa)


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query [1, H, T, D], key/value [1, Hkv, T, D] -> [1, T, H, D]. Without
    `packed_kwargs` (one plain sequence, e.g. a caller outside the trainer) it is causal SDPA over the row."""
    bounds = kwargs.get("packed_bounds") or [0, query.shape[2]]
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("packed attention takes one packed row without an attention mask")
    flash = (
        query.is_cuda
        and query.dtype in (torch.bfloat16, torch.float16)
        and not (module.training and dropout > 0)
        and "packed_cu_seqlens" in kwargs
        and _varlen()[0] is not None
        and ("scale" in _varlen()[1] or scaling is None or abs(scaling * query.shape[-1] ** 0.5 - 1) < 1e-6)
    )
    if flash and not _FLASH_FAILED:
        try:
            out = _flash_varlen(
                query[0].transpose(0, 1).contiguous(),
                key[0].transpose(0, 1).contiguous(),
                value[0].transpose(0, 1).contiguous(),
                kwargs["packed_cu_seqlens"],
                kwargs["packed_max_len"],
                scaling,
            )
            return out[None], None
        except (RuntimeError, TypeError, ValueError) as exc:  # a kernel this GPU/torch lacks: same result, slower
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            _FLASH_FAILED.append(exc)
            logger.warning("packed attention: the varlen flash kernel failed (%s); using per-sample SDPA", exc)
    p = dropout if module.training else 0.0
    dtype = query.dtype
    if not query.is_cuda and dtype in (torch.bfloat16, torch.float16):
        # CPU kernels: half-precision flash attention's backward ran 2.7x slower than float32's (docs/benchmarks.md)
        query, key, value = query.float(), key.float(), value.float()
    sizes = [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]  # split, not slices: one concatenating
    parts = [  # backward instead of a zero-filled full-size gradient per sample
        F.scaled_dot_product_attention(
            q, k, v, dropout_p=p, is_causal=True, scale=scaling, enable_gqa=k.shape[1] != q.shape[1]
        )
        for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2), strict=True)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).to(dtype).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None  # samples are kept apart by packed_attention itself


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED, packed_attention)
    AttentionMaskInterface.register(PACKED, _no_mask)


def implementation_for(config: Any) -> str:
    """`PACKED` for models whose every layer is plain causal attention; "sdpa" (transformers' own masks) for models
    with sliding-window layers or logit soft-capping, which the packed kernels here do not implement."""
    for c in (config, getattr(config, "text_config", None)):
        if c is None:
            continue
        if getattr(c, "attn_logit_softcapping", None):
            return "sdpa"
        layer_types = getattr(c, "layer_types", None)
        if layer_types is not None:
            if any(t != "full_attention" for t in layer_types):
                return "sdpa"
        elif getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True):
            return "sdpa"
    return PACKED


register()
