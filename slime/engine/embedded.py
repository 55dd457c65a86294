"""The embedded engine: iteration-level (continuous) batching over a Hugging Face causal LM.

One background thread owns the model: it loads it, runs every step, and runs weight updates and memory release between
steps (callers on other threads hand them over and wait). Each iteration it admits waiting requests, runs one decode
step for every running request, samples, and retires finished or aborted rows. Requests join and leave between steps,
so concurrent requests share forward passes instead of queueing behind each other.

Why one thread does all torch work: OpenMP gives each thread that runs a parallel op its own team of workers, and once
a process has more such threads than cores, libgomp stops spin-waiting between parallel regions. Every small op then
pays for putting its workers to sleep and waking them (measured on 2 cores: ~1,000 context switches per decode step and
a fifth of the throughput gone, from a single cache allocation on the constructing thread).

This module holds what every backend shares: the request lifecycle (submit, abort, pause, memory release, weight
updates, stop conditions, completion callbacks). A backend supplies the KV cache and the forward passes:
`slime.engine.paged` (the default: a paged KV cache, prefix sharing, CUDA graphs on GPU) and `slime.engine.padded`
(a padded transformers DynamicCache; the fallback for models the paged attention cannot serve).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slime.engine import device_memory
from slime.engine.fused_linear import fuse_projections
from slime.engine.sampling import SamplingParams, sample_next

logger = logging.getLogger(__name__)


@dataclass(eq=False)  # requests compare by identity: rows are looked up in lists every step
class Request:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    on_done: Callable[[Request], None]  # called once, from the engine thread
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: dict | None = None
    weight_version: str = ""
    version_spans: list[dict] = field(default_factory=list)  # [{version, start, end}] when weights changed mid-way
    abort_message: str | None = None
    generator: torch.Generator | None = None
    blocks: list[int] = field(default_factory=list)  # paged backend: KV cache blocks, in sequence order
    num_cached: int = 0  # paged backend: tokens of input_ids + output_ids whose keys and values are in the cache
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission (meta_info.cached_tokens)
    created: float = field(default_factory=time.monotonic)
    finished: float = 0.0
    strikes: int = 0  # failed steps this request was in (see EmbeddedEngine._quarantine)
    probe_from: int | None = None  # under suspicion: runs alone until its output grows past this length


class EmbeddedEngine:
    """Base of the backends; subclasses implement the hooks at the end of the class."""

    backend = ""  # the backend's --backend name
    backend_note: str | None = None  # why --backend auto did not pick the paged backend
    decode_step_compiled = False  # whether the decode step runs torch.compile'd kernels (paged, CUDA)

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        max_running_requests: int = 64,
        max_prefill_tokens: int = 4096,
        chunked_prefill_size: int = 0,
        seed: int = 0,
        num_threads: int | None = None,
        device: str = "cpu",
    ):
        if num_threads:
            torch.set_num_threads(num_threads)  # read by every thread's first parallel op, the engine thread's too
        self.model_path = model_path
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_running_requests = max_running_requests
        self.max_prefill_tokens = max_prefill_tokens  # a prefill pass's tokens, summed over its requests
        self.chunked_prefill_size = chunked_prefill_size or max_prefill_tokens  # one request's share of a pass
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.weight_version = "default"

        self._waiting: deque[Request] = deque()
        self._rows: list[Request] = []  # running requests, one per batch row
        self._paused = False
        self._released: list[tuple[torch.nn.Parameter, torch.Size]] = []  # weights freed for a colocated trainer
        self._weight_region: device_memory.DeviceRegion | None = None  # the weights' fixed-address GPU memory
        self._stopped = False
        self._cv = threading.Condition()
        self._calls: deque[tuple[Future, Callable, tuple]] = deque()  # work handed to the engine thread
        self._rid_counter = itertools.count()
        self._done: list[Request] = []  # finished this iteration, callbacks not yet run
        self._stepping: list[Request] = []  # admitted this iteration but not yet among the rows (padded backend)
        # LoRA updates (X.lora_A/B.weight): each adapted weight as it was before the first one (where it lives, in its
        # dtype: exact, and no host round trip per update), so every update serves base + B @ A exactly instead of
        # piling deltas onto deltas
        self._lora_base: dict[str, torch.Tensor] = {}
        self._named_weights: dict[str, torch.Tensor] | None = None  # see _weights_by_name
        self._aliases: dict[str, tuple[str, int, int]] = {}  # fused projections' original names, see fused_linear
        self.stats = {
            "generated_tokens": 0,
            "aborted_requests": 0,
            "finished_requests": 0,
            "weight_updates": 0,
            "weight_update_seconds": 0.0,  # checking and copying updates in, on the engine thread
            "max_batch_rows": 0,  # the most requests ever decoded in one step
            "failed_steps": 0,  # steps that raised; their requests were retried alone (see _quarantine)
        }
        ready: Future = Future()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="embedded-engine", daemon=True)
        self._thread.start()
        ready.result()  # the model loaded, or the reason it did not

    def _load(self) -> None:
        """Load the model and build the backend's state (engine thread, before the first step)."""
        dtype = getattr(torch, self.dtype)
        # transformers' default: SDPA where the model supports it, eager otherwise (e.g. logit soft-capping)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        self.model.to(self.device).eval().requires_grad_(False)
        self._aliases = fuse_projections(self.model)
        # on a GPU the weights live at addresses that survive release_memory, so captured graphs outlive a release
        self._weight_region = device_memory.fixed_or_none(
            lambda: device_memory.pack_parameters(self.model, self.device), self.device, "the weights"
        )
        self.config = self.model.config
        self.max_context = int(getattr(self.config, "max_position_embeddings", 1 << 30))
        self.vocab_size = int(self.model.get_input_embeddings().num_embeddings)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        # unseeded rows sample where the logits are; a request's own seed (a CPU generator) brings its batch to CPU
        self.device_generator = torch.Generator(self.device).manual_seed(self.seed)
        self._setup()

    # ------------------------------------------------------------------ public API (any thread)
    def submit(
        self, input_ids: list[int], params: SamplingParams, on_done: Callable, rid: str | None = None
    ) -> Request:
        return self.submit_many([(input_ids, params, on_done, rid)])[0]

    def submit_many(self, items: list[tuple[list[int], SamplingParams, Callable, str | None]]) -> list[Request]:
        """Queue (input_ids, params, on_done, rid) requests together, so one prefill pass can admit them all (queued
        one by one, the engine thread wakes at the first and prefills it alone). All are checked before any is
        queued: a ValueError names the first this engine cannot serve."""
        for input_ids, params, _, _ in items:
            self.check_request(input_ids, params)
        reqs = []
        for input_ids, params, on_done, rid in items:
            req = Request(rid or f"req-{next(self._rid_counter)}", list(input_ids), params, on_done)
            req.weight_version = self.weight_version
            if params.sampling_seed is not None:
                req.generator = torch.Generator().manual_seed(int(params.sampling_seed))
            reqs.append(req)
        with self._cv:
            if self._stopped:
                raise RuntimeError("engine is shut down")
            self._waiting.extend(reqs)
            self._cv.notify_all()
        return reqs

    def check_request(self, input_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming what this engine cannot serve (an empty or over-long prompt, a token id outside
        the vocabulary): checked at the door, because inside a batched step it would fail every request running."""
        if len(input_ids) == 0:
            raise ValueError("input_ids is empty")
        if len(input_ids) >= self.max_context:
            raise ValueError(f"prompt has {len(input_ids)} tokens; the model's context is {self.max_context}")
        for what, ids in (("input_ids", input_ids), ("sampling_params.stop_token_ids", params.stop_token_ids)):
            for i, t in enumerate(ids):
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                    raise ValueError(f"{what}[{i}]={t!r} is not a token id of this model (0 .. {self.vocab_size - 1})")

    def abort(self, rid: str | None = None, abort_all: bool = False, message: str = "Abort requested") -> int:
        """Abort matching requests; each finishes with type `abort` and keeps its partial output."""
        with self._cv:
            hits = [r for r in itertools.chain(self._waiting, self._rows) if abort_all or r.rid == rid]
            for r in hits:
                r.abort_message = r.abort_message or message
            self._cv.notify_all()
        return len(hits)

    def pause(self, mode: str = "abort") -> None:
        """abort: abort everything, hold new requests; retract / in_place: stop stepping, keep state."""
        if mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"pause mode must be abort, retract or in_place, not {mode!r}")
        with self._cv:
            self._paused = True
        if mode == "abort":
            self.abort(abort_all=True, message="Aborted by pause_generation")
            self.wait_idle(timeout=60, include_waiting=False)

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    def alive(self) -> bool:
        """Whether the engine thread still runs (it stops on shutdown or an error outside a request)."""
        return self._thread.is_alive()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def weights_released(self) -> bool:
        return bool(self._released) or (self._weight_region is not None and not self._weight_region.mapped)

    def _movable(self) -> bool:
        """Whether released GPU memory comes back at the same addresses (slime.engine.device_memory), so captured
        graphs stay valid across a release."""
        return self._weight_region is not None

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def release_memory(self, tags: list[str] | None = None) -> dict[str, int]:
        """Free the memory named by `tags` ("weights", "kv_cache", "cuda_graph"; None or [] means all) so a trainer
        on the same device can use it. The engine must be idle (pause or abort first); requests that arrive while
        the weights are released wait for `resume_memory`. On a GPU whose driver has virtual memory management the
        weights and the KV cache come back at the same addresses, so captured CUDA graphs are kept (their own
        memory stays: ~3 GB for a 150k vocabulary with every bucket captured); otherwise releasing either drops the
        graphs too, captured again when next needed. Returns the GPU memory held before and after."""
        return self._on_engine_thread(self._release_memory, _memory_tags(tags))

    def _release_memory(self, tags: set[str]) -> dict[str, int]:
        before = self._gpu_bytes()
        if self._rows:
            raise RuntimeError(
                f"release_memory_occupation needs an idle engine; {len(self._rows)} requests are "
                "running (pause_generation or abort_request first)"
            )
        if not self._movable():  # graphs point at the weights and the cache, which come back elsewhere
            self._free_graphs()
        if "weights" in tags and not self.weights_released:
            if self._weight_region is not None:
                self._weight_region.release()
            else:
                for p in self.model.parameters():
                    self._released.append((p, p.shape))
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        if "kv_cache" in tags:
            self._free_kv()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self._memory_report("release", tags, before)

    def _gpu_bytes(self) -> int:
        """GPU memory this engine holds: torch's allocations and the mapped regions (which torch does not see)."""
        if self.device.type != "cuda":
            return 0
        return torch.cuda.memory_allocated(self.device) + sum(r.nbytes for r in self._regions() if r.mapped)

    def _regions(self) -> list[device_memory.DeviceRegion]:
        return [self._weight_region] if self._weight_region is not None else []

    def _memory_report(self, what: str, tags: list[str], before: int) -> dict[str, int]:
        after = self._gpu_bytes()
        if self.device.type == "cuda":
            logger.info(
                "%s_memory_occupation %s: torch.cuda.memory_allocated %.2f GB -> %.2f GB",
                what,
                ",".join(tags),
                before / 1e9,
                after / 1e9,
            )
        return {"gpu_memory_allocated_before": before, "gpu_memory_allocated_after": after}

    def resume_memory(self, tags: list[str] | None = None) -> dict[str, int]:
        """Allocate what `release_memory` freed. Resumed weights hold no values until the next weight update (as
        in SGLang), so the engine stays paused: the weight sync's final /continue_generation lets requests run.
        Returns the GPU memory allocated before and after."""
        return self._on_engine_thread(self._resume_memory, _memory_tags(tags))

    def _resume_memory(self, tags: set[str]) -> dict[str, int]:
        before = self._gpu_bytes()
        with self._cv:
            if "weights" in tags and self.weights_released:
                if self._weight_region is not None:
                    self._weight_region.restore()
                for p, shape in self._released:
                    p.data = torch.empty(shape, dtype=p.dtype, device=p.device)
                self._released = []
                self._named_weights = None  # the fused weights' row views point at the released storage
                self._paused = True
            if "kv_cache" in tags:
                self._alloc_kv()
            self._cv.notify_all()
        return self._memory_report("resume", tags, before)

    def flush_cache(self) -> int:
        """Forget every cached prefix, so no later request reuses keys and values computed so far. Returns how many
        cached prefix blocks were dropped; refused (RuntimeError) while requests run."""
        return self._on_engine_thread(self._flush_cache)

    def _flush_cache(self) -> int:
        if self._rows:
            raise RuntimeError(f"cache not flushed: {len(self._rows)} requests are running")
        return self._forget_prefixes()

    def loads(self) -> dict:
        with self._cv:
            return {"num_running_reqs": len(self._rows), "num_waiting_reqs": len(self._waiting)}

    def wait_idle(self, timeout: float, include_waiting: bool = True) -> None:
        """Block until no request is running (and none waits, unless paused). Raises TimeoutError naming the count."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cv:
                # aborted waiting requests still owe their callers an answer, so they count either way
                waiting = self._waiting if include_waiting else [r for r in self._waiting if r.abort_message]
                busy = len(self._rows) + len(waiting)
            if busy == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine still has {busy} requests in flight after {timeout}s")
            time.sleep(0.01)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str | None) -> int:
        """Copy tensors into the model's parameters in place, between decode steps, all or none: every tensor is
        checked (a known name, its shape, a float for a float weight, finite values) before the first is copied;
        on an error the model and its weight version stay as they were. Returns how many were loaded."""
        return self._on_engine_thread(self._load_weights, named_tensors, weight_version)

    def _load_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str | None, complete: bool = False
    ) -> int:
        start = time.perf_counter()
        params = self._weights_by_name()
        names, targets, sources = [], [], []
        adapters: dict[str, dict[str, torch.Tensor]] = {}  # weight name -> {"A": [r, in], "B": [out, r]}
        for name, tensor in named_tensors:  # check every tensor before changing any weight
            if name.endswith((".lora_A.weight", ".lora_B.weight")):
                adapters.setdefault(name[: -len(".lora_A.weight")] + ".weight", {})[name[-8]] = tensor
                continue
            target = params.get(name)
            if target is None:
                raise KeyError(f"weight {name!r} is not a parameter of the served model")
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"weight {name!r}: a {type(tensor).__name__}, not a tensor")
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} != {tuple(target.shape)}")
            if tensor.dtype.is_floating_point != target.dtype.is_floating_point or tensor.dtype == torch.bool:
                raise TypeError(f"weight {name!r}: dtype {tensor.dtype} cannot replace {target.dtype}")
            names.append(name)
            targets.append(target)
            sources.append(tensor)
        pairs = _check_adapters(adapters, params)
        floats = [(n, s) for n, s in zip(names, sources, strict=True) if s.dtype.is_floating_point]
        floats += [(f"{n} (lora_{k})", t) for n, ab in pairs.items() for k, t in ab.items()]
        if floats:  # a NaN or an infinity makes its tensor's norm one: one reduction per tensor, one sync in all
            # norms in float32 whatever the weights' dtype: a finite float16 matrix can have a norm above 65504
            norms = torch.stack(torch._foreach_norm([s for _, s in floats], 2, dtype=torch.float32)).cpu()
            bad = (~torch.isfinite(norms)).nonzero()
            if len(bad):
                raise ValueError(f"weight {floats[int(bad[0])][0]!r} holds NaN or infinite values")
        if complete:  # a whole-model update must name every weight (a tied pair once is enough)
            missing = self._not_covered({id(t) for t in targets})
            if missing:
                raise ValueError(
                    f"{len(missing)} weights of the served model are missing from the update, e.g. {missing[:3]}"
                )
        if targets:
            with torch.no_grad():
                torch._foreach_copy_(targets, sources)  # hundreds of tensors in a few kernel launches
            if self.device.type == "cuda":  # the sender refills its buffers once we answer: the copy must be done
                torch.cuda.current_stream(self.device).synchronize()
            for name in names:  # a whole weight replaces the base its adapters applied to
                self._lora_base.pop(name, None)
        with torch.no_grad():
            for name, ab in pairs.items():
                target = params[name]
                base = self._lora_base.get(name)
                if base is None:
                    base = self._lora_base[name] = target.detach().clone()
                a, b = (ab[k].to(target.device, torch.float32) for k in ("A", "B"))
                target.copy_(torch.addmm(base.float(), b, a))
        count = len(targets) + 2 * len(pairs)
        if weight_version is not None:
            self._set_version(str(weight_version))
        self.stats["weight_updates"] += 1
        self.stats["weight_update_seconds"] += time.perf_counter() - start
        return count

    def _weights_by_name(self) -> dict[str, torch.Tensor]:
        """Every parameter (tied ones under each name) and buffer by name, and each fused projection's original
        names as row views of its fused weight. Built once: walking the module tree costs milliseconds per call,
        and the objects stay the same for the model's life (loads copy into them)."""
        if self._named_weights is None:
            named = dict(self.model.named_parameters(remove_duplicate=False))
            named.update(dict(self.model.named_buffers()))
            for name, (fused, start, stop) in self._aliases.items():
                named[name] = named[fused][start:stop]
            self._named_weights = named
        return self._named_weights

    def _not_covered(self, given: set[int]) -> list[str]:
        """The weights' names an update of the tensors with ids `given` (from `_weights_by_name`) leaves unset: a
        fused weight is set when it is named or when all its original names are."""
        params = self._weights_by_name()
        parts: dict[str, list[str]] = {}
        for name, (fused, _, _) in self._aliases.items():
            parts.setdefault(fused, []).append(name)
        covered = set(given)
        covered |= {id(params[f]) for f, names in parts.items() if all(id(params[n]) in given for n in names)}
        missing = []
        for name, p in params.items():
            if isinstance(p, torch.nn.Parameter) and id(p) not in covered:
                missing += [n for n in parts.get(name, [name]) if id(params[n]) not in given]
        return sorted(set(missing))

    def update_weights_from_disk(self, model_path: str, weight_version: str | None, partial: bool = False) -> int:
        """Load every safetensors file under `model_path` as one update, all or none (see `update_weights`); it must
        cover the whole model unless `partial`."""
        from safetensors.torch import load_file

        from slime.hub.provision import safetensors_files

        tensors = [item for path in safetensors_files(model_path) for item in load_file(path).items()]
        return self._on_engine_thread(self._load_weights, tensors, weight_version, not partial)

    def prompt_logprobs(self, input_ids: list[int], start: int, temperature: float) -> list[float | None]:
        """log p(token_j | tokens before j) for j = start .. len(input_ids) - 1, by SGLang's convention
        (`log_softmax(logits / temperature)`, plain for greedy) and with None for position 0 (nothing predicts it)."""
        return self._on_engine_thread(self._prompt_logprobs, input_ids, start, temperature)

    def shutdown(self) -> None:
        self.abort(abort_all=True, message="engine shut down")
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ engine thread
    @torch.no_grad()
    def _prompt_logprobs(self, input_ids: list[int], start: int, temperature: float) -> list[float | None]:
        if self.weights_released:
            raise ValueError("the engine released its weights (a colocated trainer is training); retry after the sync")
        if not 0 <= start < len(input_ids):
            raise ValueError(f"logprob_start_len {start} is outside the {len(input_ids)} input tokens")
        first = max(start, 1)  # the first position with a predictor
        ids = torch.tensor([input_ids], device=self.device)
        # one plain forward (no KV cache of the running batch is touched); logits only for the rows wanted
        rows = torch.arange(first - 1, len(input_ids) - 1, device=self.device)
        logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=rows).logits[0].float()
        if temperature > 1e-6:
            logits = logits / temperature
        picked = torch.log_softmax(logits, dim=-1).gather(1, ids[0, first:, None])[:, 0]
        return [None] * (first - start) + picked.cpu().tolist()

    def _set_version(self, version: str) -> None:
        with self._cv:
            for r in itertools.chain(self._rows, self._waiting):
                if r.output_ids and r.weight_version != version:  # every bucket of a sync names the same version
                    if not r.version_spans:
                        r.version_spans.append({"version": r.weight_version, "start": 0})
                    r.version_spans[-1]["end"] = len(r.output_ids)
                    r.version_spans.append({"version": version, "start": len(r.output_ids)})
                r.weight_version = version
            self.weight_version = version

    def _main(self, ready: Future) -> None:
        try:
            self._load()
        except BaseException as exc:
            self.model = self._weight_region = None  # the caller may start another backend on this device: free now
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            ready.set_exception(exc)
            return
        ready.set_result(None)
        self._loop()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and not self._calls and not self._has_work():
                    self._cv.wait(timeout=1.0)
                calls, self._calls = self._calls, deque()
                last = self._stopped and not self._rows and not self._waiting
            for call, fn, args in calls:
                if call.set_running_or_notify_cancel():
                    try:
                        call.set_result(fn(*args))
                    except BaseException as exc:
                        call.set_exception(exc)
            if last:
                return
            try:
                with torch.inference_mode():
                    self._retire_aborted()
                    if not (self._paused or self.weights_released) or self._stopped:
                        self._stepping = []
                        self._iteration()
                        self._end_probes()
            except Exception as exc:  # a broken step must not hang its callers, nor fail the innocent among them
                logger.exception("engine step failed")
                self._quarantine(f"engine error: {type(exc).__name__}: {exc}")
            self._deliver()

    def _on_engine_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) run on the engine thread between steps (see the module docstring); its result or exception."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        call: Future = Future()
        with self._cv:
            if self._stopped:
                raise RuntimeError(f"engine is shut down ({fn.__name__.lstrip('_')} not run)")
            self._calls.append((call, fn, args))
            self._cv.notify_all()
        while not wait_futures([call], timeout=5.0).done:
            if not self._thread.is_alive():
                raise RuntimeError(f"the engine thread exited before running {fn.__name__.lstrip('_')}")
        return call.result()

    def _has_work(self) -> bool:
        if any(r.abort_message for r in itertools.chain(self._waiting, self._rows)):
            return True
        return not (self._paused or self.weights_released) and bool(self._rows or self._waiting)

    def _retire_aborted(self) -> None:
        with self._cv:
            dropped = [r for r in self._waiting if r.abort_message]
            for r in dropped:
                self._waiting.remove(r)
        for r in dropped:
            self._finish(r, {"type": "abort", "message": r.abort_message, "status_code": None, "err_type": None})
        keep = []
        for i, r in enumerate(self._rows):
            if r.abort_message:
                self._finish(r, {"type": "abort", "message": r.abort_message, "status_code": None, "err_type": None})
            else:
                keep.append(i)
        self._select_rows(keep)

    def _sample_and_check(self, reqs: list[Request], logits: torch.Tensor, next_pos: list[int]) -> list[int]:
        """Sample one token per request, append it, finish the ones that stop. Returns indices still running.
        Sampling runs on the model's device, or on CPU when a request brings its own seeded generator (those are
        CPU generators, so a seeded sample does not depend on the device or the batch)."""
        seeded = any(r.generator is not None for r in reqs)
        generator = self.generator if seeded or self.device.type == "cpu" else self.device_generator
        logits = logits.float().to(generator.device)
        for i, r in enumerate(reqs):
            if len(r.output_ids) < r.params.min_new_tokens:
                logits[i, self._stop_ids(r)] = float("-inf")
        toks, lps = sample_next(logits, [r.params for r in reqs], [r.generator for r in reqs], generator)
        return self._accept(reqs, toks.tolist(), lps.tolist(), next_pos)

    def _accept(self, reqs: list[Request], toks: list[int], lps: list[float], next_pos: list[int]) -> list[int]:
        """Append one sampled token per request (next_pos: the position the token will take) and finish the ones
        that stop. Returns the indices still running."""
        keep = []
        for i, (r, tok, lp) in enumerate(zip(reqs, toks, lps, strict=True)):
            r.output_ids.append(tok)
            r.logprobs.append(lp)
            reason = self._finish_reason(r, tok, next_pos[i])
            if reason is None:
                keep.append(i)
            else:
                self._finish(r, reason)
        self.stats["generated_tokens"] += len(reqs)
        return keep

    def _stop_ids(self, r: Request) -> list[int]:
        return list(r.params.stop_token_ids) + ([] if r.params.ignore_eos else self.eos_ids)

    def _finish_reason(self, r: Request, tok: int, next_pos: int) -> dict | None:
        p = r.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids):
            return {"type": "stop", "matched": tok}
        if p.stop:
            tail = self.tokenizer.decode(r.output_ids[-(max(len(s) for s in p.stop) + 8) :])
            for s in p.stop:
                if s in tail:
                    return {"type": "stop", "matched": s}
        if len(r.output_ids) >= p.max_new_tokens or next_pos + 1 >= self.max_context:
            return {"type": "length", "length": len(r.output_ids)}
        return None

    def _finish(self, r: Request, reason: dict) -> None:
        r.finish_reason = reason
        r.finished = time.monotonic()
        if r.version_spans:
            r.version_spans[-1]["end"] = len(r.output_ids)
        self.stats["aborted_requests" if reason["type"] == "abort" else "finished_requests"] += 1
        self._done.append(r)

    def _deliver(self) -> None:
        """Run completion callbacks once the batch no longer holds the finished rows, so callers never see them."""
        done, self._done = self._done, []
        for r in done:
            try:
                r.on_done(r)
            except Exception:
                logger.exception("completion callback for %s failed", r.rid)

    def _admissible(self) -> list[Request]:
        """The waiting requests a backend may admit now, in order. A request under suspicion runs alone: it joins
        only an empty batch, and nothing joins it."""
        with self._cv:
            waiting = list(self._waiting)
        if any(r.probe_from is not None for r in self._rows):
            return []
        if waiting and waiting[0].probe_from is not None:
            return [] if self._rows else waiting[:1]
        return list(itertools.takewhile(lambda r: r.probe_from is None, waiting))

    def _quarantine(self, message: str) -> None:
        """A step raised. If one request was in it, that request fails alone. Otherwise none fails yet: each goes
        back to the front of the queue with its output so far (caches dropped, recomputed later) and runs alone
        until it produces a token, so a step that fails again holds just the request that breaks it. A request
        in two failed steps runs alone to its end. A failure with no request in the step fails every request."""
        involved = list({id(r): r for r in self._rows + self._stepping if r.finish_reason is None}.values())
        self.stats["failed_steps"] += 1
        if not involved:
            self._fail_all(message)
            return
        self._drop_all()
        self._rows, self._stepping = [], []
        if len(involved) == 1:
            self._finish(involved[0], {"type": "abort", "message": message, "status_code": 500,
                                       "err_type": "InternalError"})  # fmt: skip
            return
        logger.warning("%d requests were in the failed step; each now runs alone once", len(involved))
        with self._cv:
            for r in reversed(involved):
                r.strikes += 1
                r.probe_from = len(r.output_ids)
                self._waiting.appendleft(r)

    def _end_probes(self) -> None:
        """A suspect that produced a token alone is cleared: it goes back in line behind the other suspects and
        rejoins the batch from there. One with two strikes keeps running alone."""
        cleared = [r for r in self._rows if r.probe_from is not None and r.strikes < 2
                   and len(r.output_ids) > r.probe_from]  # fmt: skip
        if not cleared:
            return
        self._select_rows([i for i, r in enumerate(self._rows) if r not in cleared])
        with self._cv:
            suspects = sum(1 for _ in itertools.takewhile(lambda r: r.probe_from is not None, self._waiting))
            for k, r in enumerate(cleared):
                r.probe_from = None
                self._waiting.insert(suspects + k, r)

    def _fail_all(self, message: str) -> None:
        with self._cv:
            reqs = list(self._rows) + list(self._waiting)
            self._waiting.clear()
        self._drop_all()
        self._rows = []
        for r in reqs:
            self._finish(r, {"type": "abort", "message": message, "status_code": 500, "err_type": "InternalError"})

    # ------------------------------------------------------------------ backend hooks (engine thread)
    def _setup(self) -> None:
        """Build the backend's state (KV cache, buffers); runs once on the engine thread, before the first step."""

    def _iteration(self) -> None:
        """Admit waiting requests and run one decode step for the running ones."""
        raise NotImplementedError

    def _select_rows(self, keep: list[int]) -> None:
        """Keep only the running rows at these indices, freeing the others' cache."""
        raise NotImplementedError

    def _drop_all(self) -> None:
        """Forget every running row's cache after a failed step."""
        raise NotImplementedError

    def _free_kv(self) -> None:
        """Give back the KV cache's memory (the engine is idle)."""

    def _alloc_kv(self) -> None:
        """Allocate what `_free_kv` gave back."""

    def _free_graphs(self) -> None:
        """Drop captured CUDA graphs (their buffers refer to storage about to be freed)."""

    def _forget_prefixes(self) -> int:
        """Stop sharing cached prefixes; returns how many cached blocks were dropped (a backend without a prefix
        cache has none)."""
        return 0


MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


def _memory_tags(tags: list[str] | None) -> set[str]:
    unknown = set(tags or []) - set(MEMORY_TAGS)
    if unknown:
        raise ValueError(f"unknown memory tags {sorted(unknown)}; known: {list(MEMORY_TAGS)}")
    return set(tags or MEMORY_TAGS)


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids += value if isinstance(value, list) else [value] if value is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def _check_adapters(
    adapters: dict[str, dict[str, torch.Tensor]], params: dict[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """LoRA updates of a weight W [out, in]: both factors, A [r, in] and B [out, r] (B already scaled); a KeyError or
    ValueError naming the weight otherwise."""
    for name, ab in adapters.items():
        target = params.get(name)
        if target is None or target.dim() != 2:
            raise KeyError(f"LoRA update for {name!r}: not a matrix weight of the served model")
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA update for {name!r}: lora_A and lora_B come together, got only lora_{''.join(ab)}")
        a, b = ab["A"], ab["B"]
        if (
            a.dim() != 2
            or b.dim() != 2
            or a.shape[1] != target.shape[1]
            or b.shape[0] != target.shape[0]
            or (a.shape[0] != b.shape[1])
        ):
            raise ValueError(
                f"LoRA update for {name!r} {tuple(target.shape)}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                "are not [r, in] and [out, r]"
            )
        if not (a.dtype.is_floating_point and b.dtype.is_floating_point):
            raise TypeError(f"LoRA update for {name!r}: factors must be floating point")
    return adapters
