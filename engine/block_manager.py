"""Paged KV bookkeeping in plain Python: a pool of fixed-size blocks, refcounts, one block table per request and,
with prefix caching, a table of full blocks by the hash of their content.

A request holding `n` tokens owns ceil(n / block_size) blocks. With prefix caching, a full block whose K/V have been
written (`commit`) is registered under a hash chain: its hash covers the parent block's hash, its token ids and, at
the root, a salt naming everything else that makes two blocks of the same tokens incompatible (model, dtype, cache
kind, quantizer and bits, block size). A waiting request `lookup`s its longest cached prefix of full blocks and
shares them (refcount + 1); nobody ever writes into a shared block, because a request only writes from its own
counter on, and the cached prefix stops before its last known token (at least one token runs, for its logits).

Free blocks are of two kinds: uncached ones (taken first) and cached ones, kept reusable in least-recently-freed
order until their space is needed (`_take` evicts the oldest and forgets its hash). A request frees its blocks last
first, so a chain's tail is evicted before its head.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = False, salt: str = ""):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("BlockManager: num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._free: deque[int] = deque(range(num_blocks))  # free and uncached
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free and cached, least recently freed first
        self._refcount = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        self._block_of: dict[bytes, int] = {}  # content hash -> the cached block holding it
        self._hash_of: dict[int, bytes] = {}  # the inverse
        self._chains: dict[str, list[bytes]] = {}  # per request: hashes of its full blocks known so far
        self._committed: dict[str, int] = {}  # per request: leading blocks already offered to the cache
        self._root = hashlib.sha256(b"certkv-prefix-cache\0" + salt.encode()).digest()

    @property
    def num_free(self) -> int:
        """Blocks no request holds, cached ones included (they are reused when space is needed)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache, held or free."""
        return len(self._hash_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def refcount(self, block: int) -> int:
        return self._refcount[block]

    def cached(self, block: int) -> bool:
        """Whether the block is registered in the prefix cache (held or free)."""
        return block in self._hash_of

    def num_missing(self, request_id: str, num_tokens: int, cached: list[int] = ()) -> int:
        """Blocks to add, beyond `cached`, so that `request_id` can hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self.table(request_id)) - len(cached))

    def can_allocate(self, request_id: str, num_tokens: int, cached: list[int] = ()) -> bool:
        """Whether `allocate` would succeed; cached blocks nobody holds come out of the free pool too."""
        reclaimed = sum(1 for b in cached if self._refcount[b] == 0)
        return self.num_missing(request_id, num_tokens, cached) + reclaimed <= self.num_free

    def allocate(self, request_id: str, num_tokens: int, cached: list[int] = ()) -> list[int]:
        """Grows the request's table to hold `num_tokens` tokens, starting with the shared blocks `cached` (from
        `lookup`, for a request that holds nothing yet); returns the new, unshared blocks."""
        if not self.can_allocate(request_id, num_tokens, cached):
            raise MemoryError(f"BlockManager: {self.num_missing(request_id, num_tokens, cached)} blocks needed, "
                              f"{self.num_free} free")
        if cached:
            assert not self.table(request_id), "cached blocks start a table"
            for block in cached:
                if self._refcount[block] == 0:
                    del self._evictable[block]
                self._refcount[block] += 1
            self._tables[request_id] = list(cached)
            self._committed[request_id] = len(cached)
        new = [self._take() for _ in range(self.num_missing(request_id, num_tokens))]
        for block in new:
            self._refcount[block] += 1
        if new:
            self._tables.setdefault(request_id, []).extend(new)
        return new

    def free(self, request_id: str) -> list[int]:
        """Releases every block of the request and forgets its hashes (a no-op for an unknown request); returns the
        blocks no one holds any more. Cached ones stay reusable; the last block goes first, so eviction takes a chain's
        tail before its head."""
        freed = []
        self._chains.pop(request_id, None)
        self._committed.pop(request_id, None)
        for block in reversed(self._tables.pop(request_id, [])):
            self._refcount[block] -= 1
            if self._refcount[block] == 0:
                freed.append(block)
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        return freed

    # ---- prefix caching -------------------------------------------------------------------------------------------
    def lookup(self, request_id: str, token_ids: list[int]) -> list[int]:
        """The cached blocks of the longest prefix of full blocks of `token_ids` that leaves at least the last token
        to compute; [] without caching."""
        if not self.caching:
            return []
        blocks = []
        for digest in self._chain(request_id, token_ids, (len(token_ids) - 1) // self.block_size):
            block = self._block_of.get(digest)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def commit(self, request_id: str, token_ids: list[int], num_computed: int) -> None:
        """The K/V of the first `num_computed` tokens are written: their full blocks become cached, unless a block
        of the same content already is (that one keeps serving lookups; this one stays private)."""
        if not self.caching:
            return
        table, done = self.table(request_id), self._committed.get(request_id, 0)
        full = min(num_computed // self.block_size, len(table))
        if full <= done:
            return
        chain = self._chain(request_id, token_ids, full)
        for i in range(done, full):
            block, digest = table[i], chain[i]
            if digest not in self._block_of and block not in self._hash_of:
                self._block_of[digest], self._hash_of[block] = block, digest
        self._committed[request_id] = full

    def forget(self, blocks: list[int]) -> None:
        """Takes blocks out of the prefix cache (their data is known bad): no later lookup returns them; holders
        keep them until they end, and then they are plain free blocks."""
        for block in blocks:
            digest = self._hash_of.pop(block, None)
            if digest is None:
                continue
            del self._block_of[digest]
            if block in self._evictable:
                del self._evictable[block]
                self._free.append(block)

    def _chain(self, request_id: str, token_ids: list[int], num_blocks: int) -> list[bytes]:
        """The hash chain of the request's first `num_blocks` full blocks, kept (a waiting request looks up at every
        step) and extended as tokens become known; a request id names one token sequence until `free`."""
        chain = self._chains.setdefault(request_id, [])
        bs = self.block_size
        while len(chain) < num_blocks:
            i = len(chain)
            ids = array("q", token_ids[i * bs:(i + 1) * bs])
            chain.append(hashlib.sha256((chain[-1] if chain else self._root) + ids.tobytes()).digest())
        return chain[:num_blocks]

    def _take(self) -> int:
        """A free block: an uncached one, else the least recently freed cached one, which leaves the cache."""
        if self._free:
            return self._free.popleft()
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        return block

    def check_invariants(self) -> None:
        held = [b for table in self._tables.values() for b in table]
        counts = [0] * self.num_blocks
        for block in held:
            counts[block] += 1
        assert counts == self._refcount, "refcounts disagree with the block tables"
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert not free & evictable, "a block is free both cached and uncached"
        assert all((b in free or b in evictable) == (counts[b] == 0) for b in range(self.num_blocks)), \
            "free lists disagree with refcounts"
        assert all(self._tables.values()), "an empty block table is kept"
        assert len(self._block_of) == len(self._hash_of), "the hash table is not one to one"
        assert all(self._block_of[d] == b for b, d in self._hash_of.items()), "hash tables disagree"
        assert evictable <= set(self._hash_of) and not free & set(self._hash_of), "a free block's cache state is wrong"
        assert self.caching or not self._hash_of, "blocks cached with caching off"
        assert set(self._committed) <= set(self._tables), "commits kept for a request holding nothing"
        for rid, done in self._committed.items():
            assert done <= len(self._tables[rid]), "more blocks committed than held"
