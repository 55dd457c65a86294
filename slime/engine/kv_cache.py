"""Block bookkeeping for the paged KV cache: a free list, reference counts, and prefix sharing.

The cache is `num_blocks` blocks of `block_size` token slots; a sequence owns a list of blocks (its block table) and
slot `block * block_size + offset` holds the keys and values of its token at position `index * block_size + offset`.
A full block can be shared: it is published under a key that names its tokens and everything before them (the parent
block and the block's token tuple), so a later sequence with the same prefix takes a reference instead of computing
it again — the n samples of one prompt prefill it once. Keys live only while some sequence holds the block, and are
dropped when the weights change, since cached keys and values belong to the weights that computed them.
Block 0 is never handed out: padded rows of a CUDA-graph batch write their garbage there.
"""

from __future__ import annotations


class CacheFull(RuntimeError):
    """No free block is left; the scheduler preempts a sequence or waits."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks of {block_size} tokens, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._key_of: dict[int, tuple] = {}  # block -> its prefix key
        self._by_key: dict[tuple, int] = {}  # prefix key -> block
        self._stale: set[int] = set()  # held blocks computed with weights older than the current ones

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    def allocate(self) -> int:
        if not self._free:
            raise CacheFull("KV cache is full")
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                key = self._key_of.pop(b, None)
                if key is not None and self._by_key.get(key) == b:
                    del self._by_key[key]
                self._stale.discard(b)
                self._free.append(b)

    def share_prefix(self, tokens: list[int], limit: int) -> list[int]:
        """Take references to the published blocks that hold tokens[:n] for the largest n <= limit that is a
        multiple of the block size. Returns those blocks (possibly none)."""
        blocks: list[int] = []
        parent = -1
        bs = self.block_size
        while (len(blocks) + 1) * bs <= limit:
            i = len(blocks)
            block = self._by_key.get((parent, tuple(tokens[i * bs : (i + 1) * bs])))
            if block is None:
                break
            blocks.append(block)
            parent = block
        for b in blocks:
            self._refs[b] += 1
        return blocks

    def publish(self, tokens: list[int], blocks: list[int], num_cached: int) -> None:
        """Make the full blocks among tokens[:num_cached] (held in `blocks`) findable by `share_prefix`."""
        parent = -1
        bs = self.block_size
        for i in range(num_cached // bs):
            b = blocks[i]
            if b in self._stale:  # a prefix computed by old weights must not seed new requests
                return
            key = (parent, tuple(tokens[i * bs : (i + 1) * bs]))
            if b not in self._key_of:
                self._key_of[b] = key
                self._by_key.setdefault(key, b)
            parent = b

    def forget_prefixes(self) -> int:
        """The weights changed, or a flush: nothing cached so far may be shared from now on. Returns how many
        published blocks were forgotten."""
        published = len(self._by_key)
        self._stale.update(b for b in range(1, self.num_blocks) if self._refs[b] > 0)
        self._key_of.clear()
        self._by_key.clear()
        return published
