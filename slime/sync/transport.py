"""How weights travel from the trainer to engines: process-shared tensors, a broadcast group, or files.

Both sides import from here, so the trainer's encoding and the engine's decoding cannot drift apart.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import os
import pickle
import shutil
from multiprocessing.reduction import ForkingPickler

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from slime.sync.buckets import unflatten_bucket


@contextlib.contextmanager
def _shared_by_filename():
    # CPU tensors pickled by ForkingPickler normally pass a file descriptor, which only a child process that
    # inherits our connection can open. The "file_system" strategy names the shared-memory segment instead, so an
    # unrelated engine process can map it. CUDA tensors always travel as CUDA IPC handles.
    previous = torch_mp.get_sharing_strategy()
    torch_mp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        torch_mp.set_sharing_strategy(previous)


def serialize_shared(obj) -> str:
    """base64 of a ForkingPickler dump: tensors inside are moved to shared memory (CPU) or exported as CUDA IPC
    handles; only their handles are in the string. The caller must keep the tensors alive until the receiver
    has copied them."""
    buf = io.BytesIO()
    with _shared_by_filename():
        ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode()


def shared_cpu_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor in named shared memory: pickling it later copies nothing, and it can be refilled for the
    next sync (our engines copy out before answering)."""
    with _shared_by_filename():
        return torch.empty(nbytes, dtype=torch.uint8).share_memory_()


def deserialize_named_tensors(payload: str, load_format: str | None) -> list[tuple[str, torch.Tensor]]:
    """One rank's entry of `serialized_named_tensors`: a pickled list[(name, tensor)] or a flattened bucket."""
    obj = pickle.loads(base64.b64decode(payload))
    if load_format == "flattened_bucket":
        return unflatten_bucket(obj["flattened_tensor"], obj["metadata"])
    if not isinstance(obj, (list, tuple)):
        raise TypeError(f"expected a list of (name, tensor), got {type(obj).__name__} (load_format={load_format!r})")
    return list(obj)


def host_store(address: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """A rendezvous store listening on `address` at a port the OS picks as it binds (`.port` says which). Picking a
    free port first and binding it later leaves a window in which another process (an HTTP client's ephemeral
    port, a parallel run) can take it: the run then dies with EADDRINUSE."""
    timeout = datetime.timedelta(seconds=timeout_s)
    return dist.TCPStore(address, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)


def join_store(address: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """A client of the store another process hosts with `host_store`."""
    return dist.TCPStore(address, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


def new_weight_group(
    store: dist.Store, rank: int, world_size: int, group_name: str, backend: str, timeout_s: float
) -> dist.ProcessGroup:
    """A process group outside torch.distributed's default group: the trainer (rank 0, hosting `store`) plus every
    engine. Built from the store directly, so a trainer that already has its own training group can join."""
    timeout = datetime.timedelta(seconds=timeout_s)
    prefixed = dist.PrefixStore(group_name, store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    raise ValueError(f"weight update group backend must be gloo or nccl, not {backend!r}")


def broadcast(group: dist.ProcessGroup, tensors: list[torch.Tensor], timeout_s: float, what: str) -> None:
    """Broadcast each tensor from rank 0 of `group`, in order; TimeoutError naming `what` if a peer is missing."""
    for t in tensors:
        work = group.broadcast([t], dist.BroadcastOptions())
        try:
            work.wait(datetime.timedelta(seconds=timeout_s))
        except RuntimeError as exc:
            raise TimeoutError(f"broadcast of {what} did not complete within {timeout_s:.0f}s: {exc}") from exc


def write_shard(bucket: list[tuple[str, torch.Tensor]], folder: str, index: int) -> None:
    """Write one bucket as `model-<index>.safetensors`; shard 0 starts `folder` afresh."""
    from safetensors.torch import save_file

    if index == 0:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
    tensors = {n: t.detach().contiguous().cpu() for n, t in bucket}
    save_file(tensors, os.path.join(folder, f"model-{index:05d}.safetensors"))


def publish_folder(tmp: str, folder: str) -> str:
    """Rename the finished `tmp` onto `folder`, so readers see a whole checkpoint or none."""
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return folder
