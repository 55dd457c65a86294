"""Full (unsharded) parameters in size-bounded buckets, and the flat byte layout they travel in."""

from __future__ import annotations

from collections.abc import Iterator

import torch

ALIGN = 16  # bytes: every tensor starts at an offset its dtype can be viewed at


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly FSDP-sharded DTensor) parameter. A collective when sharded: every rank
    must call it for the same parameters in the same order."""
    data = param.data if isinstance(param, torch.nn.Parameter) else param
    return data.full_tensor() if hasattr(data, "full_tensor") else data


def iter_buckets(
    model: torch.nn.Module, buffer_bytes: int, dtype: torch.dtype | None = None
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (name, full tensor) of at most `buffer_bytes` each (a larger tensor travels alone).
    `dtype`: floating-point tensors are cast to it first (the engine's dtype: fewer bytes to move)."""
    bucket, size = [], 0
    for name, param in model.named_parameters():
        tensor = full_tensor(param).detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > buffer_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def bucket_layout(named: list[tuple[str, torch.Tensor]]) -> tuple[list[dict], int]:
    """Where each tensor goes in the flat byte buffer, in the field names of SGLang's flattened-bucket format (name,
    shape, dtype, start_idx, end_idx, numel), and the buffer's total size in bytes."""
    metadata, offset = [], 0
    for name, t in named:
        start = -(-offset // ALIGN) * ALIGN
        end = start + t.numel() * t.element_size()
        metadata.append(
            {
                "name": name,
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
                "start_idx": start,
                "end_idx": end,
                "numel": t.numel(),
            }
        )
        offset = end
    return metadata, offset


def flatten_bucket(
    named: list[tuple[str, torch.Tensor]], out: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[dict]]:
    """Pack tensors (any dtypes) into one uint8 tensor (`out` when given and large enough, else a new one).
    Returns it and the bucket_layout metadata."""
    metadata, size = bucket_layout(named)
    if out is not None and out.numel() >= size:
        flat = out[:size]
    else:
        flat = torch.empty(size, dtype=torch.uint8, device=named[0][1].device if named else "cpu")
    for meta, (_, t) in zip(metadata, named, strict=True):
        flat[meta["start_idx"] : meta["end_idx"]].copy_(t.contiguous().reshape(-1).view(torch.uint8))
    return flat, metadata


def unflatten_bucket(flat: torch.Tensor, metadata: list) -> list[tuple[str, torch.Tensor]]:
    """Inverse of flatten_bucket: views into `flat` (no copy). Metadata entries are dicts or objects."""
    out = []
    for meta in metadata:
        m = meta if isinstance(meta, dict) else vars(meta)
        chunk = flat[m["start_idx"] : m["end_idx"]]
        out.append((m["name"], chunk.view(dtype_from_name(m["dtype"])).reshape(m["shape"])))
    return out


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """torch dtype from "bfloat16" or "torch.bfloat16"; ValueError naming it when unknown."""
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype
