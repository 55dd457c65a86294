"""The paged backend: a block-paged KV cache, prefix sharing, chunked prefill and CUDA-graph decode.

Each iteration of the engine thread
1. prefills: sequences still holding uncached tokens get up to `max_prefill_tokens` of them computed in one packed
   forward (a long prompt takes several iterations: chunked prefill). A newly admitted request first takes the
   published blocks of its prompt's prefix (`BlockPool.share_prefix`), so the n samples of one prompt compute it once;
   a request whose next block is being computed in this same pass by another request waits one pass to share it.
   Prefill computes every token but the last; the last goes through the decode step, so sampling happens only there.
2. decodes: one token for every sequence whose tokens are all cached but the last. On CUDA the step replays a graph
   captured for the smallest batch-size bucket that fits (model forward, Triton paged attention, temperature,
   log-softmax and exponential-race sampling all inside); requests that need top-k/top-p/min-p, min_new_tokens or
   their own seed are sampled outside the graph from its logits. On CPU the step runs eagerly.
When the cache runs out, the most recently admitted sequence is preempted: its blocks are freed and it goes back to
the front of the queue with its output so far, to be recomputed (no output is lost). Weight updates copy into the
parameters in place, so captured graphs keep working; releasing the weights or the cache drops the graphs, which are
captured again on the next step.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from slime.engine.embedded import EmbeddedEngine, Request
from slime.engine.kv_cache import BlockPool, CacheFull
from slime.engine.paged_attention import (
    PagedForward,
    PagedUnsupported,
    gather_plan,
    probe_model,
    register,
)

logger = logging.getLogger(__name__)

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


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
        **kwargs,
    ):
        self.torch_compile = torch_compile
        self.block_size = block_size
        self.kv_cache_tokens = kv_cache_tokens
        self.mem_fraction_static = mem_fraction_static
        self.cuda_graph_max_bs = cuda_graph_max_bs
        self.use_graphs = cuda_graph
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ setup and memory
    def _setup(self) -> None:
        cfg = self.config
        unsupported = [t for t in getattr(cfg, "layer_types", None) or [] if t != "full_attention"]
        if unsupported:
            raise PagedUnsupported(f"it serves full-attention layers only; this model has {sorted(set(unsupported))}")
        self.num_layers = cfg.num_hidden_layers
        self.kv_heads, self.head_dim = probe_model(self.model, self.num_layers, self.max_context)
        self.model.config._attn_implementation = register()
        self.on_cuda = self.device.type == "cuda"
        self.triton = False
        if self.on_cuda:
            try:
                import slime.engine.triton_decode  # noqa: F401

                self.triton = self.head_dim & (self.head_dim - 1) == 0  # the kernel tiles a power-of-two head dim
            except ImportError:
                logger.warning("triton is not importable: decode attention runs through torch")
        self.use_graphs = self.use_graphs and self.on_cuda and self.triton
        self.max_blocks = math.ceil(self.max_context / self.block_size)
        self._kv: torch.Tensor | None = None  # [layers, 2 (keys, values), slots, kv_heads, head_dim]
        self._k: list[torch.Tensor] | None = None
        self._v: list[torch.Tensor] | None = None
        self._scratch: torch.Tensor | None = None  # torch attention path: keys and values gathered per layer
        self.pool: BlockPool | None = None
        self._graphs: dict[int, tuple] = {}
        self._graph_pool = None
        # seconds spent: prefill passes; decode steps; of those, the model forward until its tokens reached the host
        self.stats.update(
            prefill_tokens=0,
            prefill_seconds=0.0,
            decode_steps=0,
            decode_seconds=0.0,
            decode_forward_seconds=0.0,
            preemptions=0,
            prefix_shared_tokens=0,
        )
        self._alloc_kv()
        self._sample = sample_rows
        if self.on_cuda:
            torch.cuda.manual_seed(int(self.generator.initial_seed()))
            self._alloc_static()
            if self.torch_compile and self.triton:
                self._fuse()

    def _kv_blocks(self) -> int:
        per_token = 2 * self.num_layers * self.kv_heads * self.head_dim * self.model.dtype.itemsize
        if self.kv_cache_tokens:
            tokens = self.kv_cache_tokens
        elif self.on_cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            # what the step itself needs beside the cache: fp32 logits and their softmax temporaries per batch row
            workspace = self.max_running_requests * self.config.vocab_size * 4 * 6 + (1 << 30)
            budget = total * self.mem_fraction_static - torch.cuda.memory_allocated(self.device) - workspace
            budget = min(budget, free - workspace)  # others on this GPU (a trainer) keep what they hold
            tokens = min(int(budget // per_token), self.max_running_requests * self.max_context)
            if tokens < 4 * self.block_size:
                raise RuntimeError(
                    f"--mem-fraction-static {self.mem_fraction_static} of {total / 1e9:.1f} GB "
                    f"({free / 1e9:.1f} GB free) leaves no room for the KV cache"
                )
        else:  # CPU pages are committed only when written, so a generous pool costs nothing until used
            tokens = self.max_running_requests * min(self.max_context, 2048)
        return tokens // self.block_size + 1

    def _alloc_kv(self) -> None:
        if self._kv is not None:
            return
        blocks = self._kv_blocks()
        shape = (self.num_layers, 2, blocks * self.block_size, self.kv_heads, self.head_dim)
        # one tensor, so zeroing fresh blocks is one kernel; per layer [slots, kv_heads, head_dim] views of it
        self._kv = torch.empty(shape, dtype=self.model.dtype, device=self.device)
        self._k = [self._kv[i, 0] for i in range(self.num_layers)]
        self._v = [self._kv[i, 1] for i in range(self.num_layers)]
        self._kv[:, :, : self.block_size].zero_()  # block 0 is read through padding: keep it finite
        self._fresh: list[int] = []  # blocks handed out and not yet zeroed
        self.pool = BlockPool(blocks, self.block_size)
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GB)",
            blocks,
            self.block_size,
            self.pool.capacity_tokens,
            self._kv.nbytes / 1e9,
        )

    def _free_kv(self) -> None:
        self._kv = self._k = self._v = self.pool = self._scratch = None

    def _free_graphs(self) -> None:
        if self._graphs:
            self._graphs.clear()
            self._graph_pool = None
            torch.cuda.empty_cache()

    def _alloc_static(self) -> None:
        """Fixed-address inputs of the decode step, so a captured graph reads each step's values."""
        n, dev = max(self.max_running_requests, 1), self.device
        self._s_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self._s_pos = torch.zeros(n, dtype=torch.long, device=dev)
        self._s_slots = torch.zeros(n, dtype=torch.long, device=dev)
        self._s_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self._s_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        self._s_temp = torch.ones(n, dtype=torch.float32, device=dev)
        self._s_greedy = torch.zeros(n, dtype=torch.bool, device=dev)

    def _load_weights(self, named_tensors, weight_version: str | None) -> int:
        count = super()._load_weights(named_tensors, weight_version)
        if self.pool is not None:
            self.pool.forget_prefixes()
        return count

    # ------------------------------------------------------------------ row bookkeeping
    def _tokens(self, r: Request) -> list[int]:
        return r.input_ids + r.output_ids if r.output_ids else r.input_ids

    def _uncached(self, r: Request) -> int:
        """Tokens still to prefill (all but the last token, which the decode step consumes)."""
        return len(r.input_ids) + len(r.output_ids) - 1 - r.num_cached

    def _select_rows(self, keep: list[int]) -> None:
        kept = set(keep)
        for i, r in enumerate(self._rows):
            if i not in kept:
                self._free_row(r)
        self._rows = [self._rows[i] for i in keep]
        if not self._rows and self.on_cuda and not self._graphs:
            torch.cuda.empty_cache()  # idle: a trainer may share this GPU

    def _free_row(self, r: Request) -> None:
        if self.pool is not None:
            self.pool.release(r.blocks)
        r.blocks, r.num_cached = [], 0

    def _drop_all(self) -> None:
        for r in self._rows:
            self._free_row(r)

    def _slot(self, r: Request, pos: int) -> int:
        """The cache slot of r's token at position `pos`."""
        return r.blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def _grow(self, r: Request, upto: int) -> None:
        """Give r blocks for positions < upto; raises CacheFull (keeping what it got)."""
        while len(r.blocks) * self.block_size < upto:
            r.blocks.append(self.pool.allocate())
            self._fresh.append(r.blocks[-1])

    def _preempt(self, keep: list[Request]) -> Request | None:
        """Free the latest admitted row not in `keep` and queue it first again. Returns it (None: there is none)."""
        kept = {id(r) for r in keep}
        for r in reversed(self._rows):
            if id(r) not in kept:
                self._free_row(r)
                self._rows.remove(r)
                with self._cv:
                    self._waiting.appendleft(r)
                self.stats["preemptions"] += 1
                logger.info(
                    "KV cache full: %s preempted (%d tokens, recomputed later)",
                    r.rid,
                    len(r.input_ids) + len(r.output_ids),
                )
                return r
        return None

    # ------------------------------------------------------------------ one iteration
    def _iteration(self) -> None:
        if self.pool is None:
            self._alloc_kv()
        chunks = self._schedule_prefill()
        if chunks:
            start = time.perf_counter()
            self._prefill(chunks)
            self.stats["prefill_tokens"] += sum(n for _, n in chunks)
            self.stats["prefill_seconds"] += time.perf_counter() - start
        rows = [r for r in self._rows if self._uncached(r) == 0]
        if rows:
            start = time.perf_counter()
            self._decode(rows)
            self.stats["decode_steps"] += 1
            self.stats["decode_seconds"] += time.perf_counter() - start

    def _schedule_prefill(self) -> list[tuple[Request, int]]:
        """Pick (request, tokens) for this pass's prefill, admitting waiting requests while budget and cache last."""
        budget, chunks = self.max_prefill_tokens, []
        decoding = sum(1 for r in self._rows if self._uncached(r) == 0)
        preempted: set[int] = set()
        for r in list(self._rows):
            n = min(self._uncached(r), budget)
            if n <= 0 or id(r) in preempted:
                continue
            while True:
                try:
                    self._grow(r, r.num_cached + n)
                    break
                except CacheFull:
                    # decoding rows finish and free blocks; with none, only preempting frees any
                    victim = None if decoding else self._preempt(keep=[r] + [c for c, _ in chunks])
                    if victim is None:
                        return chunks
                    preempted.add(id(victim))
            chunks.append((r, n))
            budget -= n
        pending: set[tuple] = set()  # first uncomputed block of each request admitted in this pass
        with self._cv:
            waiting = list(self._waiting)
        admitted = []
        for r in waiting:
            if budget <= 0 or len(self._rows) >= self.max_running_requests:
                break
            if r.abort_message:
                continue
            tokens = self._tokens(r)
            if len(tokens) + 1 > self.pool.capacity_tokens:
                r.abort_message = (
                    f"prompt of {len(tokens)} tokens does not fit the KV cache ({self.pool.capacity_tokens} tokens)"
                )
                continue
            target = len(tokens) - 1
            r.blocks = self.pool.share_prefix(tokens, target)
            r.num_cached = len(r.blocks) * self.block_size
            key = self._next_block_key(r, tokens, target)
            if key is not None and key in pending:  # computed in this pass by another request: share it next pass
                self._free_row(r)
                continue
            n = min(target - r.num_cached, budget)
            need = math.ceil((r.num_cached + n + 1) / self.block_size) - len(r.blocks)
            if self.pool.free < need + decoding:  # leave each decoding row room for its next block
                self._free_row(r)
                break
            self._grow(r, r.num_cached + max(n, 1))
            if key is not None:
                pending.add(key)
            self._rows.append(r)
            admitted.append(r)
            self.stats["prefix_shared_tokens"] += r.num_cached
            decoding += n == 0
            if n > 0:
                chunks.append((r, n))
                budget -= n
        if admitted:
            with self._cv:
                ids = {id(r) for r in admitted}
                self._waiting = type(self._waiting)(r for r in self._waiting if id(r) not in ids)
        return chunks

    def _next_block_key(self, r: Request, tokens: list[int], target: int) -> tuple | None:
        i, bs = len(r.blocks), self.block_size
        if (i + 1) * bs > target:
            return None
        return (r.blocks[-1] if r.blocks else -1, tuple(tokens[i * bs : (i + 1) * bs]))

    def _prefill(self, chunks: list[tuple[Request, int]]) -> None:
        ids, pos, slots = [], [], []
        for r, n in chunks:
            ids += self._tokens(r)[r.num_cached : r.num_cached + n]
            for p in range(r.num_cached, r.num_cached + n):
                pos.append(p)
                slots.append(self._slot(r, p))
        q_start = torch.tensor([r.num_cached for r, _ in chunks])
        q_len = torch.tensor([n for _, n in chunks])
        fwd = self._gather_forward([r.blocks for r, _ in chunks], q_start, q_len, slots)
        dev = self.device
        self.model(
            input_ids=torch.tensor([ids], device=dev),
            position_ids=torch.tensor([pos], device=dev),
            use_cache=False,
            paged=fwd,
            logits_to_keep=1,
        )
        for r, n in chunks:
            r.num_cached += n
            self.pool.publish(self._tokens(r), r.blocks, r.num_cached)

    def _gather_forward(
        self, tables: list[list[int]], q_start: torch.Tensor, q_len: torch.Tensor, slots: list[int]
    ) -> PagedForward:
        self._zero_fresh()
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
        q_index, q_valid, mask = gather_plan(q_start, q_len, int(q_len.max()), width * self.block_size)
        dev = self.device
        scratch = None if self.on_cuda else self._gather_scratch(len(tables) * width)
        return PagedForward(
            self._k,
            self._v,
            torch.tensor(slots, device=dev),
            q_index.to(dev),
            q_valid.to(dev),
            table.to(dev),
            mask.to(dev),
            gathered=scratch,
            block_size=self.block_size,
        )

    def _gather_scratch(self, rows: int) -> torch.Tensor:
        """[2, rows, block] scratch for the torch path's gathered keys and values; on CPU only (fresh pages are
        costly there, and CUDA's caching allocator already reuses memory). Grown, never shrunk."""
        if self._scratch is None or self._scratch.shape[1] < rows:
            have = 0 if self._scratch is None else self._scratch.shape[1]
            row = self.block_size * self.kv_heads * self.head_dim
            self._scratch = torch.empty(2, max(rows, 2 * have), row, dtype=self._kv.dtype, device=self.device)
        return self._scratch[:, :rows]

    def _zero_fresh(self) -> None:
        """Zero the blocks handed out since the last forward: the torch path reads whole blocks, and the unwritten
        tail of one must not be NaN (masked attention weights are 0, and 0 * NaN is NaN)."""
        if self._fresh:
            fresh = torch.tensor(self._fresh, device=self.device)
            self._kv.view(2 * self.num_layers, self.pool.num_blocks, -1).index_fill_(1, fresh, 0)
            self._fresh = []

    def _decode(self, rows: list[Request]) -> None:
        preempted: set[int] = set()
        for r in rows:  # every row needs a slot for its last token
            while id(r) not in preempted:
                try:
                    self._grow(r, r.num_cached + 1)
                    break
                except CacheFull:
                    victim = self._preempt(keep=[r])
                    if victim is None:
                        r.abort_message = f"KV cache full ({self.pool.capacity_tokens} tokens) for one sequence"
                        break
                    preempted.add(id(victim))
        running = {id(r) for r in self._rows}
        rows = [r for r in rows if id(r) in running and not r.abort_message]
        if not rows:
            return
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(rows))
        last = [r.output_ids[-1] if r.output_ids else r.input_ids[-1] for r in rows]
        pos = [r.num_cached for r in rows]
        slots = [self._slot(r, p) for r, p in zip(rows, pos, strict=True)]
        start = time.perf_counter()
        if self.on_cuda and self.triton:  # the graph's sampler serves the batch when every row is plain
            logits, toks, lps = self._decode_cuda(rows, last, pos, slots)
            fast = all(self._plain(r) for r in rows)
        else:
            ones = torch.ones(len(rows), dtype=torch.long)
            fwd = self._gather_forward([r.blocks for r in rows], torch.tensor(pos), ones, slots)
            logits = self.model(
                input_ids=torch.tensor(last, device=self.device)[:, None],
                position_ids=torch.tensor(pos, device=self.device)[:, None],
                use_cache=False,
                paged=fwd,
            ).logits[:, 0]
            fast = False
        for r in rows:
            r.num_cached += 1
        next_pos = [p + 1 for p in pos]
        if fast:
            toks, lps = toks.tolist(), lps.tolist()
            self.stats["decode_forward_seconds"] += time.perf_counter() - start
            keep = self._accept(rows, toks, lps, next_pos)
        else:
            keep = self._sample_and_check(rows, logits, next_pos)
        done = set(range(len(rows))) - set(keep)
        if done:
            gone = {id(rows[i]) for i in done}
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

    # ------------------------------------------------------------------ CUDA decode
    def _decode_cuda(self, rows: list[Request], last: list[int], pos: list[int], slots: list[int]):
        self._zero_fresh()
        n = len(rows)
        bucket = next((b for b in GRAPH_BUCKETS if n <= b <= self.max_running_requests), n)
        graphed = self.use_graphs and bucket <= self.cuda_graph_max_bs
        if graphed and bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket)
        width, pad = max(len(r.blocks) for r in rows), bucket - n
        self._fill(
            bucket,
            last + [0] * pad,
            pos + [0] * pad,
            slots + [0] * pad,
            [r.blocks + [0] * (width - len(r.blocks)) for r in rows] + [[0] * width] * pad,
            [1.0 if r.params.greedy else float(r.params.temperature) for r in rows] + [1.0] * pad,
            [r.params.greedy for r in rows] + [True] * pad,
        )
        if graphed:
            graph, out = self._graphs[bucket]
            graph.replay()
        else:
            out = self._decode_body(bucket)
        logits, toks, lps = out
        return logits[:n], toks[:n], lps[:n]

    def _fill(self, b: int, ids, pos, slots, tables, temps, greedy) -> None:
        host = torch.tensor
        self._s_ids[:b].copy_(host(ids), non_blocking=True)
        self._s_pos[:b].copy_(host(pos), non_blocking=True)
        self._s_slots[:b].copy_(host(slots), non_blocking=True)
        self._s_lens[:b].copy_(host([p + 1 for p in pos], dtype=torch.int32), non_blocking=True)
        self._s_tables[:b, : len(tables[0])].copy_(host(tables, dtype=torch.int32), non_blocking=True)
        self._s_temp[:b].copy_(host(temps, dtype=torch.float32), non_blocking=True)
        self._s_greedy[:b].copy_(host(greedy), non_blocking=True)

    def _fill_padding(self, b: int) -> None:
        """Static rows that only touch the scratch block 0: what warm-up, compilation and capture run on."""
        self._fill(b, [0] * b, [0] * b, [0] * b, [[0]] * b, [1.0] * b, [False] * b)

    def _decode_body(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step over the first b static rows: logits [b, V] float32, sampled tokens [b], logprobs [b]."""
        fwd = PagedForward(
            self._k,
            self._v,
            self._s_slots[:b],
            block_tables=self._s_tables[:b],
            seq_lens=self._s_lens[:b],
            block_size=self.block_size,
        )
        logits = self.model(
            input_ids=self._s_ids[:b, None], position_ids=self._s_pos[:b, None], use_cache=False, paged=fwd
        ).logits[:, 0]
        noise = torch.empty(logits.shape, device=logits.device).exponential_()  # graph-safe RNG: outside compile
        return self._sample(logits, self._s_temp[:b], self._s_greedy[:b], noise)

    def _fuse(self) -> None:
        """torch.compile the small pieces of a decode step: the RMSNorms (several elementwise kernels and a reduction
        each, four per layer) and the sampler's arithmetic, each becoming one or two kernels. The model's code is
        unchanged. If compilation fails here (no working compiler), the step stays eager."""
        norms = [m for m in self.model.modules() if type(m).__name__.endswith("RMSNorm")]
        for m in norms:
            m.compile(dynamic=True)
        self._sample = torch.compile(sample_rows, dynamic=True)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                for b in (1, 2):  # batch 1 is specialised apart from the others
                    self._fill_padding(b)
                    self._decode_body(b)
                torch.cuda.synchronize(self.device)
            logger.info("compiled the decode step's norms and sampler in %.1f s", time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - an eager step is slower, not wrong
            logger.warning(
                "torch.compile of the decode step's norms and sampler failed (%s: %s); running eager",
                type(exc).__name__,
                str(exc)[:300],
            )
            for m in norms:
                m._compiled_call_impl = None
            self._sample = sample_rows

    def _capture(self, b: int) -> tuple:
        """Capture the decode step for batch size b, on padding rows (they write only the scratch block 0)."""
        started = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        started[0].record()
        self._fill_padding(b)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles the kernels and settles cuBLAS workspaces outside the capture
                self._decode_body(b)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = self._decode_body(b)
        started[1].record()
        started[1].synchronize()
        logger.info("captured the decode step for batch size %d in %.0f ms", b, started[0].elapsed_time(started[1]))
        return graph, out


def sample_rows(
    logits: torch.Tensor, temperature: torch.Tensor, greedy: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The in-graph sampler. logits [b, V] (model dtype), temperature [b], greedy [b] bool, noise [b, V] ~ Exp(1).
    Returns (logits [b, V] float32, tokens [b], logprobs [b] of log_softmax(logits / temperature))."""
    logits = logits.float()
    scaled = logits / temperature[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)
    # exponential race: argmax(p / E) with E ~ Exp(1) draws from p; in log space argmax(logp - log E)
    toks = torch.where(greedy, scaled.argmax(-1), (logprobs - noise.log()).argmax(-1))
    return logits, toks, logprobs.gather(1, toks[:, None])[:, 0]
