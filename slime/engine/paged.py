"""The paged backend: a block-paged KV cache, prefix sharing, chunked prefill and CUDA-graph decode.

Three parts, as small engines are usually split:
- `slime.engine.scheduler.PagedScheduler` decides each pass: which sequences prefill how many tokens (chunked
  prefill, prefix sharing through `slime.engine.kv_cache.BlockPool`), which decode, and who is preempted when the
  cache is full;
- `slime.engine.model_runner.PagedModelRunner` owns the cache tensors and runs the passes (CUDA graphs and Triton
  paged attention on GPU, the torch path elsewhere);
- sampling (`slime.engine.sampling`): inside the CUDA graph for requests that need only a temperature, on the host
  side of the step for the rest (top-k/top-p/min-p, min_new_tokens, their own seed).
This class wires them to the request lifecycle of `EmbeddedEngine`. Prefill computes every token but the last; the
last goes through the decode step, so sampling happens only there.

Continuous decode steps: while every running request samples inside the step and nothing else needs the engine
thread (a request that could join, a call, an abort), decode steps follow each other without a return to the loop.
Step n + 1 is launched before the host reads step n's tokens, so the host's bookkeeping (appending tokens, stop
checks) runs while the GPU computes. Cache blocks are reserved `decode_steps` tokens ahead, and that is also how
often the run checks whether to stop. A request that stops at step n has already been given step n + 1; that token
is dropped, its key and value written to the request's own block (counted as cached, which is true).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from slime.engine.embedded import EmbeddedEngine, Request
from slime.engine.kv_cache import CacheFull
from slime.engine.model_runner import PagedModelRunner
from slime.engine.paged_attention import PagedUnsupported, probe_model, register
from slime.engine.scheduler import PagedScheduler


class PagedEngine(EmbeddedEngine):
    backend = "paged"

    def __init__(
        self,
        *args,
        block_size: int = 16,
        kv_cache_tokens: int = 0,
        mem_fraction_static: float = 0.85,
        cuda_graph: bool = True,
        cuda_graph_max_bs: int = 512,
        torch_compile: bool = True,
        prefix_cache: bool = True,
        decode_steps: int = 0,
        **kwargs,
    ):
        self.decode_steps = decode_steps  # 0: 8 where the step samples on the GPU, else 1
        self.torch_compile = torch_compile
        self.prefix_cache = prefix_cache
        self.block_size = block_size
        self.kv_cache_tokens = kv_cache_tokens
        self.mem_fraction_static = mem_fraction_static
        self.cuda_graph_max_bs = cuda_graph_max_bs
        self.use_graphs = cuda_graph
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ setup and memory (engine thread)
    def _setup(self) -> None:
        cfg = self.config
        unsupported = [t for t in getattr(cfg, "layer_types", None) or [] if t != "full_attention"]
        if unsupported:
            raise PagedUnsupported(f"it serves full-attention layers only; this model has {sorted(set(unsupported))}")
        kv_heads, head_dim = probe_model(self.model, cfg.num_hidden_layers, self.max_context)
        self.model.config._attn_implementation = register()
        # seconds spent in prefill passes and in decode steps (with their host bookkeeping)
        self.stats.update(
            prefill_tokens=0,
            prefill_passes=0,
            prefill_seconds=0.0,
            decode_steps=0,
            decode_seconds=0.0,
            preemptions=0,
            prefix_shared_tokens=0,
        )
        self.scheduler = PagedScheduler(
            self.block_size,
            self.max_running_requests,
            self.max_prefill_tokens,
            self.stats,
            self.prefix_cache,
            self.chunked_prefill_size,
        )
        if self.device.type == "cuda":
            torch.cuda.manual_seed(int(self.generator.initial_seed()))
        self.runner = PagedModelRunner(
            self.model,
            self.device,
            self.block_size,
            self.max_running_requests,
            math.ceil(self.max_context / self.block_size),
            kv_heads,
            head_dim,
            self.use_graphs,
            self.cuda_graph_max_bs,
            self.torch_compile,
            self.stats,
            step_sampling=self.decode_steps > 1,  # asked for on CPU: continuous steps need the step to sample
        )
        if not self.decode_steps:
            self.decode_steps = 8 if self.runner.samples_in_step else 1
        self._alloc_kv()
        self.runner.compile_decode_step()

    @property
    def decode_step_compiled(self) -> bool:
        return self.runner.compiled

    def _alloc_kv(self) -> None:
        if self.runner.has_kv:
            return
        blocks = self.runner.kept_blocks or (
            self.runner.kv_tokens(self.kv_cache_tokens, self.mem_fraction_static, self.max_context) // self.block_size
            + 1
        )
        self.runner.alloc_kv(blocks)
        self.scheduler.new_pool(blocks)

    def _free_kv(self) -> None:
        self.runner.free_kv()
        self.scheduler.drop_pool()

    def _free_graphs(self) -> None:
        self.runner.free_graphs()

    def _movable(self) -> bool:
        return super()._movable() and self.runner.kv_region is not None

    def _regions(self) -> list:
        return super()._regions() + ([self.runner.kv_region] if self.runner.kv_region is not None else [])

    def _load_weights(self, named_tensors, weight_version: str | None, complete: bool = False) -> int:
        count = super()._load_weights(named_tensors, weight_version, complete)
        self._forget_prefixes()
        return count

    def _forget_prefixes(self) -> int:
        return self.scheduler.forget_prefixes()

    def _select_rows(self, keep: list[int]) -> None:
        kept = set(keep)
        for i, r in enumerate(self._rows):
            if i not in kept:
                self.scheduler.free(r)
        self._rows = [self._rows[i] for i in keep]
        if not self._rows and self.device.type == "cuda" and not self.runner.has_graphs:
            torch.cuda.empty_cache()  # idle: a trainer may share this GPU

    def _drop_all(self) -> None:
        for r in self._rows:
            self.scheduler.free(r, keep=False)  # after a failed step: nothing of theirs is offered to others

    def _requeue(self, r: Request) -> None:
        """A preempted request goes back first in line, keeping its output so far."""
        with self._cv:
            self._waiting.appendleft(r)

    def _zero_fresh(self) -> None:
        self.runner.zero_blocks(self.scheduler.fresh)
        self.scheduler.fresh = []

    # ------------------------------------------------------------------ one iteration
    def _iteration(self) -> None:
        if not self.runner.has_kv:
            self._alloc_kv()
        chunks, admitted = self.scheduler.schedule_prefill(self._rows, self._admissible, self._requeue)
        if admitted:
            with self._cv:
                ids = {id(r) for r in admitted}
                self._waiting = type(self._waiting)(r for r in self._waiting if id(r) not in ids)
        if chunks:
            start = time.perf_counter()
            self._prefill(chunks)
            self.stats["prefill_tokens"] += sum(n for _, n in chunks)
            self.stats["prefill_passes"] += 1
            self.stats["prefill_seconds"] += time.perf_counter() - start
        rows = [r for r in self._rows if self.scheduler.uncached(r) == 0]
        if rows:
            start = time.perf_counter()
            self.stats["decode_steps"] += self._decode(rows)
            self.stats["decode_seconds"] += time.perf_counter() - start

    def _prefill(self, chunks: list[tuple[Request, int]]) -> None:
        ids, pos, slots = [], [], []
        for r, n in chunks:
            ids += self.scheduler.tokens(r)[r.num_cached : r.num_cached + n]
            pos.append(np.arange(r.num_cached, r.num_cached + n))
            slots.append(self.scheduler.slots(r, pos[-1]))
        pos, slots = np.concatenate(pos), np.concatenate(slots)
        self._zero_fresh()
        tables = [r.blocks for r, _ in chunks]
        self.runner.prefill(ids, pos, slots, tables, [r.num_cached for r, _ in chunks], [n for _, n in chunks])
        self.scheduler.published(chunks)

    def _decode(self, rows: list[Request]) -> int:
        """Decode the rows (one step, or a run of steps back to back); returns the number of steps run."""
        rows = self.scheduler.schedule_decode(rows, self._rows, self._requeue)
        if not rows:
            return 0
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(rows))
        if self.runner.samples_in_step and all(self._plain(r) for r in rows):
            return self._decode_steps(rows)
        last = [self.scheduler.last_token(r) for r in rows]
        pos = [r.num_cached for r in rows]
        slots = [self.scheduler.slot(r, p) for r, p in zip(rows, pos, strict=True)]
        self._zero_fresh()
        logits = self.runner.decode(last, pos, slots, [r.blocks for r in rows])
        for r in rows:
            r.num_cached += 1
        self._drop_finished(rows, self._sample_and_check(rows, logits, [p + 1 for p in pos]))
        return 1

    def _may_run_on(self, rows: list[Request]) -> bool:
        """Whether the decode steps of `rows` may follow each other without returning to the loop: no call waits for
        the engine thread, nothing is aborted or paused, and no waiting request could join (a prefill would
        otherwise wait for the run, and a late request start that much later)."""
        with self._cv:
            waiting, calls = bool(self._waiting), bool(self._calls)
        return (
            self.decode_steps > 1
            and not (calls or self._paused or self._stopped or self.weights_released)
            and (not waiting or len(self._rows) >= self.max_running_requests)
            and not any(r.abort_message or r.probe_from is not None for r in rows)
        )

    def _reserve(self, rows: list[Request]) -> bool:
        """Give every row cache blocks for its next `decode_steps` tokens; False if the cache cannot (what was
        reserved stays with its row)."""
        try:
            for r in rows:
                self.scheduler.grow(r, min(r.num_cached + self.decode_steps, self.max_context))
        except CacheFull:
            return False
        return True

    def _decode_steps(self, rows: list[Request]) -> int:
        """Decode steps that sample inside, each launched before the previous one's tokens are read, for as long as
        `_may_run_on` holds; cache blocks are reserved `decode_steps` tokens ahead, so nothing grows in between."""
        alone = len(rows) == len(self._rows)  # no other row is being prefilled: it would wait for the whole run
        reserved = self.decode_steps if alone and self._may_run_on(rows) and self._reserve(rows) else 1
        self._zero_fresh()
        batch = rows
        pos = [r.num_cached for r in batch]  # where each row's input token goes
        step = self.runner.launch(
            [self.scheduler.last_token(r) for r in batch],
            pos,
            [r.blocks for r in batch],
            [1.0 if r.params.greedy else float(r.params.temperature) for r in batch],
            [r.params.greedy for r in batch],
        )
        for r in batch:
            r.num_cached += 1
        launched = 1
        while step is not None:
            # rows that stopped at the step before are out; so are those whose running step is their last
            keep = [i for i, r in enumerate(batch) if r.finish_reason is None and not self._last_step(r)]
            following_batch = [batch[i] for i in keep]
            tables = None
            if keep and launched == reserved and self._may_run_on(following_batch) and self._reserve(following_batch):
                reserved += self.decode_steps
                self._zero_fresh()
                tables = [r.blocks for r in following_batch]
            following = None
            if keep and launched < reserved:
                following = self.runner.launch_next(step, None if len(keep) == len(batch) else keep, tables)
                for r in following_batch:
                    r.num_cached += 1
                launched += 1
            toks, lps = step.result()
            live = [i for i, r in enumerate(batch) if r.finish_reason is None]  # a stopped row's extra token: dropped
            reqs = [batch[i] for i in live]
            done = self._accept(reqs, [toks[i] for i in live], [lps[i] for i in live], [pos[i] + 1 for i in live])
            self._drop_finished(reqs, done)
            self._deliver()
            step, batch = following, following_batch if following is not None else []
            pos = [r.num_cached - 1 for r in batch]
        return launched

    def _last_step(self, r: Request) -> bool:
        """Whether the step running for r (not yet read) gives r its last token by length: no step after it."""
        return len(r.output_ids) + 1 >= r.params.max_new_tokens or r.num_cached + 1 >= self.max_context

    def _drop_finished(self, rows: list[Request], keep: list[int]) -> None:
        """Take the rows not in `keep` (indices into `rows`: they finished) out of the batch."""
        if len(keep) < len(rows):
            gone = {id(rows[i]) for i in set(range(len(rows))) - set(keep)}
            self._select_rows([i for i, r in enumerate(self._rows) if id(r) not in gone])

    def _plain(self, r: Request) -> bool:
        """Whether the in-graph sampler (temperature only) serves this request."""
        p = r.params
        return (
            r.generator is None
            and len(r.output_ids) >= p.min_new_tokens
            and p.min_p <= 0
            and p.top_p >= 1
            and (p.top_k < 1 or p.top_k >= self.config.vocab_size)
        )
