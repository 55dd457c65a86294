"""The paged backend's scheduler: which sequences run, which tokens each pass computes, and who gives way when the
KV cache is full.

It owns the block bookkeeping of every running sequence (its block table `Request.blocks` and how many of its tokens
are cached, `Request.num_cached`) on top of the `BlockPool`, and decides
- prefill: sequences still holding uncached tokens get up to `chunk` of them per pass (chunked prefill), up to
  `max_prefill_tokens` in all; a newly admitted request first takes the published blocks of its prompt's prefix
  (`BlockPool.share_prefix`), so the n samples of one prompt compute it once and a multi-turn agent's history is
  not computed again (a finished request's blocks stay cached until the space is needed), and a request whose next
  block is being computed in this same pass by another request waits one pass to share it;
- decode: every sequence whose tokens are all cached but the last gets a slot for that token;
- preemption: when the cache runs out, the most recently admitted sequence not being served frees its blocks and goes
  back to the front of the queue with its output so far, to be recomputed (no output is lost).
It computes nothing: the model runner (slime.engine.model_runner) runs the passes it plans.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np

from slime.engine.embedded import Request
from slime.engine.kv_cache import BlockPool, CacheFull

logger = logging.getLogger(__name__)


class PagedScheduler:
    def __init__(
        self,
        block_size: int,
        max_running_requests: int,
        max_prefill_tokens: int,
        stats: dict,
        cache: bool = True,
        chunk: int | None = None,
    ):
        self.block_size = block_size
        self.cache = cache  # False: nothing is published, so nothing is shared (--disable-radix-cache)
        self.max_running_requests = max_running_requests
        self.max_prefill_tokens = max_prefill_tokens  # per pass, all sequences together
        self.chunk = chunk or max_prefill_tokens  # per sequence and pass
        self.stats = stats  # the engine's counters: preemptions, prefix_shared_tokens
        self.pool: BlockPool | None = None
        self.fresh: list[int] = []  # blocks handed out and not yet zeroed (the runner zeroes them before reading)

    # ------------------------------------------------------------------ the pool
    def new_pool(self, num_blocks: int) -> None:
        self.pool = BlockPool(num_blocks, self.block_size, self.cache)
        self.fresh = []

    def drop_pool(self) -> None:
        self.pool = None

    def forget_prefixes(self) -> int:
        return self.pool.forget_prefixes() if self.pool is not None else 0

    # ------------------------------------------------------------------ one sequence
    @staticmethod
    def tokens(r: Request) -> list[int]:
        return r.input_ids + r.output_ids if r.output_ids else r.input_ids

    @staticmethod
    def last_token(r: Request) -> int:
        """The token the next decode step consumes."""
        return r.output_ids[-1] if r.output_ids else r.input_ids[-1]

    @staticmethod
    def uncached(r: Request) -> int:
        """Tokens still to prefill (all but the last token, which the decode step consumes)."""
        return len(r.input_ids) + len(r.output_ids) - 1 - r.num_cached

    def slot(self, r: Request, pos: int) -> int:
        """The cache slot of r's token at position `pos`."""
        return r.blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def slots(self, r: Request, positions: np.ndarray) -> np.ndarray:
        """`slot` for an array of positions (a prefill pass holds tens of thousands of tokens)."""
        return np.asarray(r.blocks)[positions // self.block_size] * self.block_size + positions % self.block_size

    def grow(self, r: Request, upto: int) -> None:
        """Give r blocks for positions < upto; raises CacheFull (keeping what it got)."""
        while len(r.blocks) * self.block_size < upto:
            r.blocks.append(self.pool.allocate())
            self.fresh.append(r.blocks[-1])

    def free(self, r: Request, keep: bool = True) -> None:
        """Give back r's blocks. With `keep` its full computed blocks (decoded ones too) stay findable for a later
        request that starts with the same tokens: an agent's next turn, a preempted request coming back."""
        if self.pool is not None:
            if keep:
                self.pool.publish(self.tokens(r), r.blocks, r.num_cached)
            self.pool.release(r.blocks)
        r.blocks, r.num_cached = [], 0

    def published(self, chunks: list[tuple[Request, int]]) -> None:
        """After a prefill pass: the chunks' tokens are cached and their full blocks can be shared."""
        for r, n in chunks:
            r.num_cached += n
            self.pool.publish(self.tokens(r), r.blocks, r.num_cached)

    # ------------------------------------------------------------------ planning a pass
    def _preempt(self, rows: list[Request], keep: list[Request], requeue: Callable[[Request], None]) -> Request | None:
        """Free the latest admitted row of `rows` not in `keep`, remove it from `rows` and `requeue` it (first in
        the waiting queue). Returns it (None: there is none)."""
        kept = {id(r) for r in keep}
        for r in reversed(rows):
            if id(r) not in kept:
                self.free(r)
                rows.remove(r)
                requeue(r)
                self.stats["preemptions"] += 1
                logger.info(
                    "KV cache full: %s preempted (%d tokens, recomputed later)",
                    r.rid,
                    len(r.input_ids) + len(r.output_ids),
                )
                return r
        return None

    def schedule_prefill(
        self, rows: list[Request], waiting: Callable[[], list[Request]], requeue: Callable[[Request], None]
    ) -> tuple[list[tuple[Request, int]], list[Request]]:
        """Plan this pass's prefill over the running `rows`, then over the requests `waiting()` lists (in order).
        Returns (chunks: (request, tokens to compute), admitted requests). `rows` is updated in place (admitted
        requests appended, preempted ones removed and handed to `requeue`); the caller takes the admitted out of its
        waiting queue."""
        budget, chunks = self.max_prefill_tokens, []
        decoding = sum(1 for r in rows if self.uncached(r) == 0)
        preempted: set[int] = set()
        for r in list(rows):
            n = min(self.uncached(r), budget, self.chunk)
            if n <= 0 or id(r) in preempted:
                continue
            while True:
                try:
                    self.grow(r, r.num_cached + n)
                    break
                except CacheFull:
                    # decoding rows finish and free blocks; with none, only preempting frees any
                    victim = None if decoding else self._preempt(rows, [r] + [c for c, _ in chunks], requeue)
                    if victim is None:
                        return chunks, []
                    preempted.add(id(victim))
            chunks.append((r, n))
            budget -= n
        pending: set[tuple] = set()  # first uncomputed block of each request admitted in this pass
        admitted = []
        for r in waiting():
            if budget <= 0 or len(rows) >= self.max_running_requests:
                break
            if r.abort_message:
                continue
            tokens = self.tokens(r)
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
                self.free(r)
                continue
            n = min(target - r.num_cached, budget, self.chunk)
            need = math.ceil((r.num_cached + n + 1) / self.block_size) - len(r.blocks)
            if self.pool.free < need + decoding:  # leave each decoding row room for its next block
                self.free(r)
                break
            self.grow(r, r.num_cached + max(n, 1))
            if key is not None:
                pending.add(key)
            rows.append(r)
            admitted.append(r)
            self.stats["prefix_shared_tokens"] += r.num_cached
            if not r.output_ids:  # a preempted request coming back recomputes its own tokens
                r.cached_tokens = r.num_cached
            decoding += n == 0
            if n > 0:
                chunks.append((r, n))
                budget -= n
        return chunks, admitted

    def _next_block_key(self, r: Request, tokens: list[int], target: int) -> tuple | None:
        i, bs = len(r.blocks), self.block_size
        if (i + 1) * bs > target:
            return None
        return (r.blocks[-1] if r.blocks else -1, tuple(tokens[i * bs : (i + 1) * bs]))

    def schedule_decode(
        self, decode: list[Request], rows: list[Request], requeue: Callable[[Request], None]
    ) -> list[Request]:
        """Give every sequence of `decode` a slot for its last token, preempting other `rows` when the cache is full
        (as in `schedule_prefill`). A sequence that alone does not fit the cache is marked aborted. Returns the
        sequences to decode now."""
        preempted: set[int] = set()
        for r in decode:
            while id(r) not in preempted:
                try:
                    self.grow(r, r.num_cached + 1)
                    break
                except CacheFull:
                    victim = self._preempt(rows, [r], requeue)
                    if victim is None:
                        r.abort_message = f"KV cache full ({self.pool.capacity_tokens} tokens) for one sequence"
                        break
                    preempted.add(id(victim))
        running = {id(r) for r in rows}
        return [r for r in decode if id(r) in running and not r.abort_message]
