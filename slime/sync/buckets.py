"""Full (unsharded) parameters in size-bounded buckets, and the flat byte layout they travel in."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

ALIGN = 16  # bytes: every tensor starts at an offset its dtype can be viewed at


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly FSDP-sharded DTensor) parameter. A collective when sharded: every rank
    must call it for the same parameters in the same order."""
    if hasattr(param, "_local_tensor") and param.device_mesh.size() == 1:
        # one rank holds it all: no collective, and no DTensor dispatch either (`.data.to_local()` costs ~45 us
        # a parameter, 14 ms of a 310-tensor model's sync)
        return param._local_tensor.detach()
    data = param.data if isinstance(param, torch.nn.Parameter) else param
    if not hasattr(data, "full_tensor"):
        return data
    return data.full_tensor()


def travel_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype `tensor` travels in: `dtype` (the engine's) for floating-point tensors when given, else its own."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def iter_buckets(
    named: Iterable[tuple[str, torch.Tensor]], buffer_bytes: int, dtype: torch.dtype | None = None
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of `named`'s (name, full tensor) pairs of at most `buffer_bytes` each once cast to their
    `travel_dtype` (a larger tensor travels alone). The tensors are yielded as the trainer holds them:
    `flatten_bucket` and `cast_bucket` cast them, all of a bucket at once. A LoRA factor pair (`X.lora_A.weight`
    then `X.lora_B.weight`) stays in one bucket: the engine applies both at once."""
    bucket, size = [], 0
    for unit in _units(named):
        nbytes = sum(t.numel() * travel_dtype(t, dtype).itemsize for _, t in unit)
        if bucket and size + nbytes > buffer_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.extend(unit)
        size += nbytes
    if bucket:
        yield bucket


def _units(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """`named` as lists that must not be split: a lora_A with the lora_B after it, everything else alone."""
    held: tuple[str, torch.Tensor] | None = None
    for name, tensor in named:
        if held is not None:
            yield [held, (name, tensor)] if name.endswith(".lora_B.weight") else [held]
            held = None
            if name.endswith(".lora_B.weight"):
                continue
        if name.endswith(".lora_A.weight"):
            held = (name, tensor)
        else:
            yield [(name, tensor)]
    if held is not None:
        yield [held]


def cast_bucket(named: list[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> list[tuple[str, torch.Tensor]]:
    """The bucket's tensors in their travel dtype, contiguous."""
    return [(n, t.to(travel_dtype(t, dtype)).contiguous()) for n, t in named]


def bucket_layout(named: list[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> tuple[list[dict], int]:
    """Where each tensor goes in the flat byte buffer, in the field names of SGLang's flattened-bucket format (name,
    shape, dtype, start_idx, end_idx, numel), and the buffer's total size in bytes. Tensors are laid out in their
    travel dtype (see `travel_dtype`)."""
    metadata, offset = [], 0
    for name, t in named:
        travel = travel_dtype(t, dtype)
        start = -(-offset // ALIGN) * ALIGN
        end = start + t.numel() * travel.itemsize
        metadata.append(
            {
                "name": name,
                "shape": list(t.shape),
                "dtype": str(travel).removeprefix("torch."),
                "start_idx": start,
                "end_idx": end,
                "numel": t.numel(),
            }
        )
        offset = end
    return metadata, offset


def flatten_bucket(
    named: list[tuple[str, torch.Tensor]], out: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, list[dict]]:
    """Pack tensors (any dtypes, cast to their travel dtype on the way) into one uint8 tensor (`out` when given and
    large enough, else a new one on the tensors' device). Returns it and the bucket_layout metadata.
    One multi-tensor copy: a bucket of hundreds of small parameters costs a few kernel launches, not hundreds."""
    metadata, size = bucket_layout(named, dtype)
    if out is not None and out.numel() >= size:
        flat = out[:size]
    else:
        flat = torch.empty(size, dtype=torch.uint8, device=named[0][1].device if named else "cpu")
    views = unflatten_bucket(flat, metadata)
    if views:
        torch._foreach_copy_([v for _, v in views], [t for _, t in named])
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
