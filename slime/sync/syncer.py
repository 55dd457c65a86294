"""Trainer side of weight sync: pause engines, push every parameter by the chosen mode, set the version, resume.

Pausing (`--weight-sync-pause-mode`) either aborts the running requests and flushes the prefix cache (abort), or
only stops the engines between decode steps (in_place): running requests keep their KV cache and go on with the new
weights, and the engine forgets cached prefixes as it loads them, so no new request reuses the old ones.

Every rank of the training group calls `WeightSyncer.sync` (gathering a sharded parameter is a collective); only
rank 0 talks to engines. Modes (`--update-weight-mode`):
- tensor: buckets in process-shared memory (CPU) or CUDA IPC handles (GPU) via /update_weights_from_tensor;
- distributed: a gloo (CPU) / NCCL (GPU) group of the trainer and the engines, via /update_weights_from_distributed;
- disk: safetensors written atomically, then /update_weights_from_disk.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from slime.sync.buckets import (
    bucket_layout,
    cast_bucket,
    dtype_from_name,
    flatten_bucket,
    iter_buckets,
    travel_dtype,
    unflatten_bucket,
)
from slime.sync.transport import (
    broadcast,
    host_store,
    new_weight_group,
    publish_folder,
    serialize_shared,
    shared_cpu_buffer,
    write_shard,
)
from slime.trainer.lora import served_parameters
from slime.utils.http_utils import request_sync

logger = logging.getLogger(__name__)
MODES = ("tensor", "distributed", "disk")
GROUP_NAME = "slime_weight_sync"


class WeightSyncError(RuntimeError):
    pass


def _reachable_address() -> str:
    """This node's address as other nodes see it (Ray knows it); loopback outside Ray."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def _sglang_version(info: dict) -> tuple[int, ...]:
    """SGLang's version from its /server_info ("0.5.23", "0.5.23.post1"); () for other engines (ours says
    "slime-embedded")."""
    parts = []
    for piece in str(info.get("version", "")).split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


class WeightSyncer:
    def __init__(
        self,
        engine_urls: list[str],
        mode: str,
        buffer_bytes: int,
        timeout_s: float,
        disk_dir: str,
        dtype: str | None = None,
        pause_mode: str = "abort",
        adapters_only: bool = False,
    ):
        """`dtype`: the engines' weight dtype; floating-point weights travel in it (None: as the trainer holds them).
        `pause_mode`: abort or in_place (module docstring). `adapters_only`: a LoRA policy sends its adapters, which
        the engine merges itself (--lora-sync adapters), instead of the merged weights."""
        self.adapters_only = adapters_only
        if pause_mode not in ("abort", "in_place"):
            raise ValueError(f"--weight-sync-pause-mode must be abort or in_place, not {pause_mode!r}")
        self.pause_mode = pause_mode
        if mode not in MODES:
            raise ValueError(f"--update-weight-mode must be one of {MODES}, not {mode!r}")
        self.engine_urls, self.mode, self.buffer_bytes = list(engine_urls), mode, buffer_bytes
        self.timeout_s, self.disk_dir = timeout_s, disk_dir
        self.dtype = dtype_from_name(dtype) if dtype else None
        self._disk_tmp = os.path.join(disk_dir, f"incoming-{os.getpid()}")
        self.group = None
        self.backend = "gloo"
        self.shared: list[torch.Tensor] = []  # CPU tensor mode: one reusable shared-memory buffer per bucket
        # GPU tensor mode, with engines that finish copying before they answer: one device buffer refilled for
        # every bucket of every sync (an engine keeps its IPC mapping open instead of mapping a fresh one per
        # bucket), and per bucket the views it is filled through (a bucket holds the same weights every sync)
        self.device_buffer: torch.Tensor | None = None
        self._layouts: dict[int, tuple[tuple, torch.Tensor, list[dict], list[torch.Tensor]]] = {}
        self._facts: dict[str, bool] | None = None  # see _engine_facts
        self.pool = ThreadPoolExecutor(max(1, len(self.engine_urls)), thread_name_prefix="weight-sync")

    # ------------------------------------------------------------------ engine calls (rank 0 only)
    def _call(self, url: str, endpoint: str, payload: dict | None, method: str = "POST") -> dict:
        try:
            status, body = request_sync(method, f"{url}{endpoint}", payload, timeout=self.timeout_s)
        except ConnectionError as exc:
            raise WeightSyncError(f"weight sync: {endpoint} on {url} got no answer in {self.timeout_s:.0f}s") from exc
        if status != 200:
            raise WeightSyncError(f"weight sync: {endpoint} on {url} answered {status}: {body[:500]}")
        try:
            return json.loads(body) if body else {}
        except json.JSONDecodeError:
            return {}

    def _all(self, endpoint: str, payload: dict | Callable[[], dict] | None, method: str = "POST") -> list:
        """Call `endpoint` on every engine at once. `payload`: one dict for all, or a function making each its own."""
        futures = [
            self.pool.submit(self._call, url, endpoint, payload() if callable(payload) else payload, method)
            for url in self.engine_urls
        ]
        return [f.result() for f in futures]

    # ------------------------------------------------------------------ the sync
    def sync(self, model: torch.nn.Module, version: str, rank: int) -> dict:
        """Push `model`'s parameters to every engine as weight version `version`. Returns timing and size:
        sync/seconds in all, of which sync/gather_seconds gathering and casting the full tensors, sync/send_seconds
        handing buckets to the engines (they answer once they hold a copy), the rest pausing and resuming them."""
        start, nbytes, count, gather, send = time.monotonic(), 0, 0, 0.0, 0.0
        if rank == 0:
            self._all("/pause_generation", {"mode": self.pause_mode})
            if self.pause_mode == "abort":  # in place, requests still hold cache blocks: the load forgets prefixes
                self._all("/flush_cache", None)
            if self.mode == "distributed" and self.group is None:
                self._connect()
            if self.mode != "disk" and self._engine_facts()["sessions"]:
                self._all("/begin_weight_update", {})
        try:
            buckets = iter_buckets(served_parameters(model, self.adapters_only), self.buffer_bytes, self.dtype)
            for index in itertools.count():
                t0 = time.monotonic()
                bucket = next(buckets, None)  # all ranks: a collective per sharded parameter
                t1 = time.monotonic()
                gather += t1 - t0
                if bucket is None:
                    break
                count += len(bucket)
                nbytes += sum(t.numel() * travel_dtype(t, self.dtype).itemsize for _, t in bucket)
                if rank == 0:
                    self._send(index, bucket)
                    send += time.monotonic() - t1
            if rank == 0:
                if self.mode == "disk":
                    t1 = time.monotonic()
                    folder = publish_folder(self._disk_tmp, os.path.join(self.disk_dir, "latest"))
                    body = {"model_path": folder, "weight_version": version, "partial": self.adapters_only}
                    self._all("/update_weights_from_disk", body)
                    send += time.monotonic() - t1
                if self.mode != "disk" and self._engine_facts()["sessions"]:
                    self._all("/end_weight_update", {})
                # the version changes once every bucket is in: a sync that fails half-way leaves the old one
                self._all("/update_weight_version", {"new_version": version, "abort_all_requests": False})
        finally:
            if rank == 0:
                self._all("/continue_generation", {})
        return {
            "sync/seconds": time.monotonic() - start,
            "sync/gather_seconds": gather,
            "sync/send_seconds": send,
            "sync/bytes": nbytes,
            "sync/tensors": count,
        }

    def _send(self, index: int, bucket: list[tuple[str, torch.Tensor]]) -> None:
        if self.mode == "disk":  # shards stream into a temporary folder, published whole after the last one
            write_shard(cast_bucket(bucket, self.dtype), self._disk_tmp, index)
            return
        if self.mode == "tensor":
            if bucket[0][1].is_cuda and self._engine_facts()["copy_before_answer"]:
                flat, metadata = self._fill_device_buffer(index, bucket)
            else:
                flat, metadata = flatten_bucket(bucket, self._shared_buffer(index, bucket), self.dtype)
            # one pickle per engine: pickling takes a reference on the shared segment and each unpickling releases
            # one, so a single pickle read by two engines would drop the segment's count to zero and unlink it
            self._all(
                "/update_weights_from_tensor",
                lambda: {
                    "serialized_named_tensors": [serialize_shared({"flattened_tensor": flat, "metadata": metadata})],
                    "load_format": "flattened_bucket",
                    "flush_cache": False,
                },
            )
            del flat  # engines answered, so they copied out of it: the buffer may be refilled or freed
            return
        bucket = cast_bucket(bucket, self.dtype)
        payload = {
            "names": [n for n, _ in bucket],
            "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket],
            "group_name": GROUP_NAME,
            "flush_cache": False,
            "timeout": self.timeout_s,
        }
        pending = [
            self.pool.submit(self._call, url, "/update_weights_from_distributed", payload) for url in self.engine_urls
        ]
        device = "cuda" if self.backend == "nccl" else "cpu"
        tensors = [t.to(device).contiguous() for _, t in bucket]
        broadcast(self.group, tensors, self.timeout_s, f"{len(bucket)} weights to engines")
        for f in pending:
            f.result()

    def _shared_buffer(self, index: int, bucket: list[tuple[str, torch.Tensor]]) -> torch.Tensor | None:
        """The reusable shared-memory buffer of bucket `index` on CPU; None on GPU, where a fresh buffer per bucket
        is the safe choice for engines that may answer before their device copy has finished."""
        if bucket[0][1].is_cuda:
            return None
        need = bucket_layout(bucket, self.dtype)[1]
        while len(self.shared) <= index:
            self.shared.append(torch.empty(0, dtype=torch.uint8))
        if self.shared[index].numel() < need:
            self.shared[index] = shared_cpu_buffer(need)
        return self.shared[index]

    def _engine_facts(self) -> dict[str, bool]:
        """What the engines' /server_info says, asked once: whether every engine copies tensor updates before it
        answers (our engine: then the trainer may reuse its device buffer), and whether they need weight-update
        sessions (SGLang 0.5.23 and later refuse tensor and distributed updates outside begin/end_weight_update)."""
        if self._facts is None:
            infos = self._all("/server_info", None, method="GET")
            self._facts = {
                "copy_before_answer": all(info.get("weights_copied_before_answer") is True for info in infos),
                "sessions": any(_sglang_version(info) >= (0, 5, 23) for info in infos),
            }
        return self._facts

    def _fill_device_buffer(self, index: int, bucket: list[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, list]:
        """Bucket `index` packed into the reused device buffer (grown when a bucket needs more). The views are
        built on the first sync and reused, so a later sync costs one multi-tensor copy per bucket."""
        key = tuple((n, tuple(t.shape), t.dtype) for n, t in bucket)
        cached = self._layouts.get(index)
        if cached is None or cached[0] != key:
            metadata, size = bucket_layout(bucket, self.dtype)
            device, buf = bucket[0][1].device, self.device_buffer
            if buf is None or buf.numel() < size or buf.device != device:
                self._layouts.clear()  # their views are into the old buffer
                buf = self.device_buffer = None  # the old buffer is freed before its successor is allocated
                buf = self.device_buffer = torch.empty(size, dtype=torch.uint8, device=device)
            flat = buf[:size]
            views = [v for _, v in unflatten_bucket(flat, metadata)]
            cached = self._layouts[index] = (key, flat, metadata, views)
        _, flat, metadata, views = cached
        torch._foreach_copy_(views, [t for _, t in bucket])
        if flat.is_cuda:  # an engine that already maps the buffer reads it without waiting on our stream
            torch.cuda.current_stream(flat.device).synchronize()
        return flat, metadata

    def release_buffers(self) -> None:
        """Free the reused device buffer (a colocated trainer offloading); the next sync allocates it again. An
        engine still mapping it keeps it until the engine releases its own memory."""
        self.device_buffer = None
        self._layouts.clear()
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()  # memory our engines no longer map goes back to the cache

    def _group_backend(self) -> str:
        """NCCL when the trainer and every engine hold weights on GPU; gloo when any side is on CPU (our embedded
        engine reports its device in /server_info; an engine that does not say is taken to follow the trainer)."""
        if not torch.cuda.is_available():
            return "gloo"
        devices = {info.get("device", "cuda") for info in self._all("/server_info", None, method="GET")}
        return "nccl" if devices == {"cuda"} else "gloo"

    def _connect(self) -> None:
        """Form the broadcast group: the trainer is rank 0 and hosts the store; engine i joins as rank i + 1."""
        host = _reachable_address()
        world = len(self.engine_urls) + 1
        store = host_store(host, world, self.timeout_s)
        self.backend = backend = self._group_backend()
        joins = [
            self.pool.submit(
                self._call,
                url,
                "/init_weights_update_group",
                {
                    "master_address": host,
                    "master_port": store.port,
                    "rank_offset": i + 1,
                    "world_size": world,
                    "group_name": GROUP_NAME,
                    "backend": backend,
                    "timeout": self.timeout_s,
                },
            )
            for i, url in enumerate(self.engine_urls)
        ]
        try:
            self.group = new_weight_group(store, 0, world, GROUP_NAME, backend, self.timeout_s)
        except RuntimeError as exc:
            raise WeightSyncError(f"weight sync: engines did not join the {backend} group in time: {exc}") from exc
        for f in joins:
            f.result()

    def close(self) -> None:
        if self.group is not None and self.engine_urls:
            for url in self.engine_urls:
                try:
                    self._call(url, "/destroy_weights_update_group", {"group_name": GROUP_NAME})
                except WeightSyncError:
                    pass
        self.pool.shutdown(wait=False)
        self.release_buffers()
        self.shared.clear()  # torch removes a buffer's /dev/shm file when its last mapping closes
