"""Paged KV bookkeeping in plain Python: a pool of fixed-size blocks, a free list, refcounts and one block
table per request. A request holding `n` tokens owns ceil(n / block_size) blocks; nothing else is tracked."""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("BlockManager: num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refcount = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def num_missing(self, request_id: str, num_tokens: int) -> int:
        """Blocks to add so that `request_id` can hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self.table(request_id)))

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.num_missing(request_id, num_tokens) <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grows the request's table to hold `num_tokens` tokens; returns the new blocks."""
        missing = self.num_missing(request_id, num_tokens)
        if missing > len(self._free):
            raise MemoryError(f"BlockManager: {missing} blocks needed, {len(self._free)} free")
        new = [self._free.popleft() for _ in range(missing)]
        for block in new:
            self._refcount[block] += 1
        if new:
            self._tables.setdefault(request_id, []).extend(new)
        return new

    def free(self, request_id: str) -> list[int]:
        """Releases every block of the request (a no-op for an unknown request); returns the blocks freed."""
        freed = []
        for block in reversed(self._tables.pop(request_id, [])):
            self._refcount[block] -= 1
            if self._refcount[block] == 0:
                freed.append(block)
                self._free.append(block)
        return freed

    def check_invariants(self) -> None:
        held = [b for table in self._tables.values() for b in table]
        counts = [0] * self.num_blocks
        for block in held:
            counts[block] += 1
        assert counts == self._refcount, "refcounts disagree with the block tables"
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert all((b in free) == (counts[b] == 0) for b in range(self.num_blocks)), "free list disagrees with refcounts"
        assert all(self._tables.values()), "an empty block table is kept"
