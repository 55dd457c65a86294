"""Moving a colocated trainer off the GPU and back (--offload-train) at the speed of the host link.

Every GPU tensor the trainer keeps between steps (parameter shards, optimizer moments) is copied into a pinned host
buffer of its own, allocated once and reused, and its GPU storage is then shrunk to zero bytes; onload regrows the
storage and copies back. The tensor objects never change, so FSDP2's views of its shards, the optimizer's state
dict and anything else holding a parameter stay valid, and the copies are asynchronous (one synchronisation each
way instead of one per tensor).
"""

from __future__ import annotations

import torch

from slime.trainer.models import local_shard


def resident_tensors(
    models: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer], device_type: str = "cuda"
) -> list[torch.Tensor]:
    """The tensors on `device_type` that hold the models' parameters and the optimizers' state, each storage once
    (a step counter kept on the host is left alone)."""
    out, seen = [], set()
    tensors = [p for m in models for p in m.parameters()]
    tensors += [v for opt in optimizers for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        local = local_shard(t.data)
        if local.device.type != device_type:
            continue
        key = local.untyped_storage().data_ptr()
        if local.untyped_storage().nbytes() == 0 or key in seen:
            continue  # already offloaded, or a tied weight's second name
        seen.add(key)
        out.append(local)
    return out


class HostOffload:
    """offload(tensors) frees their GPU memory into pinned host copies; onload() puts them back, byte for byte."""

    def __init__(self, pin: bool = True) -> None:
        self.pin = pin  # pinned buffers make the copies asynchronous; without a GPU there is nothing to pin
        # the storage's identity -> its pinned buffer, kept across steps. Not id(tensor): a sharded parameter's local
        # tensor is a fresh Python object every time it is looked up, so every offload would pin new host memory
        # (seconds per GB) and keep the old buffers too
        self._host: dict[int, torch.Tensor] = {}
        self._moved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def offload(self, tensors: list[torch.Tensor]) -> int:
        """Returns the bytes moved."""
        if self._moved:
            raise RuntimeError("offload called twice without an onload in between")
        for t in tensors:
            storage = t.untyped_storage()
            key = storage._cdata
            host = self._host.get(key)
            if host is None or host.numel() != storage.nbytes():
                host = self._host[key] = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=self.pin)
            host.untyped_storage().copy_(storage, non_blocking=True)
            self._moved.append((t, host))
        self._wait()
        for t, _ in self._moved:
            t.untyped_storage().resize_(0)
        return sum(h.numel() for _, h in self._moved)

    def onload(self) -> int:
        """Returns the bytes moved."""
        for t, host in self._moved:
            storage = t.untyped_storage()
            storage.resize_(host.numel())
            storage.copy_(host.untyped_storage(), non_blocking=True)
        self._wait()
        moved, self._moved = sum(h.numel() for _, h in self._moved), []
        return moved

    def _wait(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    @property
    def offloaded(self) -> bool:
        return bool(self._moved)
