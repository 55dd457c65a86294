"""Moving a colocated trainer off the GPU and back (--offload-train) at the speed of the host link.

Every GPU tensor the trainer keeps between steps (parameter shards, optimizer moments) is copied into a pinned host
buffer of its own, allocated once and reused, and its GPU storage is then shrunk to zero bytes; onload regrows the
storage and copies back. The tensor objects never change, so FSDP2's views of its shards, the optimizer's state
dict and anything else holding a parameter stay valid, and the copies are asynchronous (one synchronisation each
way instead of one per tensor).
"""

from __future__ import annotations

import contextlib

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
    """offload(tensors) frees their GPU memory into pinned host copies; onload() puts them back, byte for byte.

    Two overlaps keep the moves off a colocated step's critical path. Tensors offloaded as `late` (optimizer state:
    read only by the optimizer step) come back on a side stream while the forward and backward passes run; `ready()`
    makes the current stream wait for them. And `begin_offload` starts copying tensors that nothing changes before
    the next `offload` (optimizer state after the last step) while the GPU does other work (the weight sync)."""

    def __init__(self, pin: bool = True) -> None:
        self.pin = pin  # pinned buffers make the copies asynchronous; without a GPU there is nothing to pin
        # the storage's identity -> its pinned buffer, kept across steps. Not id(tensor): a sharded parameter's local
        # tensor is a fresh Python object every time it is looked up, so every offload would pin new host memory
        # (seconds per GB) and keep the old buffers too
        self._host: dict[int, torch.Tensor] = {}
        self._moved: list[tuple[torch.Tensor, torch.Tensor, bool]] = []  # (tensor, host copy, late)
        self._early: dict[int, torch.Tensor] = {}  # storages whose copy begin_offload started -> their host copy
        self._side: torch.cuda.Stream | None = None
        self._pending: torch.cuda.Event | None = None  # the late onload copies are done

    def begin_offload(self, tensors: list[torch.Tensor]) -> None:
        """Start copying `tensors` to their host buffers behind the work queued so far, on a side stream; they must
        not change before the `offload` that frees them (a later `offload` without them copies nothing early)."""
        self.ready()
        with self._on_side(tensors):
            for t in tensors:
                self._early[t.untyped_storage()._cdata] = self._copy_out(t)

    def offload(self, tensors: list[torch.Tensor], late: list[torch.Tensor] = ()) -> int:
        """Free `tensors` and `late` into host copies; see the class docstring for `late`. Returns the bytes moved."""
        if self._moved:
            raise RuntimeError("offload called twice without an onload in between")
        early = self._early
        self.ready()
        for group, is_late in ((tensors, False), (late, True)):
            for t in group:
                host = early.get(t.untyped_storage()._cdata)
                self._moved.append((t, host if host is not None else self._copy_out(t), is_late))
        self._wait()  # the side stream's early copies too
        for t, _, _ in self._moved:
            t.untyped_storage().resize_(0)
        return sum(h.numel() for _, h, _ in self._moved)

    def onload(self) -> int:
        """Allocate every offloaded tensor again and copy it back: the others before returning, the late ones on
        a side stream (`ready()` before reading them). Returns the bytes moved."""
        for t, host, _ in self._moved:  # allocations first, on the current stream, which owns the memory
            t.untyped_storage().resize_(host.numel())
        later = [(t, h) for t, h, is_late in self._moved if is_late]
        for t, host, is_late in self._moved:
            if not is_late:
                t.untyped_storage().copy_(host.untyped_storage(), non_blocking=True)
        if later:
            with self._on_side([t for t, _ in later]):
                for t, host in later:
                    t.untyped_storage().copy_(host.untyped_storage(), non_blocking=True)
                if self._side is not None:
                    self._pending = torch.cuda.Event()
                    self._pending.record(self._side)
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the host copies stay untouched until the next offload
        moved, self._moved = sum(h.numel() for _, h, _ in self._moved), []
        return moved

    def ready(self) -> None:
        """Before the current stream reads or changes the late tensors: wait for their onload copies, and forget
        any early copy `begin_offload` made of them (it would be stale once they change)."""
        self._early = {}
        if self._pending is not None:
            torch.cuda.current_stream().wait_event(self._pending)
            self._pending = None

    def _copy_out(self, t: torch.Tensor) -> torch.Tensor:
        """Queue t's storage into its host buffer (allocated and pinned on first use) on the current stream."""
        storage = t.untyped_storage()
        host = self._host.get(storage._cdata)
        if host is None or host.numel() != storage.nbytes():
            host = self._host[storage._cdata] = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=self.pin)
        host.untyped_storage().copy_(storage, non_blocking=True)
        return host

    def _on_side(self, tensors: list[torch.Tensor]):
        """A context running on the side stream behind the current stream's queued work (CUDA tensors only)."""
        if not tensors or tensors[0].device.type != "cuda":
            return contextlib.nullcontext()
        if self._side is None:
            self._side = torch.cuda.Stream(tensors[0].device)
        self._side.wait_stream(torch.cuda.current_stream(tensors[0].device))
        return torch.cuda.stream(self._side)

    def _wait(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    @property
    def offloaded(self) -> bool:
        return bool(self._moved)
