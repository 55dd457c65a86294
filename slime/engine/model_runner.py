"""The paged backend's model runner: the KV cache tensors and the forward passes the scheduler plans.

A prefill pass computes a packed run of (sequence, token chunk) pairs and writes their keys and values into the
cache; a decode pass computes one token for each running sequence. On CUDA with Triton the decode step replays a
graph captured for the smallest batch-size bucket that fits (cache slots from the block tables, model forward,
Triton paged attention, the fused Triton sampler all inside), and torch.compile fuses the decoder layers' small
operations around the attention; elsewhere it runs eagerly through the torch paged-attention path and samples with
`sample_rows`.

A step that samples its own tokens can be followed by the next without the host seeing them first (`launch`, then
`launch_next`): the next step's inputs are advanced on the device from the previous step's outputs, and the host
reads a step's tokens (copied to pinned memory) while the following step runs, so the host's bookkeeping of step n
overlaps the GPU's step n + 1. Weight updates copy into the parameters in place, so captured
graphs keep working. On CUDA the cache lives in a `DeviceRegion`: released and restored at the same addresses, so
the graphs survive a colocated trainer's turn on the GPU too.
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np
import torch

from slime.engine import device_memory
from slime.engine.paged_attention import PagedForward, gather_plan
from slime.engine.sampling import sample_rows

logger = logging.getLogger(__name__)

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeStep:
    """A launched decode step over n rows: logits [n, V] float32 and sampled tokens [n] on the device (valid until
    the next step runs); the tokens and their log-probs on the host once `result` returns."""

    def __init__(self, n: int, logits, tokens, host_tokens, host_logprobs, event) -> None:
        self.n, self.logits, self.tokens = n, logits, tokens
        self._host, self._event = (host_tokens, host_logprobs), event

    def result(self) -> tuple[list[int], list[float]]:
        """The sampled tokens and their log-probs; waits for this step only (not for steps launched after it)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host[0].tolist(), self._host[1].tolist()


class PagedModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        block_size: int,
        max_rows: int,
        max_blocks: int,
        kv_heads: int,
        head_dim: int,
        use_graphs: bool,
        cuda_graph_max_bs: int,
        torch_compile: bool,
        stats: dict,
        step_sampling: bool = False,
    ):
        self.model, self.device, self.block_size = model, device, block_size
        self.max_rows, self.max_blocks = max_rows, max_blocks
        self.num_layers = model.config.num_hidden_layers
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.on_cuda = device.type == "cuda"
        self.triton = False
        if self.on_cuda:
            try:
                import slime.engine.triton_decode  # noqa: F401

                self.triton = head_dim & (head_dim - 1) == 0  # the kernel tiles a power-of-two head dim
            except ImportError:
                logger.warning("triton is not importable: decode attention runs through torch")
        # the step samples its own tokens on CUDA with Triton; elsewhere only when asked (pipelined CPU decode)
        self.samples_in_step = (self.on_cuda and self.triton) or step_sampling
        self.use_graphs = use_graphs and self.on_cuda and self.triton
        self.fused_sampler = None  # slime.engine.triton_sample on CUDA with Triton; elsewhere sample_rows
        if self.on_cuda and self.triton:
            from slime.engine.triton_sample import sample_rows_fused

            self.fused_sampler = sample_rows_fused
        self.cuda_graph_max_bs = cuda_graph_max_bs
        self.torch_compile = torch_compile and self.triton
        self.compiled = False  # whether the decoder layers run compiled
        self._kv: torch.Tensor | None = None  # [layers, 2 (keys, values), slots, kv_heads, head_dim]
        self.kv_region: device_memory.DeviceRegion | None = None  # _kv's fixed-address memory (CUDA)
        self._k: list[torch.Tensor] | None = None
        self._v: list[torch.Tensor] | None = None
        self._scratch: torch.Tensor | None = None  # torch attention path: keys and values gathered per layer
        self._graphs: dict[int, tuple] = {}
        self.stats = stats
        stats.update(graph_captures=0, graph_capture_seconds=0.0)  # a colocated run should capture each bucket once
        self._graph_pool = None
        self._sample = sample_rows
        self._width = 1  # block-table columns the current static rows use
        if self.samples_in_step:
            self._alloc_static()

    # ------------------------------------------------------------------ memory
    def kv_tokens(self, kv_cache_tokens: int, mem_fraction_static: float, max_context: int) -> int:
        """How many tokens the KV cache holds: `kv_cache_tokens` if set, else on GPU what `mem_fraction_static` of
        the device leaves beside the weights and the step's workspace, on CPU 2048 per request row but at most half
        the host memory available (the scheduler preempts requests when the pool is full)."""
        per_token = 2 * self.num_layers * self.kv_heads * self.head_dim * self.model.dtype.itemsize
        if kv_cache_tokens:
            return kv_cache_tokens
        if not self.on_cuda:  # CPU pages are committed only when written, so a generous pool costs nothing until used
            # ... but a pool every request could fill must fit: at most half the memory available now
            return min(
                self.max_rows * min(max_context, 2048), max(4 * self.block_size, _available_bytes() // 2 // per_token)
            )
        free, total = torch.cuda.mem_get_info(self.device)
        # what the step itself needs beside the cache: fp32 logits and their softmax temporaries per batch row
        workspace = self.max_rows * self.model.config.vocab_size * 4 * 6 + (1 << 30)
        budget = total * mem_fraction_static - torch.cuda.memory_allocated(self.device) - workspace
        budget = min(budget, free - workspace)  # others on this GPU (a trainer) keep what they hold
        tokens = min(int(budget // per_token), self.max_rows * max_context)
        if tokens < 4 * self.block_size:
            raise RuntimeError(
                f"--mem-fraction-static {mem_fraction_static} of {total / 1e9:.1f} GB "
                f"({free / 1e9:.1f} GB free) leaves no room for the KV cache"
            )
        return tokens

    @property
    def has_kv(self) -> bool:
        return self._kv is not None and (self.kv_region is None or self.kv_region.mapped)

    @property
    def kept_blocks(self) -> int | None:
        """How many blocks a released cache comes back with (its addresses are kept), None if it is gone."""
        return self._kv.shape[2] // self.block_size if self.kv_region is not None else None

    def alloc_kv(self, num_blocks: int) -> None:
        shape = (self.num_layers, 2, num_blocks * self.block_size, self.kv_heads, self.head_dim)
        if self.kv_region is not None and tuple(self._kv.shape) == shape:
            self.kv_region.restore()
        else:
            nbytes = math.prod(shape) * self.model.dtype.itemsize
            self.kv_region = device_memory.fixed_or_none(
                lambda: device_memory.DeviceRegion(nbytes, self.device), self.device, "the KV cache"
            )
            if self.kv_region is not None:
                self._kv = self.kv_region.tensor(self.model.dtype, shape)
            else:
                self._kv = torch.empty(shape, dtype=self.model.dtype, device=self.device)
        # one tensor, so zeroing fresh blocks is one kernel; per layer [slots, kv_heads, head_dim] views of it
        self._k = [self._kv[i, 0] for i in range(self.num_layers)]
        self._v = [self._kv[i, 1] for i in range(self.num_layers)]
        self._kv[:, :, : self.block_size].zero_()  # block 0 is read through padding: keep it finite
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GB)",
            num_blocks,
            self.block_size,
            (num_blocks - 1) * self.block_size,
            self._kv.nbytes / 1e9,
        )

    def free_kv(self) -> None:
        self._scratch = None
        if self.kv_region is not None:
            self.kv_region.release()  # the tensors stay, pointing at the reserved addresses, for the graphs
        else:
            self._kv = self._k = self._v = None

    def free_graphs(self) -> None:
        if self._graphs:
            self._graphs.clear()
            self._graph_pool = None
            torch.cuda.empty_cache()

    @property
    def has_graphs(self) -> bool:
        return bool(self._graphs)

    def zero_blocks(self, blocks: list[int]) -> None:
        """Zero freshly handed-out blocks before a pass reads them: the torch path reads whole blocks, and the
        unwritten tail of one must not be NaN (masked attention weights are 0, and 0 * NaN is NaN)."""
        if blocks:
            fresh = torch.tensor(blocks, device=self.device)
            self._kv.view(2 * self.num_layers, self._kv.shape[2] // self.block_size, -1).index_fill_(1, fresh, 0)

    def _alloc_static(self) -> None:
        """Fixed-address inputs of the decode step, so a captured graph reads each step's values; and two pinned
        host buffers for the sampled tokens and log-probs (a step's copy must not overwrite the previous step's
        before the host has read it)."""
        n, dev = max(self.max_rows, 1), self.device
        self._s_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self._s_pos = torch.zeros(n, dtype=torch.long, device=dev)
        self._s_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        self._s_temp = torch.ones(n, dtype=torch.float32, device=dev)
        self._s_greedy = torch.zeros(n, dtype=torch.bool, device=dev)
        if self.fused_sampler is not None:  # its noise seed, drawn from the engine's seeded generator
            self._s_seed = torch.randint(0, 2**31 - 1, (1,), device=dev)
        pin = self.on_cuda
        self._host = [
            (torch.zeros(n, dtype=torch.long, pin_memory=pin), torch.zeros(n, dtype=torch.float32, pin_memory=pin))
            for _ in range(2)
        ]
        self._turn = 0

    # ------------------------------------------------------------------ passes
    def prefill(
        self,
        ids: list[int],
        pos: list[int] | np.ndarray,
        slots: list[int] | np.ndarray,
        tables: list[list[int]],
        q_start: list[int],
        q_len: list[int],
    ) -> None:
        """One packed prefill: `ids` at positions `pos`, their keys and values written to cache `slots`. Sequence i
        contributes the q_len[i] tokens from position q_start[i] on and reads the blocks tables[i]."""
        fwd = self._gather_forward(tables, torch.tensor(q_start), torch.tensor(q_len), slots)
        dev = self.device
        self.model(
            input_ids=torch.tensor([ids], device=dev),
            position_ids=torch.as_tensor(pos, dtype=torch.long)[None].to(dev),
            use_cache=False,
            paged=fwd,
            logits_to_keep=1,
        )

    def decode(self, last: list[int], pos: list[int], slots: list[int], tables: list[list[int]]) -> torch.Tensor:
        """The next-token logits [n, V] of n sequences (last token `last[i]` at `pos[i]`, written to `slots[i]`),
        for the host to sample from."""
        if self.samples_in_step:
            n = len(last)
            return self.launch(last, pos, tables, [1.0] * n, [True] * n).logits
        n = len(last)
        ones = torch.ones(n, dtype=torch.long)
        fwd = self._gather_forward(tables, torch.tensor(pos), ones, slots)
        logits = self.model(
            input_ids=torch.tensor(last, device=self.device)[:, None],
            position_ids=torch.tensor(pos, device=self.device)[:, None],
            use_cache=False,
            paged=fwd,
        ).logits[:, 0]
        return logits

    def _gather_forward(
        self, tables: list[list[int]], q_start: torch.Tensor, q_len: torch.Tensor, slots: list[int] | np.ndarray
    ) -> PagedForward:
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
        q_index, q_flat, mask = gather_plan(q_start, q_len, int(q_len.max()), width * self.block_size)
        dev = self.device
        scratch = None if self.on_cuda else self._gather_scratch(len(tables) * width)
        return PagedForward(
            self._k,
            self._v,
            torch.as_tensor(slots, dtype=torch.long).to(dev),
            q_index.to(dev),
            q_flat.to(dev),
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

    # ------------------------------------------------------------------ decode steps that sample their own tokens
    def launch(
        self, last: list[int], pos: list[int], tables: list[list[int]], temperatures: list[float], greedy: list[bool]
    ) -> DecodeStep:
        """Start one decode step for n sequences (last token `last[i]` at `pos[i]`, block table `tables[i]`, which
        must already hold position pos[i]) that samples at `temperatures` (greedy rows: argmax). Returns at once."""
        n = len(last)
        b = self._bucket(n)
        self._graph_for(b)  # capture runs on padding rows: before the inputs are set
        self._width = max(len(t) for t in tables)
        pad = b - n
        self._fill(b, last + [0] * pad, pos + [0] * pad, _table(tables, b, self._width),
                   list(temperatures) + [1.0] * pad, list(greedy) + [True] * pad)  # fmt: skip
        return self._run(n)

    def launch_next(
        self, prev: DecodeStep, keep: list[int] | None = None, tables_now: list[list[int]] | None = None
    ) -> DecodeStep:
        """Start the step after `prev` (the last one launched) without reading its tokens on the host: each
        sequence's input is the token `prev` sampled for it, one position further. `keep`: the indices of prev's
        rows that go on, in order (None: all). Every kept row's block table must already hold its next position;
        `tables_now`: the kept rows' block tables, where they grew since they were last passed."""
        n, dev = prev.n, self.device
        ids, pos, tables = self._s_ids, self._s_pos, self._s_tables
        self._graph_for(self._bucket(n if keep is None else len(keep)))
        if keep is None:
            ids[:n].copy_(prev.tokens)
            pos[:n] += 1
            self._set_tables(tables_now)
            return self._run(n)
        m, w = len(keep), self._width
        idx = torch.tensor(keep, device=dev)
        ids[:m] = prev.tokens[idx]
        pos[:m] = pos[idx] + 1
        tables[:m, :w] = tables[idx, :w]
        self._s_temp[:m] = self._s_temp[idx]
        self._s_greedy[:m] = self._s_greedy[idx]
        # the rows left behind become padding, which touches only the scratch block 0
        ids[m:n] = 0
        pos[m:n] = 0
        tables[m:n, :w] = 0
        self._set_tables(tables_now)
        return self._run(m)

    def _set_tables(self, tables: list[list[int]] | None) -> None:
        """Copy the first len(tables) rows' block tables in (None: they did not change)."""
        if tables is None:
            return
        self._width = max(self._width, max(len(t) for t in tables))
        table = _table(tables, len(tables), self._width)
        self._s_tables[: len(tables), : self._width].copy_(torch.from_numpy(table), non_blocking=True)

    def _bucket(self, n: int) -> int:
        return next((b for b in GRAPH_BUCKETS if n <= b <= self.max_rows), n)

    def _graph_for(self, b: int) -> tuple | None:
        """The captured step for bucket b (captured now if it is not yet), or None where the step runs eagerly."""
        if not (self.use_graphs and b <= self.cuda_graph_max_bs):
            return None
        if b not in self._graphs:
            self._graphs[b] = self._capture(b)
        return self._graphs[b]

    def _run(self, n: int) -> DecodeStep:
        """Run the step over the first n static rows (graph replay where captured) and queue its tokens' copy to
        the host. The bucket's graph must exist already (`_graph_for` before the inputs were set)."""
        b = self._bucket(n)
        captured = self._graphs.get(b)
        if captured is not None:
            graph, out = captured
            graph.replay()
        else:
            out = self._decode_body(b)
        logits, toks, lps = out
        host_toks, host_lps = self._host[self._turn]
        self._turn ^= 1
        host_toks[:n].copy_(toks[:n], non_blocking=True)
        host_lps[:n].copy_(lps[:n], non_blocking=True)
        event = None
        if self.on_cuda:
            event = torch.cuda.Event()
            event.record()
        return DecodeStep(n, logits[:n], toks[:n], host_toks[:n], host_lps[:n], event)

    def _fill(self, b: int, ids, pos, table: np.ndarray, temps, greedy) -> None:
        """Set the first b static rows; table [b, width] int32."""
        host = torch.tensor
        self._s_ids[:b].copy_(host(ids), non_blocking=True)
        self._s_pos[:b].copy_(host(pos), non_blocking=True)
        self._s_tables[:b, : table.shape[1]].copy_(torch.from_numpy(table), non_blocking=True)
        self._s_temp[:b].copy_(host(temps, dtype=torch.float32), non_blocking=True)
        self._s_greedy[:b].copy_(host(greedy), non_blocking=True)

    def _fill_padding(self, b: int) -> None:
        """Static rows that only touch the scratch block 0: what warm-up, compilation and capture run on."""
        self._fill(b, [0] * b, [0] * b, np.zeros((b, 1), dtype=np.int32), [1.0] * b, [False] * b)

    def _decode_body(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step over the first b static rows: logits [b, V] (float32 from the torch sampler, the model's
        dtype from the fused one), sampled tokens [b], logprobs [b]."""
        pos, tables, bs = self._s_pos[:b], self._s_tables[:b], self.block_size
        kernel = self.on_cuda and self.triton  # it finds each row's cache slot itself
        slots = None if kernel else tables.gather(1, (pos // bs)[:, None])[:, 0].long() * bs + pos % bs
        fwd = PagedForward(
            self._k, self._v, slots, block_tables=tables, seq_lens=(pos + 1).int(), block_size=bs, kernel=kernel
        )
        logits = self.model(
            input_ids=self._s_ids[:b, None], position_ids=self._s_pos[:b, None], use_cache=False, paged=fwd
        ).logits[:, 0]
        if self.fused_sampler is not None:
            toks, lps = self.fused_sampler(logits, self._s_temp[:b], self._s_greedy[:b], self._s_seed)
            self._s_seed.add_(1)  # inside the graph too: every replay draws fresh noise
            return logits, toks, lps
        noise = torch.empty(logits.shape, device=logits.device).exponential_()  # graph-safe RNG: outside compile
        return self._sample(logits, self._s_temp[:b], self._s_greedy[:b], noise)

    def compile_decode_step(self) -> None:
        """torch.compile the model's decoder layers around the attention call (CUDA with Triton, unless disabled):
        norms, q/k norms, rotary embeddings, residual adds and the MLP's activation become a few fused kernels instead
        of dozens of small ones per layer (the attention itself is ours and stays as it is: `paged_attention` is
        excluded from compilation, so each layer is two graphs, shared by all layers). Also the final norm and the
        sampler's arithmetic. Shapes are dynamic: one compilation serves every batch size and prefill length. The
        model's code is unchanged. Models without a `model.layers` list get their RMSNorms compiled instead. Needs the
        KV cache (it runs a step and a prefill); if compilation fails here (no working compiler), the step stays
        eager and `compiled` says so."""
        if not self.torch_compile or self.compiled:
            return
        layers = _decoder_layers(self.model)
        norms = [m for m in self.model.modules() if type(m).__name__.endswith("RMSNorm")]
        compiled = layers + norms
        for m in compiled:
            m.compile(dynamic=True)
        if self.fused_sampler is None:
            self._sample = torch.compile(sample_rows, dynamic=True)
        what = f"{len(layers)} decoder layers" if layers else "the norms"
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                for b in (1, 2):  # batch 1 is specialised apart from the others
                    self._fill_padding(b)
                    self._decode_body(b)
                self.prefill([0, 0, 0], [0, 1, 2], [0, 1, 2], [[0]], [0], [3])  # block 0 is scratch
                torch.cuda.synchronize(self.device)
            logger.info("compiled %s and the sampler in %.1f s", what, time.perf_counter() - start)
            self.compiled = True
        except Exception as exc:  # noqa: BLE001 - an eager step is slower, not wrong
            logger.warning(
                "torch.compile of %s and the sampler failed (%s: %s); running eager",
                what,
                type(exc).__name__,
                str(exc)[:300],
            )
            for m in compiled:
                m._compiled_call_impl = None
            self._sample = sample_rows

    def _capture(self, b: int) -> tuple:
        """Capture the decode step for batch size b, on padding rows (they write only the scratch block 0). The
        static inputs of rows [:b] are put back afterwards: a run of steps may capture a smaller bucket between two
        of its steps, and its rows' positions and tables are read from there."""
        static = (self._s_ids, self._s_pos, self._s_tables, self._s_temp, self._s_greedy)
        kept = [t[:b].clone() for t in static]
        start = time.perf_counter()
        self._fill_padding(b)
        graph, out = self._record_graph(b)
        for t, saved in zip(static, kept, strict=True):
            t[:b].copy_(saved)
        seconds = time.perf_counter() - start
        self.stats["graph_captures"] += 1
        self.stats["graph_capture_seconds"] += seconds
        logger.info("captured the decode step for batch size %d in %.0f ms", b, seconds * 1e3)
        return graph, out

    def _record_graph(self, b: int) -> tuple:
        """The CUDA graph of `_decode_body(b)` and its static outputs (warmed up on a side stream first)."""
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
        torch.cuda.synchronize(self.device)
        return graph, out


def _table(tables: list[list[int]], rows: int, width: int) -> np.ndarray:
    """Block tables as an int32 [rows, width] array, zero-padded (rows past len(tables) are padding)."""
    table = np.zeros((rows, width), dtype=np.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = t
    return table


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a transformers causal LM (`model.model.layers`), [] where it has no such list."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def _available_bytes() -> int:
    """Host memory available to new allocations (MemAvailable), in bytes; the physical total where it is not
    reported."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
