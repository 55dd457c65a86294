"""Block bookkeeping for the paged KV cache: a free list, reference counts, and a prefix cache.

The cache is `num_blocks` blocks of `block_size` token slots; a sequence owns a list of blocks (its block table) and
slot `block * block_size + offset` holds the keys and values of its token at position `index * block_size + offset`.
A full block can be shared: it is published under a key that names its tokens and everything before them (the
parent block's id, never reused, and the block's token tuple), so a later sequence with the same prefix takes a
reference instead of computing it again — the n samples of one prompt prefill it once, and an agent's next turn
finds its history. A published block outlives the sequences that held it: once none does, it waits in an idle list,
still findable, until a block is needed and none is free; then the least recently used idle block is evicted (with
whatever was published under it, which no sequence can hold without it). Everything published is forgotten when the
weights change, since cached keys and values belong to the weights that computed them.
Block 0 is never handed out: padded rows of a CUDA-graph batch write their garbage there.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

ROOT = 0  # the parent id of a prompt's first block


class CacheFull(RuntimeError):
    """No free block is left; the scheduler preempts a sequence or waits."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, cache: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks of {block_size} tokens, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.cache = cache  # False: publish nothing (no prefix is ever shared)
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._key_of: dict[int, tuple] = {}  # published block -> its key (parent id, tokens)
        self._by_key: dict[tuple, int] = {}  # key -> published block
        self._id_of: dict[int, int] = {}  # published block -> the id its children's keys name (never reused)
        self._children: dict[int, set[int]] = {}  # published block -> blocks published under it
        self._parent: dict[int, int | None] = {}  # published block -> its parent block (None: a first block)
        self._idle: OrderedDict[int, None] = OrderedDict()  # published blocks no sequence holds, oldest use first
        self._ids = itertools.count(ROOT + 1)
        self._stale: set[int] = set()  # held blocks computed with weights older than the current ones
        self.evicted = 0  # idle blocks handed out again, since this pool was made

    @property
    def free(self) -> int:
        """Blocks that can be handed out now: free ones and idle cached ones."""
        return len(self._free) + len(self._idle)

    @property
    def cached(self) -> int:
        """Idle blocks kept for a later request with the same prefix."""
        return len(self._idle)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    def allocate(self) -> int:
        if not self._free:
            if not self._idle:
                raise CacheFull("KV cache is full")
            self._evict(next(iter(self._idle)))
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        for b in reversed(blocks):  # a sequence's last blocks become the oldest idle ones: evicted before its first
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._key_of and b not in self._stale:
                    self._idle[b] = None
                else:
                    self._stale.discard(b)
                    self._free.append(b)

    def share_prefix(self, tokens: list[int], limit: int) -> list[int]:
        """Take references to the published blocks that hold tokens[:n] for the largest n <= limit that is a
        multiple of the block size. Returns those blocks (possibly none)."""
        blocks: list[int] = []
        parent = ROOT
        bs = self.block_size
        while (len(blocks) + 1) * bs <= limit:
            i = len(blocks)
            block = self._by_key.get((parent, tuple(tokens[i * bs : (i + 1) * bs])))
            if block is None:
                break
            blocks.append(block)
            parent = self._id_of[block]
        for b in blocks:
            if self._refs[b] == 0:
                del self._idle[b]
            self._refs[b] += 1
        return blocks

    def publish(self, tokens: list[int], blocks: list[int], num_cached: int) -> None:
        """Make the full blocks among tokens[:num_cached] (held in `blocks`) findable by `share_prefix`."""
        if not self.cache:
            return
        parent, parent_block = ROOT, None
        bs = self.block_size
        for i in range(num_cached // bs):
            b = blocks[i]
            if b in self._stale:  # a prefix computed by old weights must not seed new requests
                return
            if b not in self._key_of:
                key = (parent, tuple(tokens[i * bs : (i + 1) * bs]))
                if key in self._by_key:  # another block holds the same prefix; this copy stays private
                    return
                self._key_of[b], self._by_key[key], self._id_of[b] = key, b, next(self._ids)
                self._parent[b] = parent_block
                if parent_block is not None:
                    self._children.setdefault(parent_block, set()).add(b)
            parent, parent_block = self._id_of[b], b

    def forget_prefixes(self) -> int:
        """The weights changed, or a flush: nothing cached so far may be shared from now on; idle blocks are free
        again. Returns how many published blocks were forgotten."""
        published = len(self._by_key)
        self._stale.update(b for b in range(1, self.num_blocks) if self._refs[b] > 0)
        self._free.extend(self._idle)
        for mapping in (self._key_of, self._by_key, self._id_of, self._children, self._parent, self._idle):
            mapping.clear()
        return published

    def _evict(self, block: int) -> None:
        """Unpublish an idle block and everything published under it (all idle: a sequence holding a block holds
        its parent too), and free them."""
        parent = self._parent[block]
        if parent is not None:
            self._children[parent].discard(block)
        stack = [block]
        while stack:
            b = stack.pop()
            stack.extend(self._children.pop(b, ()))
            del self._by_key[self._key_of.pop(b)], self._id_of[b], self._idle[b], self._parent[b]
            self._free.append(b)
            self.evicted += 1
