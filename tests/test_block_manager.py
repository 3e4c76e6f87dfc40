"""Block manager: a hypothesis state machine drives allocate/grow/free and checks the invariants after each step."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.block_manager import BlockManager


class BlockMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.manager = BlockManager(num_blocks=24, block_size=4)
        self.tokens: dict[str, int] = {}

    @rule(rid=st.sampled_from("abcdefgh"), grow=st.integers(1, 30))
    def grow(self, rid, grow):
        want = self.tokens.get(rid, 0) + grow
        free_before = self.manager.num_free
        if self.manager.can_allocate(rid, want):
            new = self.manager.allocate(rid, want)
            self.tokens[rid] = want
            assert len(self.manager.table(rid)) == -(-want // 4)
            assert free_before - self.manager.num_free == len(new)
        else:
            with pytest.raises(MemoryError):
                self.manager.allocate(rid, want)
            assert self.manager.num_free == free_before

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        held = len(self.manager.table(rid))
        assert len(self.manager.free(rid)) == held
        del self.tokens[rid]
        assert self.manager.free(rid) == []  # freeing twice is a no-op

    @invariant()
    def consistent(self):
        self.manager.check_invariants()
        held = sum(len(self.manager.table(r)) for r in self.tokens)
        assert held + self.manager.num_free == 24

    def teardown(self):
        for rid in list(self.tokens):
            self.manager.free(rid)
        assert self.manager.num_free == 24
        self.manager.check_invariants()


TestBlockMachine = BlockMachine.TestCase
TestBlockMachine.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)


def test_tables_are_disjoint_and_sized_by_tokens():
    manager = BlockManager(num_blocks=8, block_size=16)
    manager.allocate("a", 1)
    manager.allocate("b", 17)
    manager.allocate("a", 16)  # still one block
    assert len(manager.table("a")) == 1 and len(manager.table("b")) == 2
    assert not set(manager.table("a")) & set(manager.table("b"))
    assert manager.allocate("a", 33) and len(manager.table("a")) == 3
    assert manager.num_free == 3


# ---- prefix caching -------------------------------------------------------------------------------------
BS = 4
PREFIXES = ([7] * 12, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 9, 9, 9, 9])  # shared heads of prompts


class PrefixMachine(RuleBasedStateMachine):
    """Requests with shared prefixes are admitted from their cached blocks, compute in chunks (each chunk's blocks
    checked unshared before it is written), append decoded tokens, are freed (finish, abort, preemption) and have
    blocks forgotten. A model of what each block holds (the whole token prefix through it, as written) checks that a
    lookup only ever returns blocks holding exactly the request's tokens."""

    def __init__(self):
        super().__init__()
        self.manager = BlockManager(num_blocks=12, block_size=BS, caching=True, salt="test")
        self.tokens: dict[str, list[int]] = {}  # admitted requests' known tokens
        self.computed: dict[str, int] = {}
        self.content: dict[int, tuple[int, ...]] = {}  # block -> token prefix through its end, as last written

    @rule(rid=st.sampled_from("abcdef"), head=st.integers(0, len(PREFIXES) - 1), cut=st.integers(0, 12),
          tail=st.lists(st.integers(0, 3), max_size=9), chunk=st.integers(1, 16))
    def admit(self, rid, head, cut, tail, chunk):
        if rid in self.tokens:
            return
        tokens = (PREFIXES[head][:cut] + tail) or [0]
        cached = self.manager.lookup(rid, tokens)
        assert len(cached) * BS <= len(tokens) - 1, "the cached prefix leaves no token to compute"
        for i, block in enumerate(cached):
            assert self.content[block] == tuple(tokens[:(i + 1) * BS]), "a hit holds other tokens"
        start = len(cached) * BS
        want = min(len(tokens), start + chunk)
        free_before = self.manager.num_free
        if not self.manager.can_allocate(rid, want, cached):
            with pytest.raises(MemoryError):
                self.manager.allocate(rid, want, cached)
            assert self.manager.num_free == free_before
            self.manager.free(rid)  # the request gives up (an abort while waiting): its id may come back
            return
        self.manager.allocate(rid, want, cached)
        self.tokens[rid], self.computed[rid] = tokens, start
        self._write(rid, want)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), chunk=st.integers(1, 9), decode=st.integers(0, 3))
    def run(self, data, chunk, decode):
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        tokens = self.tokens[rid]
        if self.computed[rid] == len(tokens):
            tokens.append(decode)  # the token sampled after the last chunk
        want = min(len(tokens), self.computed[rid] + chunk)
        if self.manager.can_allocate(rid, want):
            self.manager.allocate(rid, want)
            self._write(rid, want)

    def _write(self, rid, end):
        """Computes tokens computed .. end - 1 into the request's blocks, then commits them."""
        table, tokens, start = self.manager.table(rid), self.tokens[rid], self.computed[rid]
        for index in range(start // BS, -(-end // BS)):
            assert self.manager.refcount(table[index]) == 1, "a request writes into a shared block"
            self.content[table[index]] = tuple(tokens[:(index + 1) * BS])
        self.computed[rid] = end
        self.manager.commit(rid, tokens, end)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        table = self.manager.table(rid)
        freed = self.manager.free(rid)
        assert set(freed) == {b for b in table if self.manager.refcount(b) == 0}
        del self.tokens[rid], self.computed[rid]

    @rule(block=st.integers(0, 11))
    def forget(self, block):
        self.manager.forget([block])
        assert not self.manager.cached(block)

    @invariant()
    def consistent(self):
        self.manager.check_invariants()
        held = {b for r in self.tokens for b in self.manager.table(r)}
        assert len(held) + self.manager.num_free == 12
        for rid in self.tokens:  # every block a request holds has what it wrote or shares
            for i, block in enumerate(self.manager.table(rid)[: self.computed[rid] // BS]):
                assert self.content[block] == tuple(self.tokens[rid][:(i + 1) * BS])

    def teardown(self):
        for rid in list(self.tokens):
            self.manager.free(rid)
        assert self.manager.num_free == 12
        self.manager.check_invariants()


TestPrefixMachine = PrefixMachine.TestCase
TestPrefixMachine.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


def commit_all(manager, rid, tokens):
    manager.allocate(rid, len(tokens))
    manager.commit(rid, tokens, len(tokens))


def test_a_prefix_is_shared_once_written_and_leaves_the_last_token_to_compute():
    manager = BlockManager(num_blocks=8, block_size=4, caching=True)
    tokens = list(range(12))
    manager.allocate("a", 12)
    assert manager.lookup("b", tokens + [99]) == []  # allocated, not yet written
    manager.commit("a", tokens, 12)
    assert manager.lookup("b", tokens + [99]) == manager.table("a")  # three full blocks
    assert manager.lookup("c", tokens) == manager.table("a")[:2]  # all cached: the last block is recomputed
    assert manager.lookup("d", [0, 1, 2, 3, 4, 5, 6, 99, 8]) == manager.table("a")[:1]
    assert BlockManager(8, 4, caching=False).lookup("e", tokens) == []
    other = BlockManager(num_blocks=8, block_size=4, caching=True, salt="another quantizer")
    commit_all(other, "a", tokens)
    assert other.lookup("b", tokens + [1]) and manager._root != other._root


def test_freed_cached_blocks_stay_reusable_until_needed_oldest_first_tails_first():
    manager = BlockManager(num_blocks=6, block_size=4, caching=True)
    commit_all(manager, "a", list(range(8)))  # 2 blocks
    commit_all(manager, "b", list(range(100, 108)))  # 2 blocks
    a, b = manager.table("a"), manager.table("b")
    manager.free("a")
    manager.free("b")
    assert manager.num_free == 6 and manager.num_cached == 4
    manager.allocate("c", 8)  # the two uncached blocks first
    assert manager.num_cached == 4
    manager.allocate("d", 4)  # then the least recently freed: a's tail
    assert manager.table("d") == [a[1]] and manager.lookup("x", list(range(9))) == [a[0]]
    assert manager.lookup("y", list(range(100, 109))) == b
    manager.allocate("e", 8)  # a's head, then b's tail
    assert manager.table("e") == [a[0], b[1]] and manager.num_cached == 1
    manager.check_invariants()


def test_a_hit_on_a_free_cached_block_takes_it_out_of_the_free_pool():
    manager = BlockManager(num_blocks=3, block_size=4, caching=True)
    commit_all(manager, "a", list(range(8)))
    manager.free("a")
    cached = manager.lookup("b", list(range(9)))
    assert len(cached) == 2 and manager.can_allocate("b", 9, cached)
    assert not manager.can_allocate("b", 13, cached)  # 2 reclaimed + 2 new > 3 free
    manager.allocate("b", 9, cached)
    assert manager.num_free == 0 and manager.table("b")[:2] == cached
    assert all(manager.refcount(b) == 1 for b in cached)
    manager.check_invariants()


def test_a_duplicate_block_stays_private_and_forgotten_blocks_are_not_shared():
    manager = BlockManager(num_blocks=8, block_size=4, caching=True)
    tokens = list(range(8))
    for rid in "ab":  # both computed the same blocks (admitted in one step): the first registered serves lookups
        commit_all(manager, rid, tokens)
    assert manager.lookup("c", tokens + [0]) == manager.table("a")
    assert not any(manager.cached(b) for b in manager.table("b"))
    manager.forget(manager.table("a")[1:])
    assert manager.lookup("c", tokens + [0]) == manager.table("a")[:1]
    manager.free("a")
    manager.free("b")
    assert manager.num_cached == 1 and manager.num_free == 8
    manager.check_invariants()
